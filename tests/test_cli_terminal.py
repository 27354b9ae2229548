"""longcat-client never writes raw control characters to a terminal in plain mode; --json keeps the exact text."""

from __future__ import annotations

import json

import pytest

from longcat_service.client import cli
from longcat_service.client.types import GenerationChunk, Usage
from tests.scripted_client import scripted_client

HOSTILE = "ok \x1b[2J\x1b]0;pwned\x07 back\rX\x00\x7f\x9b \u202etxt.exe\nnext\tline é"


CHUNKS = [
    GenerationChunk(request_id="r", index=0, text=HOSTILE[:10]),
    GenerationChunk(request_id="r", index=0, text=HOSTILE[10:]),
    GenerationChunk(request_id="r", index=0, finish_reason="length", usage=Usage(completion_tokens=2)),
]


@pytest.fixture
def fake_client(monkeypatch):
    monkeypatch.setattr(cli, "LongCatClient", scripted_client(CHUNKS))


def test_plain_mode_escapes_control_characters(fake_client, capsys):
    assert cli.main(["hello"]) == 0
    out = capsys.readouterr().out
    assert not [c for c in out if (ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f or c == "\u202e"]
    assert "\\x1b[2J" in out and "\\x0d" in out and "\\x00" in out and "\\x9b" in out and "\\u202e" in out
    assert "next\tline é" in out  # newlines, tabs and ordinary non-ASCII text pass unchanged


def test_json_mode_keeps_exact_text_escaped(fake_client, capsys):
    assert cli.main(["--json", "hello"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(ord(c) >= 0x20 and ord(c) < 0x7f for line in lines for c in line)  # JSON-escaped, ASCII only
    assert "".join(json.loads(line)["text"] for line in lines) == HOSTILE


def test_terminal_safe_is_identity_on_ordinary_text():
    text = "Once upon a time,\n\tthere was a cat — «ça va?» 你好 🐈"
    assert cli.terminal_safe(text) == text

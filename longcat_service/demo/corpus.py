"""Build the demo model's training corpus from two installed, openly licensed packages (see DATA.md).

- Debian `bible-kjv-text` (+ its reader `bible-kjv`): the King James Bible (public domain), one document per chapter.
- PyPI `chatterbot-corpus` (BSD-3-Clause): English dialogues, rendered with the LongCat chat template.

    python -m longcat_service.demo.corpus            # writes longcat_service/demo/data/corpus.jsonl.xz

The output is one JSON object per line, {"kind": "book"|"chat", "text": ...}, in a fixed order, so the same
package versions give the same bytes. Training reads only that committed file (the GPU machine has no network).
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import subprocess
from pathlib import Path

from longcat_service.chat_template import render_chat_template

DATA_DIR = Path(__file__).with_name("data")
CORPUS_FILE = DATA_DIR / "corpus.jsonl.xz"
_CHAPTER = re.compile(r"^(\S.*?) (\d+)$")  # "Genesis 1", "1 Kings 3", "Song of Solomon 2"
_VERSE = re.compile(r"^\s+\d+\s")


def bible_chapters(bible_cmd: str = "bible") -> list[str]:
    """Every KJV chapter as one paragraph of plain prose (verse numbers and line wrapping removed)."""
    raw = subprocess.run([bible_cmd, "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: list[str] = []
    verses: list[str] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if _CHAPTER.match(line) and not line.startswith(" "):
            if verses:
                chapters.append(" ".join(verses))
            verses = []
        elif _VERSE.match(line):
            verses.append(_VERSE.sub("", line).strip())
        elif verses:
            verses[-1] += " " + line.strip()  # wrapped continuation of the previous verse
    if verses:
        chapters.append(" ".join(verses))
    return [re.sub(r"\s+", " ", c) for c in chapters]


def chat_dialogues() -> list[str]:
    """chatterbot-corpus English conversations as LongCat chat transcripts (user/assistant alternate)."""
    import importlib.resources

    import yaml

    root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    out: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yml"):
            continue
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            if len(turns) % 2:
                turns = turns[:-1]  # end on an assistant turn
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            out.append(render_chat_template(messages, add_generation_prompt=False))
    return out


def build(out: Path = CORPUS_FILE) -> dict[str, int]:
    docs = [{"kind": "book", "text": t} for t in bible_chapters()] + [{"kind": "chat", "text": t} for t in chat_dialogues()]
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode()
    out.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    return {kind: sum(d["kind"] == kind for d in docs) for kind in ("book", "chat")}


def load_corpus(path: Path = CORPUS_FILE) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_FILE)
    args = parser.parse_args(argv)
    counts = build(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {counts}")


if __name__ == "__main__":
    main()

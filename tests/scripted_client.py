"""A stand-in for LongCatClient in the CLI's tests: `scripted_client(chunks)` is a client class whose every stream
yields those GenerationChunks (monkeypatch it over longcat_service.client.cli.LongCatClient)."""

from __future__ import annotations

from contextlib import nullcontext


def scripted_client(chunks: list) -> type:
    class ScriptedClient:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate_stream(self, **kwargs):
            return nullcontext(list(chunks))

    return ScriptedClient

"""Shared fixtures: tiny HF LongCat-Flash checkpoints, written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name, sharded=False) -> directory of a saved tiny HF model (see tests/hf_tiny.py)."""
    cache = {}

    def get(name: str = "base", sharded: bool = False):
        key = (name, sharded)
        if key not in cache:
            from tests.hf_tiny import build_hf_model, save_hf_model

            out = tmp_path_factory.mktemp(f"tiny_{name}{'_sharded' if sharded else ''}")
            cache[key] = save_hf_model(build_hf_model(name), out, max_shard_size="40KB" if sharded else None)
        return cache[key]

    return get

"""Shared fixtures: tiny HF LongCat-Flash checkpoints, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels decide interpreter mode when their module is first imported, and collection imports every
# test module (GPU-only ones too) before any test runs: on a machine without a GPU, set it before all of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (the README's test command): each worker is a process with torch's intra-op pool sized for the whole
# machine, so N workers oversubscribe the cores (a 0.5 s test took 30 s at -n 2 on two busy cores, 0.4 s with this):
# share the cores out, in this process and (through OMP_NUM_THREADS) in the servers and ranks it starts.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests that use the default model were written around the random tiny demo (text that never stops early);
# tests/test_demo_trained.py names the trained checkpoint explicitly. Subprocesses inherit this.
os.environ.setdefault("LONGCAT_DEMO_MODEL", "random")


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: torch's intra-op thread pool costs more than it saves (ms per softmax on a loaded CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def few_mla_decode_splits(monkeypatch):
    """Whole models through the interpreted MLA decode kernels with 4 splits, not 32 (tests/decode_splits.py: the
    same outputs for rows up to 128 tokens, 8x fewer interpreted programs)."""
    from tests.decode_splits import cap_mla_decode_splits

    cap_mla_decode_splits(monkeypatch.setattr)

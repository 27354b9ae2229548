"""Sharded loading: each tensor-parallel rank reads only its own slices of the safetensors files.

The loader's safe_open is wrapped so that every `get_slice(key)[index]` is recorded; a rank's reads of a
sharded tensor must be exactly its block along the split dimension, the ranks' blocks must tile the tensor, and
no rank may read a whole tensor of a sharded kind (nor call get_tensor)."""

from __future__ import annotations

import re

import pytest
from safetensors import safe_open as real_safe_open

from longcat_service.distributed import parallel_state
from longcat_service.model import loader
from tests.hf_tiny import build_hf_model, save_hf_model

# key pattern -> split dimension (everything else is replicated and read whole by every rank)
SHARDED = {
    r"\.(q_b_proj|kv_b_proj)\.weight$": 0, r"\.o_proj\.weight$": 1,
    r"mlps\.\d\.(gate|up)_proj\.weight$": 0, r"mlps\.\d\.down_proj\.weight$": 1,
    r"experts\.\d+\.(gate|up)_proj\.weight$": 0, r"experts\.\d+\.down_proj\.weight$": 1,
    r"^model\.embed_tokens\.weight$": 0, r"^lm_head\.weight$": 0,
}  # fmt: skip


def split_dim(key: str) -> int | None:
    return next((dim for pattern, dim in SHARDED.items() if re.search(pattern, key)), None)


class RecordingSlice:
    def __init__(self, inner, key, reads):
        self.inner, self.key, self.reads = inner, key, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        shape = self.inner.get_shape()
        index = index if isinstance(index, tuple) else (index,)
        ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=False)) + tuple(
            (0, n) for n in shape[len(index):])
        out = self.inner[index]
        self.reads.append((self.key, ranges, out.numel() * out.element_size()))
        return out


class RecordingFile:
    def __init__(self, path, reads, **kwargs):
        self.ctx, self.reads = real_safe_open(path, **kwargs), reads

    def __enter__(self):
        self.f = self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_slice(self, key):
        return RecordingSlice(self.f.get_slice(key), key, self.reads)

    def get_tensor(self, key):
        raise AssertionError(f"get_tensor({key!r}) reads a whole tensor")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # vocab 97 splits unevenly; sharded files so the loader opens several
    model = build_hf_model("base", vocab_size=97, ffn_hidden_size=40, expert_ffn_hidden_size=12)
    return save_hf_model(model, tmp_path_factory.mktemp("tp_load"), max_shard_size="40KB")


def reads_of_rank(monkeypatch, checkpoint, rank: int, world: int):
    reads = []
    monkeypatch.setattr(parallel_state, "_TP_RANK", rank)
    monkeypatch.setattr(parallel_state, "_TP_SIZE", world)
    monkeypatch.setattr(loader, "safe_open", lambda path, **kw: RecordingFile(path, reads, **kw))
    loader.load_model(checkpoint, dtype="float32", device="cpu")
    return reads


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_slices(monkeypatch, checkpoint, world):
    per_rank = [reads_of_rank(monkeypatch, checkpoint, r, world) for r in range(world)]
    for reads in per_rank:
        keys = [k for k, _, _ in reads]
        assert len(keys) == len(set(keys)), "a tensor was read twice"
    total_bytes = {}
    for rank, reads in enumerate(per_rank):
        for key, ranges, nbytes in reads:
            dim = split_dim(key)
            if dim is None:
                assert all(lo == 0 for lo, _ in ranges), f"rank {rank} read part of replicated {key}"
                continue
            full = ranges[dim]
            others = [r for d, r in enumerate(ranges) if d != dim]
            assert all(lo == 0 for lo, _ in others), f"rank {rank}: {key} split on more than dim {dim}"
            total_bytes.setdefault(key, []).append((rank, full, nbytes))
    for key, parts in total_bytes.items():
        parts.sort()
        assert [r for r, _, _ in parts] == list(range(world)), f"{key}: not read by every rank once"
        # the ranks' blocks tile [0, n) in rank order, with no overlap (the last one may be short: vocab 97)
        bounds = [b for _, b, _ in parts]
        assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        widths = {hi - lo for lo, hi in bounds[:-1]}
        assert len(widths) == 1 and bounds[-1][1] - bounds[-1][0] <= widths.pop(), f"{key}: uneven blocks {bounds}"
    assert any("embed_tokens" in k for k in total_bytes) and any("experts" in k for k in total_bytes)
    # bytes: sharded tensors cost each rank ~1/world of their size
    sharded_full = sum(n for parts in total_bytes.values() for _, _, n in parts)
    for rank, reads in enumerate(per_rank):
        mine = sum(n for k, _, n in reads if split_dim(k) is not None)
        assert mine <= sharded_full / world * 1.05, f"rank {rank} read {mine} of {sharded_full} sharded bytes"


def test_single_rank_reads_every_tensor_whole(monkeypatch, checkpoint):
    reads = reads_of_rank(monkeypatch, checkpoint, 0, 1)
    shapes = {}
    for file in checkpoint.glob("*.safetensors"):
        with real_safe_open(str(file), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert {k for k, _, _ in reads} == set(shapes)
    for key, ranges, _ in reads:
        assert ranges == tuple((0, n) for n in shapes[key]), key

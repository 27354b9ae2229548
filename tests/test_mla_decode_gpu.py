"""MLA decode attention on CUDA at LongCat-Flash shapes (kv_lora_rank 512, rope 64, v_head 128): the MQA kernels
and the 16-head ones (each forced with LONGCAT_MLA_DECODE_KERNEL) against the pure-PyTorch
reference, for every caller's case: decode batches 1 / 16 / 64 / 128 (one split: stage 1 writes the output), 64
heads and the 8 / 16 of a tensor-parallel rank, pages of 16 and 64 tokens, padded rows (seq_len 0), odd lengths,
the MTP cache's first_pos 1, with and without the fused W_UV merge, and CUDA-graph replay with new lengths."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RANK, ROPE, DV, SCALE = 512, 64, 128, 0.0722
TOL = 1e-2  # as tests/test_gpu_twins.py at these shapes (bf16 cache and output)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(batch, heads, block_size, max_len, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    per_row = -(-max_len // block_size)
    cache = torch.randn(batch * per_row + 3, block_size, RANK + ROPE, device="cuda", generator=gen).bfloat16()
    tables = torch.randperm(cache.shape[0], device="cuda", generator=gen)[: batch * per_row].view(batch, per_row)
    q_lat = torch.randn(batch, heads, RANK, device="cuda", generator=gen).bfloat16()
    q_rope = torch.randn(batch, heads, ROPE, device="cuda", generator=gen).bfloat16()
    w_kv_b = (torch.randn(heads, 128 + DV, RANK, device="cuda", generator=gen) * 0.05).bfloat16()
    return q_lat, q_rope, cache, tables.int(), w_kv_b[:, 128:, :]  # W_UV strided like fast_decode's view


def _lens(batch, max_len, first_pos, seed):
    """Odd random lengths up to max_len, a padded row (0) and a shortest row."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(first_pos + 1, max_len + 1, (batch,), generator=gen)
    lens[0] = max_len
    if batch > 1:
        lens[1] = 0
    if batch > 2:
        lens[2] = 1 + first_pos
    return lens.int().cuda()


@pytest.mark.parametrize("kernel", ["new", "old"])
@pytest.mark.parametrize("batch,heads,block_size,first_pos", [
    (1, 64, 16, 0), (16, 64, 64, 0), (64, 64, 16, 0), (128, 64, 16, 0), (64, 64, 64, 1), (4, 64, 16, 1),
    (64, 8, 16, 0), (16, 16, 64, 1), (1, 8, 64, 0),
])
def test_mla_decode_matches_reference_at_longcat_shapes(monkeypatch, kernel, batch, heads, block_size, first_pos):
    from longcat_service.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_uv_reference

    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", kernel)
    for max_len in (513, 4093):
        q_lat, q_rope, cache, tables, w_uv = _case(batch, heads, block_size, max_len, batch + heads + max_len)
        seq = _lens(batch, max_len, first_pos, batch * 7 + max_len)
        args = (q_lat, q_rope, cache, tables, seq, SCALE)
        out = mla_decode(*args, first_pos=first_pos)
        ref = mla_decode_reference(*args, first_pos=first_pos)
        assert torch.isfinite(out).all() and _rel(out, ref) < TOL, max_len
        out_uv = mla_decode(*args, w_uv=w_uv, first_pos=first_pos)
        ref_uv = mla_decode_uv_reference(*args, w_uv=w_uv, first_pos=first_pos)
        assert _rel(out_uv, ref_uv) < TOL, max_len
        if batch > 1:
            assert (out[1] == 0).all() and (out_uv[1] == 0).all()


@pytest.mark.parametrize("batch", [1, 16, 64, 128])
def test_mla_decode_graph_replays_with_new_lengths(batch):
    """Captured once, replayed with other lengths (also all-padding and first_pos 1): grids and split counts are
    fixed by the batch, the kernels read the lengths from device memory."""
    from longcat_service.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_uv_reference

    max_len = 1000
    q_lat, q_rope, cache, tables, w_uv = _case(batch, 64, 16, max_len, batch)
    for first_pos in (0, 1):
        seq = _lens(batch, max_len, first_pos, batch)
        args = (q_lat, q_rope, cache, tables, seq, SCALE)
        for uv in (None, w_uv):
            mla_decode(*args, w_uv=uv, first_pos=first_pos)  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = mla_decode(*args, w_uv=uv, first_pos=first_pos)
            for seed in (1, 2, None):
                seq.copy_(_lens(batch, max_len, first_pos, seed) if seed else torch.zeros_like(seq))
                graph.replay()
                torch.cuda.synchronize()
                if seed is None:
                    assert (captured == 0).all()
                    continue
                ref = (mla_decode_reference(*args, first_pos=first_pos) if uv is None
                       else mla_decode_uv_reference(*args, w_uv=uv, first_pos=first_pos))
                assert _rel(captured, ref) < TOL, (first_pos, uv is not None, seed)


@pytest.mark.parametrize("kernel", ["new", "old"])
@pytest.mark.parametrize("batch,heads,block_size,first_pos", [
    (1, 64, 16, 0), (16, 64, 64, 0), (64, 64, 16, 0), (63, 64, 16, 1), (128, 64, 16, 0), (16, 8, 16, 0),
])
def test_mla_decode_kernels_replay_and_are_deterministic_at_longcat_shapes(monkeypatch, kernel, batch, heads,
                                                                           block_size, first_pos):
    """Both kernel families at the real widths (the MQA stage 1 at its 64-token, 3-stage tile) equal the reference
    with and without W_UV, eager and replayed in a CUDA graph with new lengths, and repeat their output bit for
    bit."""
    from longcat_service.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_uv_reference

    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", kernel)
    max_len = 1500
    q_lat, q_rope, cache, tables, w_uv = _case(batch, heads, block_size, max_len, batch + heads)
    seq = _lens(batch, max_len, first_pos, batch)
    args = (q_lat, q_rope, cache, tables, seq, SCALE)
    for uv in (None, w_uv):
        out = mla_decode(*args, w_uv=uv, first_pos=first_pos)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = mla_decode(*args, w_uv=uv, first_pos=first_pos)
        for seed in (None, 7):
            if seed is not None:
                seq.copy_(_lens(batch, max_len, first_pos, seed))
            graph.replay()
            torch.cuda.synchronize()
            ref = (mla_decode_reference(*args, first_pos=first_pos) if uv is None
                   else mla_decode_uv_reference(*args, w_uv=uv, first_pos=first_pos))
            assert torch.isfinite(captured).all() and _rel(captured, ref) < TOL, (uv is not None, seed)
        seq.copy_(_lens(batch, max_len, first_pos, batch))
        assert _rel(out, mla_decode(*args, w_uv=uv, first_pos=first_pos)) == 0  # deterministic


@pytest.mark.parametrize("n,heads", [(1, 64), (4, 64), (8, 8)])
def test_mla_prep_absorb_at_longcat_shapes(n, heads):
    """mla_prep_absorb = mla_prep then the W_UK bmm (fast_decode's path without it) at the real widths (nope 128,
    rope 64, rank 512), W_UK a strided view of kv_b_proj's weight; the same cache entries."""
    from longcat_service.kernels.mla_prep import mla_prep, mla_prep_absorb

    gen = torch.Generator(device="cuda").manual_seed(n + heads)
    q = torch.randn(n, heads, 128 + ROPE, device="cuda", generator=gen).bfloat16()
    kv_a = torch.randn(n, RANK + ROPE, device="cuda", generator=gen).bfloat16()
    ang = torch.randn(n, ROPE // 2, device="cuda", generator=gen)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    w = (1 + 0.1 * torch.randn(RANK, device="cuda", generator=gen)).bfloat16()
    w_uk = (torch.randn(heads, 128 + DV, RANK, device="cuda", generator=gen) * 0.05).bfloat16()[:, :128, :]
    slots = torch.arange(n, device="cuda") * 3 - int(n > 1)  # the first row a padding slot (-1) when n > 1
    caches = [torch.zeros(8, 16, RANK + ROPE, device="cuda").bfloat16() for _ in range(2)]
    q_lat, q_pe = mla_prep_absorb(q, kv_a, cos, sin, w, 1e-6, 0.5, 3.0, slots, caches[0], ROPE, w_uk)
    q_ref = mla_prep(q, kv_a, cos, sin, w, 1e-6, 0.5, 3.0, slots, caches[1], ROPE)
    lat_ref = torch.bmm(q_ref[..., :128].transpose(0, 1), w_uk).transpose(0, 1)
    assert _rel(q_lat, lat_ref) < 5e-3 and _rel(q_pe, q_ref[..., 128:]) < 1e-3  # the same rounding steps as mla_prep
    assert _rel(caches[0], caches[1]) < 1e-3 and torch.equal(caches[0] == 0, caches[1] == 0)

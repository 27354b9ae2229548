"""LONGCAT_PREFILL_ATTN=sdpa: the F.scaled_dot_product_attention prefill equals the eager S x S path."""

from __future__ import annotations

import pytest
import torch

from longcat_service.layers import paged_attention as pa
from longcat_service.model.attention_metadata import AttentionMetadata

H, DN, DR, DV, R, BS = 4, 16, 8, 12, 24, 4
SCALE = (DN + DR) ** -0.5


def _setup(query_lens, seq_lens, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // BS) for s in seq_lens]
    perm = torch.randperm(sum(blocks_per_seq) + 3, generator=g).tolist()  # scattered blocks
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(perm[start : start + n])
        start += n
    cache = torch.randn(len(perm), BS, R + DR, generator=g).to(dtype)
    w = (torch.randn(H * (DN + DV), R, generator=g) * 0.3).to(dtype)
    plan = pa.build_attention_plan(AttentionMetadata.build(query_lens, seq_lens, tables, BS))
    qs = [torch.randn(q, H, DN + DR, generator=g).to(dtype) for q in query_lens]
    return cache, w, plan, qs


@pytest.mark.parametrize("pad_v", [False, True])
def test_sdpa_matches_eager_for_whole_prompts_and_chunks(pad_v):
    # seq 0: whole prompt (causal); seq 1: a 5-token chunk after 9 cached tokens (bottom-right mask).
    cache, w, plan, qs = _setup([7, 5], [7, 14])
    for seg, q in zip(plan.prefills, qs, strict=True):
        eager = pa.prefill_attention(q, cache, seg, w, H, DN, DV, SCALE)
        sdpa = pa.prefill_attention_sdpa(q, cache, seg, w, H, DN, DV, SCALE, pad_v=pad_v)
        assert sdpa.shape == (q.shape[0], H, DV)
        torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_chunk_rows_see_exactly_their_causal_prefix():
    # Changing a key past query 0's position must not move query 0's output, but must move the last query's.
    cache, w, plan, qs = _setup([3], [10])
    seg, q = plan.prefills[0], qs[0]
    base = pa.prefill_attention_sdpa(q, cache, seg, w, H, DN, DV, SCALE)
    last_slot = int(seg.slots[-1])
    cache.view(-1, R + DR)[last_slot] += 5.0
    moved = pa.prefill_attention_sdpa(q, cache, seg, w, H, DN, DV, SCALE)
    torch.testing.assert_close(moved[:2], base[:2], rtol=0, atol=0)
    assert (moved[2] - base[2]).abs().max() > 1e-3


def test_env_switch_routes_prefill_attention(monkeypatch):
    cache, w, plan, qs = _setup([6], [6], dtype=torch.bfloat16)
    seg, q = plan.prefills[0], qs[0]
    monkeypatch.setenv("LONGCAT_PREFILL_ATTN", "sdpa")
    via_env = pa.prefill_attention(q, cache, seg, w, H, DN, DV, SCALE)
    torch.testing.assert_close(via_env, pa.prefill_attention_sdpa(q, cache, seg, w, H, DN, DV, SCALE), rtol=0, atol=0)
    monkeypatch.setenv("LONGCAT_PREFILL_ATTN", "eager")  # explicit: unset means triton on CUDA tensors
    eager = pa.prefill_attention(q, cache, seg, w, H, DN, DV, SCALE)
    torch.testing.assert_close(via_env, eager, rtol=3e-2, atol=3e-2)  # bf16: rounding of scores/probs differs
    monkeypatch.setenv("LONGCAT_PREFILL_ATTN", "flash3")
    with pytest.raises(ValueError, match="LONGCAT_PREFILL_ATTN"):
        pa.prefill_attention(q, cache, seg, w, H, DN, DV, SCALE)


def test_sdpa_gets_4d_inputs_so_fused_kernels_are_eligible(monkeypatch):
    """PyTorch's flash / memory-efficient kernels reject 3-D inputs and silently run the fp32 math fallback
    (seen on the H200); the prefill must hand SDPA [batch, heads, seq, dim] tensors, mask included."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.dim(), k.dim(), v.dim(), None if attn_mask is None else attn_mask.dim()))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(pa.F, "scaled_dot_product_attention", spy)
    cache, w, plan, qs = _setup([6, 3], [6, 9])
    for q, seg in zip(qs, plan.prefills, strict=True):
        pa.prefill_attention_sdpa(q, cache, seg, w, H, DN, DV, SCALE)
    assert seen == [(4, 4, 4, None), (4, 4, 4, 3)]  # a whole prompt (causal), then a chunk with its mask

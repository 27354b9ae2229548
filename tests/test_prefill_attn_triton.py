"""LONGCAT_PREFILL_ATTN=triton: the flash-attention prefill kernel equals the eager S x S prefill_attention.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before any
kernel module is imported), on CPU tensors routed through it as tests/test_kernels.py does for decode; sizes
stay tiny because the interpreter is slow. The `gpu` twin at the bottom runs MLA shapes on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels.prefill_attn import prefill_attn, prefill_attn_reference  # noqa: E402
from longcat_service.layers import paged_attention as pa  # noqa: E402

# dqk = 24 is no power of two (a 16-wide dot plus a masked 8-of-16 tail, as 192 = 128 + 64); dv = 12 is padded.
DN, DR, DV, R = 16, 8, 12, 20
# relative; the interpreter truncates fp32 -> bf16 and both paths round their probabilities to bf16
BF16_TOL = 3 * 2**-7


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _segment(num_queries, seq_len, heads, dtype, device="cpu", seed=0, dn=DN, dr=DR, dv=DV, rank=R):
    """One sequence's paged context (scattered slots), its kv_b_proj weight and queries -> the prefill args."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(seq_len + 7, 1, rank + dr, generator=g).to(dtype).to(device)  # block_size 1
    slots = torch.randperm(seq_len + 7, generator=g)[:seq_len].to(device)
    key_pos = torch.arange(seq_len, device=device)
    allowed = key_pos[None, :] <= torch.arange(seq_len - num_queries, seq_len, device=device)[:, None]
    seg = pa.PrefillSegment(0, num_queries, slots, allowed)
    w = (torch.randn(heads * (dn + dv), rank, generator=g) * 0.3).to(dtype).to(device)
    q = torch.randn(num_queries, heads, dn + dr, generator=g).to(dtype).to(device)
    return q, cache, seg, w, (heads, dn, dv, (dn + dr) ** -0.5)


def _eager_and_triton(monkeypatch, q, cache, seg, w, dims):
    monkeypatch.delenv("LONGCAT_PREFILL_ATTN", raising=False)
    eager = pa.prefill_attention(q, cache, seg, w, *dims)
    monkeypatch.setenv("LONGCAT_PREFILL_ATTN", "triton")
    if not ON_GPU:  # route CPU tensors through the interpreted kernel
        monkeypatch.setattr(pa, "fast_path_enabled", lambda t: True)
    return eager, pa.prefill_attention(q, cache, seg, w, *dims)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_queries,seq_len,heads",
    [
        (70, 70, 3),  # a whole prompt (default tiles: one partly filled query tile, two key blocks), 3 heads
        (130, 131, 2),  # bf16 tiles 128x64: the first tile's last row sees key 128, a new key block
        (5, 13, 5),  # a chunk after 8 cached tokens, both sizes below one block
        (1, 33, 3),  # one query row at the end of a context longer than a key block
        (20, 90, 1),  # a chunk whose tile starts past the first key block: unmasked blocks, then diagonal
    ],
)
def test_triton_prefill_matches_eager(monkeypatch, dtype, num_queries, seq_len, heads):
    q, cache, seg, w, dims = _segment(num_queries, seq_len, heads, dtype, seed=num_queries + seq_len)
    eager, ours = _eager_and_triton(monkeypatch, q, cache, seg, w, dims)
    assert ours.shape == eager.shape == (num_queries, heads, DV) and ours.dtype == dtype
    assert torch.isfinite(ours).all()
    assert _rel(ours, eager) < (1e-5 if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (32, 16)])
def test_tile_sizes_and_mla_head_dims(block_m, block_n):
    """Small tiles put many key blocks on both sides of the diagonal; dqk 192 = 128 + 64 and dv 128 are MLA's."""
    g = torch.Generator().manual_seed(block_m + block_n)
    # (20, 34) and (20, 21) put a tile's first or last visible key exactly at a block edge (off-by-one traps)
    for num_queries, seq_len in ((37, 37), (21, 58), (20, 34), (20, 21)):
        q = torch.randn(num_queries, 2, 192, generator=g)
        k, v = torch.randn(seq_len, 2, 192, generator=g), torch.randn(seq_len, 2, 128, generator=g)
        ref = prefill_attn_reference(q, k, v, 192**-0.5)
        assert _rel(prefill_attn(q, k, v, 192**-0.5, block_m=block_m, block_n=block_n), ref) < 1e-5
    # the 64-bit K/V offsets that contexts past ~170K keys (64 heads) switch to
    assert _rel(prefill_attn(q, k, v, 192**-0.5, block_m=block_m, block_n=block_n, wide_offsets=True), ref) < 1e-5


def test_causal_rows_see_exactly_their_prefix():
    """Changing key j (and its value) moves exactly the queries whose window reaches j."""
    num_queries, seq_len, heads, dqk, dv = 9, 30, 3, 24, 12
    g = torch.Generator().manual_seed(11)
    q = torch.randn(num_queries, heads, dqk, generator=g)
    k, v = torch.randn(seq_len, heads, dqk, generator=g), torch.randn(seq_len, heads, dv, generator=g)
    base = prefill_attn(q, k, v, 0.4, block_m=16, block_n=16)
    j = 25  # visible from query 4 on (query i sees keys <= 21 + i)
    k2, v2 = k.clone(), v.clone()
    k2[j] += 3.0
    v2[j] -= 5.0
    moved = prefill_attn(q, k2, v2, 0.4, block_m=16, block_n=16)
    torch.testing.assert_close(moved[:4], base[:4], rtol=0, atol=0)
    assert ((moved[4:] - base[4:]).abs().amax(dim=(1, 2)) > 1e-3).all()


def test_triton_backend_falls_back_to_eager_off_gpu(monkeypatch):
    q, cache, seg, w, dims = _segment(6, 6, 2, torch.float32)
    eager = pa.prefill_attention(q, cache, seg, w, *dims)
    monkeypatch.setenv("LONGCAT_PREFILL_ATTN", "triton")
    monkeypatch.setattr(pa, "fast_path_enabled", lambda t: False)  # a CPU tensor in production
    torch.testing.assert_close(pa.prefill_attention(q, cache, seg, w, *dims), eager, rtol=0, atol=0)


def test_rejects_bad_shapes():
    q, k, v = torch.randn(5, 2, 24), torch.randn(4, 2, 24), torch.randn(4, 2, 12)
    with pytest.raises(ValueError, match="queries"):
        prefill_attn(q, k, v, 1.0)
    with pytest.raises(ValueError, match="head dims"):
        prefill_attn(q[:3], k[..., :16], v, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_queries,seq_len", [(1000, 1000), (300, 1311), (70, 70), (5, 13)])
def test_gpu_mla_shapes_match_eager(monkeypatch, dtype, num_queries, seq_len):
    """LongCat-Flash's per-rank attention shapes (qk_nope 128 + rope 64, v 128, latent 512) on CUDA."""
    q, cache, seg, w, dims = _segment(num_queries, seq_len, 16, dtype, "cuda", seed=seq_len, dn=128, dr=64,
                                      dv=128, rank=512)
    q, w = q * 0.5, w * 0.15  # realistic score spread (peaked but not one-hot softmax rows)
    eager, ours = _eager_and_triton(monkeypatch, q, cache, seg, w, dims)
    # fp32: ieee dots in the kernel, eager fp32 matmuls without tf32; bf16: both round probabilities to bf16
    assert _rel(ours, eager) < (1e-4 if dtype == torch.float32 else 1e-2)

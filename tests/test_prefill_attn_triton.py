"""The Triton flash-attention prefill (the default prefill attention on CUDA) equals the eager S x S path.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before any
kernel module is imported), on CPU tensors routed through it as tests/test_kernels.py does for decode; sizes
stay tiny because the interpreter is slow. On a GPU the same tests build their tensors on CUDA; the `gpu`
tests at the bottom add LongCat-Flash's per-rank shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.config import ModelConfig  # noqa: E402
from longcat_service.kernels import fast_path_enabled as FAST_PATH_ENABLED  # noqa: E402
from longcat_service.kernels.prefill_attn import (  # noqa: E402
    prefill_attn,
    prefill_attn_mla,
    prefill_attn_mla_reference,
    prefill_attn_reference,
)
from longcat_service.layers import paged_attention as pa  # noqa: E402
from longcat_service.layers.attention_metadata import AttentionMetadata  # noqa: E402
from longcat_service.layers.mla_attention import MLAAttention  # noqa: E402
from longcat_service.layers.rotary import RotaryEmbedding  # noqa: E402
from longcat_service.model.kv_cache import allocate_kv_caches  # noqa: E402
from longcat_service.model.loader import load_model  # noqa: E402
from tests.tiny_config import TINY_CONFIG  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# dqk = 24: a 16-wide nope dot plus an 8-wide rope dot padded to 16 (as 192 = 128 + 64); dv = 12 is padded.
DN, DR, DV, R = 16, 8, 12, 20
# relative; the interpreter truncates fp32 -> bf16 and both paths round their probabilities to bf16
BF16_TOL = 3 * 2**-7
# fp32: the kernel's fp32 dots are "ieee" (FMA, not tf32) on the GPU too, and the references use fp32 matmuls
# (PyTorch's default keeps tf32 off), so fp32 results agree to fp32 rounding on both machines.
FP32_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _segment(num_queries, seq_len, heads, dtype, device=DEVICE, seed=0, dn=DN, dr=DR, dv=DV, rank=R):
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


def _route_cpu_through_interpreter(monkeypatch):
    """The default backend: CPU tensors take the Triton path (interpreted) wherever a CUDA tensor would."""
    monkeypatch.setattr(pa, "fast_path_enabled", FAST_PATH_ENABLED if ON_GPU else lambda t: True)


def _eager_prefill(monkeypatch):
    """The eager backend, as without Triton (CPU tensors or LONGCAT_DISABLE_TRITON=1); only the prefill attention."""
    monkeypatch.setattr(pa, "fast_path_enabled", lambda t: False)


def _eager_and_triton(monkeypatch, q, cache, seg, w, dims):
    _eager_prefill(monkeypatch)
    eager = pa.prefill_attention(q, cache, seg, w, *dims)
    _route_cpu_through_interpreter(monkeypatch)
    assert pa.prefill_attention_backend(q) == "triton"
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
    assert _rel(ours, eager) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (32, 16)])
def test_tile_sizes_and_mla_head_dims(block_m, block_n):
    """Small tiles put many key blocks on both sides of the diagonal; dqk 192 = 128 + 64 and dv 128 are MLA's."""
    g = torch.Generator().manual_seed(block_m + block_n)
    # (20, 34) and (20, 21) put a tile's first or last visible key exactly at a block edge (off-by-one traps)
    for num_queries, seq_len in ((37, 37), (21, 58), (20, 34), (20, 21)):
        q = _randn(g, num_queries, 2, 192)
        k, v = _randn(g, seq_len, 2, 192), _randn(g, seq_len, 2, 128)
        ref = prefill_attn_reference(q, k, v, 192**-0.5)
        assert _rel(prefill_attn(q, k, v, 192**-0.5, block_m=block_m, block_n=block_n), ref) < FP32_TOL
    # the 64-bit K/V offsets that contexts past ~131K keys (64 heads) switch to
    ours = prefill_attn(q, k, v, 192**-0.5, block_m=block_m, block_n=block_n, wide_offsets=True)
    assert _rel(ours, ref) < FP32_TOL


def _mla_operands(g, num_queries, seq_len, heads, dn, dr, dv, rank, dtype):
    """MLA's operands as the prefill path holds them: q one [Q, h, dn+dr] tensor (nope / rope: views), k_nope
    and v views of one [S, h*(dn+dv)] GEMM output, the rope key a [S, dr] view of the gathered cache entries."""
    q = _randn(g, num_queries, heads, dn + dr, dtype=dtype)
    kv = _randn(g, seq_len, heads * (dn + dv), dtype=dtype).view(seq_len, heads, dn + dv)
    entries = _randn(g, seq_len, rank + dr, dtype=dtype)
    return q[..., :dn], q[..., dn:], kv[..., :dn], entries[:, rank:], kv[..., dn:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_queries,seq_len,dims",
    [
        ((37, 37, (128, 64, 128, 32))),  # MLA dims (dqk 192 = 128 + 64 dots, dv 128), a whole odd-sized prompt
        ((9, 50, (128, 64, 128, 32))),  # MLA dims, a chunk after 41 cached tokens
        ((1, 19, (128, 64, 128, 32))),  # a single query row
        ((23, 23, (16, 8, 12, 20))),  # padded rope (8 of 16) and v (12 of 16)
        ((3, 40, (24, 8, 8, 4))),  # a nope dim that is no power of two (24 of 32)
    ],
)
def test_mla_kernel_reads_strided_views_and_shared_rope_key(dtype, num_queries, seq_len, dims):
    dn, dr, dv, rank = dims
    g = torch.Generator().manual_seed(num_queries * seq_len + dn)
    ops = _mla_operands(g, num_queries, seq_len, 2, dn, dr, dv, rank, dtype)
    assert ops[3].dim() == 2 and not ops[2].is_contiguous()  # no broadcast over heads, no copy
    scale = (dn + dr) ** -0.5
    ref = prefill_attn_mla_reference(*ops, scale)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    ours = prefill_attn_mla(*ops, scale, block_m=16, block_n=16)
    assert ours.shape == (num_queries, 2, dv) and ours.dtype == dtype
    assert _rel(ours, ref) < tol
    assert _rel(prefill_attn_mla(*ops, scale, block_m=16, block_n=16, wide_offsets=True), ref) < tol
    # a per-head rope key [S, h, dr] is the same attention
    per_head = ops[3][:, None, :].expand(-1, 2, -1)
    assert _rel(prefill_attn_mla(*ops[:3], per_head, ops[4], scale, block_m=16, block_n=16), ref) < tol
    # out=: rows of a larger destination, written in place, the rest untouched
    dest = torch.full((num_queries + 4, 2, dv), 7.0, dtype=dtype, device=DEVICE)
    got = prefill_attn_mla(*ops, scale, block_m=16, block_n=16, out=dest[2 : 2 + num_queries])
    assert got.data_ptr() == dest[2].data_ptr() and _rel(dest[2 : 2 + num_queries], ref) < tol
    assert (dest[:2] == 7.0).all() and (dest[2 + num_queries :] == 7.0).all()


def test_causal_rows_see_exactly_their_prefix():
    """Changing key j (and its value) moves exactly the queries whose window reaches j."""
    num_queries, seq_len, heads, dqk, dv = 9, 30, 3, 24, 12
    g = torch.Generator().manual_seed(11)
    q = _randn(g, num_queries, heads, dqk)
    k, v = _randn(g, seq_len, heads, dqk), _randn(g, seq_len, heads, dv)
    base = prefill_attn(q, k, v, 0.4, block_m=16, block_n=16)
    j = 25  # visible from query 4 on (query i sees keys <= 21 + i)
    k2, v2 = k.clone(), v.clone()
    k2[j] += 3.0
    v2[j] -= 5.0
    moved = prefill_attn(q, k2, v2, 0.4, block_m=16, block_n=16)
    torch.testing.assert_close(moved[:4], base[:4], rtol=0, atol=0)
    assert ((moved[4:] - base[4:]).abs().amax(dim=(1, 2)) > 1e-3).all()


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setattr(pa, "fast_path_enabled", lambda t: t.is_cuda)  # as in production with triton installed
    assert pa.prefill_attention_backend(cpu) == "eager"  # the CPU path: the reference
    assert pa.prefill_attention_backend() == "eager"
    monkeypatch.setattr(pa, "fast_path_enabled", lambda t: True)  # a CUDA tensor
    assert pa.prefill_attention_backend(cpu) == "triton"


def test_rejects_bad_shapes():
    q, k, v = torch.randn(5, 2, 24), torch.randn(4, 2, 24), torch.randn(4, 2, 12)
    with pytest.raises(ValueError, match="queries"):
        prefill_attn(q, k, v, 1.0)
    with pytest.raises(ValueError, match="head dims"):
        prefill_attn(q[:3], k[..., :16], v, 1.0)
    qn, qr, kn, kr = torch.randn(3, 2, 16), torch.randn(3, 2, 8), torch.randn(4, 2, 16), torch.randn(4, 8)
    with pytest.raises(ValueError, match="disagree"):
        prefill_attn_mla(qn, qr, kn, kr[:, :4], v, 1.0)  # rope dims differ
    with pytest.raises(ValueError, match="disagree"):
        prefill_attn_mla(qn, qr, kn, kr[:3], v, 1.0)  # rope key for 3 of 4 keys
    with pytest.raises(ValueError, match="dtypes"):
        prefill_attn_mla(qn, qr, kn, kr.double(), v, 1.0)
    with pytest.raises(ValueError, match="unit last stride"):
        prefill_attn_mla(qn, qr, kn, torch.randn(4, 16)[:, ::2], v, 1.0)
    with pytest.raises(ValueError, match="out"):
        prefill_attn_mla(qn, qr, kn, kr, v, 1.0, out=torch.empty(3, 2, 8))


# A layer with the prefill kernel's dims: qk_nope 16 + rope 8 (dqk 24), v 12, latent 20, 3 heads; q_scale =
# sqrt(64 / 32) is no power of two, so rounding q * q_scale in the model dtype (mla_prep does, as eager and
# transformers) is visible in bf16.
LAYER = {**TINY_CONFIG, "num_attention_heads": 3, "qk_nope_head_dim": DN, "qk_rope_head_dim": DR,
         "head_dim": DR, "v_head_dim": DV, "kv_lora_rank": R}  # fmt: skip
# MLA's per-head dims (qk_nope 128, rope 64, v 128, latent 512) on a narrow layer
LAYER_MLA = {**TINY_CONFIG, "num_attention_heads": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
             "head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512}  # fmt: skip
BS = 4


def _layer_case(config_dict, dtype, query_lens, seq_lens, seed, fused_a):
    config = ModelConfig.from_dict(config_dict)
    attn = MLAAttention(config, dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else 1
            init = 1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else torch.randn(
                p.shape, generator=g) * fan_in**-0.5
            p.copy_(init.to(dtype))
    attn = attn.to(DEVICE)
    if fused_a:
        attn.fuse_a_projections()  # kv_a reaches mla_prep as a row-strided view
    blocks = [-(-s // BS) for s in seq_lens]
    perm = torch.randperm(sum(blocks) + 3, generator=g).tolist()  # scattered blocks
    tables = [perm[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(blocks))]
    width = config.kv_lora_rank + config.qk_rope_head_dim
    cache = _randn(g, len(perm), BS, width, dtype=dtype)  # the cached context of chunks and decode rows
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, BS, DEVICE)
    plan = pa.build_attention_plan(meta)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens, strict=True)]).to(DEVICE)
    cos, sin = RotaryEmbedding(config).cos_sin(positions, dtype)
    x = _randn(g, len(positions), config.hidden_size, dtype=dtype)
    return attn, x, cos, sin, plan, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "config_dict,query_lens,seq_lens,fused_a",
    [
        # a whole prompt, a chunk after 7 cached tokens, a decode row, another whole prompt: one batch
        (LAYER, [9, 5, 1, 21], [9, 12, 10, 21], False),
        (LAYER, [2, 1, 17], [30, 6, 17], True),  # a 2-token chunk after 28 cached tokens; fused q_a/kv_a GEMM
        (LAYER_MLA, [11, 6], [11, 26], True),  # MLA dims: a whole prompt and a chunk
    ],
)
def test_layer_forward_with_triton_prefill_matches_eager(monkeypatch, dtype, config_dict, query_lens, seq_lens,
                                                         fused_a):
    """MLAAttention.forward: the Triton prefill path (mla_prep, q read in place, no K concatenation) against
    the eager layers, output and written cache, for a batch of several prefill segments (and decode rows)."""
    attn, x, cos, sin, plan, cache = _layer_case(config_dict, dtype, query_lens, seq_lens, sum(seq_lens), fused_a)
    eager_cache, triton_cache = cache.clone(), cache.clone()
    with torch.inference_mode():
        _eager_prefill(monkeypatch)
        eager = attn(x, cos, sin, plan, eager_cache)
        _route_cpu_through_interpreter(monkeypatch)
        calls = []
        real = attn._forward_triton_prefill
        monkeypatch.setattr(attn, "_forward_triton_prefill", lambda *a: calls.append(1) or real(*a))
        ours = attn(x, cos, sin, plan, triton_cache)
    assert calls == [1]  # the default backend took the Triton path
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert ours.shape == eager.shape and _rel(ours, eager) < tol
    assert _rel(triton_cache, eager_cache) < (1e-6 if dtype == torch.float32 else BF16_TOL)


def test_triton_prefill_path_concatenates_nothing(monkeypatch):
    """A prefill-only batch on the Triton path never calls torch.cat (no q or K concatenation, no cache-entry
    cat: mla_prep writes the cache)."""
    attn, x, cos, sin, plan, cache = _layer_case(LAYER, torch.float32, [7, 4], [7, 10], 5, False)
    _route_cpu_through_interpreter(monkeypatch)
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **kw: cats.append(1) or real_cat(*a, **kw))
    with torch.inference_mode():
        attn(x, cos, sin, plan, cache)
    assert cats == []


def _chunked_then_decode(model, config, dtype):
    """Two prompts prefilled in one batch, the first in two chunks (a whole 6-token chunk, then 5 tokens after
    the cached 6 next to the second prompt's 9), then one decode step of both; -> logits of every step."""
    caches = allocate_kv_caches(config, 10, BS, dtype, DEVICE)
    tables = [[3, 0, 7], [5, 1, 8]]
    ids = [[(11 * i + 5) % 128 for i in range(12)], [(7 * i + 3) % 128 for i in range(10)]]
    steps = [([6], [6], tables[:1], ids[0][:6], list(range(6))),
             ([5, 9], [11, 9], tables, ids[0][6:11] + ids[1][:9], list(range(6, 11)) + list(range(9))),
             ([1, 1], [12, 10], tables, [ids[0][11], ids[1][9]], [11, 9])]  # fmt: skip
    out = []
    with torch.inference_mode():
        for query_lens, seq_lens, tbl, tok, pos in steps:
            meta = AttentionMetadata.build(query_lens, seq_lens, tbl, BS, DEVICE)
            hidden = model(torch.tensor(tok, device=DEVICE), torch.tensor(pos, device=DEVICE), meta, caches)
            out.append(model.compute_logits(hidden))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_chunked_prefill_with_triton_matches_eager(monkeypatch, dtype):
    """The whole tiny model (q_a and kv_a in one GEMM): chunked prefill and several prompts in one batch
    through the Triton prefill path, then a decode step reading the cache it wrote, against eager."""
    config = ModelConfig.from_dict(TINY_CONFIG)
    model = load_model(config, dtype=dtype, device=DEVICE, load_format="dummy", seed=2)
    _eager_prefill(monkeypatch)
    eager = _chunked_then_decode(model, config, dtype)
    _route_cpu_through_interpreter(monkeypatch)
    calls = []
    real = MLAAttention._forward_triton_prefill
    monkeypatch.setattr(MLAAttention, "_forward_triton_prefill", lambda *a: calls.append(1) or real(*a))
    ours = _chunked_then_decode(model, config, dtype)
    assert len(calls) == 2 * 2 * config.num_layers  # two prefill steps, two attention sublayers per layer
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for a, b in zip(ours, eager, strict=True):
        assert _rel(a, b) < tol


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


def test_segment_lengths_are_not_specialized():
    """One compiled binary for every prompt / chunk length (see the comment on _prefill_fwd). Checked in a process
    without the CPU interpreter, where the kernel is the JITFunction the GPU runs."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from longcat_service.kernels import _prefill_attn_triton as P; "
            "print(sorted(P._prefill_fwd.do_not_specialize))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['num_queries', 'seq_len']"

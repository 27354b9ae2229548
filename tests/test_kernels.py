"""Triton kernels (longcat_service/kernels) against their pure-PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the kernel
modules are first imported); without triton the module is skipped. The interpreter rounds fp32 -> bf16
by truncation, so bf16 comparisons there allow a few bf16 ulps; fp32 comparisons are tight.
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
from longcat_service.kernels.mla_decode import mla_decode, mla_decode_reference  # noqa: E402
from longcat_service.kernels.mla_prep import mla_prep  # noqa: E402
from longcat_service.kernels.rmsnorm import (  # noqa: E402
    rms_norm,
    rms_norm_reference,
)
from longcat_service.layers import fast_decode as fast_decode_mod  # noqa: E402
from longcat_service.layers import layernorm as layernorm_mod  # noqa: E402
from longcat_service.layers.attention_metadata import AttentionMetadata  # noqa: E402
from longcat_service.layers.rotary import apply_rope  # noqa: E402  (the model's RoPE is mla_prep's spec)
from longcat_service.model.kv_cache import allocate_kv_caches  # noqa: E402
from longcat_service.model.loader import load_model  # noqa: E402
from tests.tiny_config import TINY_CONFIG  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# relative; the interpreter truncates at each of up to 3 bf16 roundings, a GPU rounds to nearest
BF16_TOL = 2e-3 if ON_GPU else 3 * 2**-7



def mla_prep_reference(
    q: torch.Tensor,
    kv_a: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q_scale: float,
    kv_scale: float,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_dim: int,
) -> torch.Tensor:
    """q [N, h, dn+dr], kv_a [N, r+dr] (kv_a_proj_with_mqa output) -> scaled, rotated q; writes kv_cache."""
    q = q * q_scale
    q_nope, q_rope = q.split([q.shape[-1] - rope_dim, rope_dim], dim=-1)
    rank = kv_a.shape[-1] - rope_dim
    latent, k_rope = kv_a.split([rank, rope_dim], dim=-1)
    lf = latent.float()
    latent = norm_weight * (lf * torch.rsqrt(lf.pow(2).mean(-1, keepdim=True) + eps)).to(latent.dtype)
    latent = latent * kv_scale
    q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
    entry = torch.cat((latent, apply_rope(k_rope, cos, sin)), dim=-1).to(kv_cache.dtype)
    keep = slot_mapping >= 0
    kv_cache.view(-1, kv_cache.shape[-1])[slot_mapping[keep]] = entry[keep]
    return q

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _paged_case(gen, batch, heads, rank, rope, block_size, lens, dtype):
    max_blocks = max(-(-max(lens) // block_size), 1)
    num_blocks = batch * max_blocks + 3
    cache = torch.randn(num_blocks, block_size, rank + rope, generator=gen).to(dtype).to(DEVICE)
    perm = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks]  # scattered, non-contiguous pages
    tables = perm.view(batch, max_blocks).int().to(DEVICE)
    q_lat = torch.randn(batch, heads, rank, generator=gen).to(dtype).to(DEVICE)
    q_rope = torch.randn(batch, heads, rope, generator=gen).to(dtype).to(DEVICE)
    return q_lat, q_rope, cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,rank,rope,block_size,lens",
    [
        (4, 16, 4, 4, [1, 13, 0, 40]),  # spec tiny shapes; a padded row (0); lengths across pages
        (5, 12, 6, 16, [17, 33]),  # not powers of two, one split boundary inside a page
        (20, 32, 16, 8, [70]),  # heads over one head block
    ],
)
@pytest.mark.parametrize("kernel", ["new", "old"])  # forced through LONGCAT_MLA_DECODE_KERNEL (auto picks by batch)
def test_mla_decode_matches_reference(monkeypatch, kernel, dtype, heads, rank, rope, block_size, lens):
    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", kernel)
    gen = torch.Generator().manual_seed(len(lens) * 100 + heads)
    args = _paged_case(gen, len(lens), heads, rank, rope, block_size, lens, dtype)
    ref = mla_decode_reference(*args, scale=0.37)
    for splits in (1, 3, None):
        out = mla_decode(*args, scale=0.37, num_splits=splits)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        tol = 1e-5 if dtype == torch.float32 else 2 * BF16_TOL
        assert _rel(out, ref) < tol, f"splits={splits}"
        zero_rows = [i for i, n in enumerate(lens) if n == 0]
        if zero_rows:
            assert (out[zero_rows] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,rank,rope,dv,lens", [(4, 16, 4, 12, [1, 13, 0, 40]), (20, 32, 16, 40, [70, 3])])
def test_mla_decode_with_w_uv_matches_reference(dtype, heads, rank, rope, dv, lens):
    """The merge stage applying W_UV (small decode batches): equals the unfused o_latent then per-head product,
    for dv not a multiple of the 32-column tile, a strided W_UV view (as kv_b_proj's) and a padded row."""
    from longcat_service.kernels.mla_decode import mla_decode_uv_reference

    gen = torch.Generator().manual_seed(heads * 7 + dv)
    args = _paged_case(gen, len(lens), heads, rank, rope, 4, lens, dtype)
    w_kv_b = (torch.randn(heads, 5 + dv, rank, generator=gen) * 0.2).to(dtype).to(DEVICE)
    w_uv = w_kv_b[:, 5:, :]  # strided like fast_decode's view of kv_b_proj's weight
    ref = mla_decode_uv_reference(*args, scale=0.37, w_uv=w_uv)
    for splits in (1, 3, None):
        out = mla_decode(*args, scale=0.37, num_splits=splits, w_uv=w_uv)
        assert out.shape == (len(lens), heads, dv) and out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2 * BF16_TOL
        assert _rel(out, ref) < tol, f"splits={splits}"
        zero_rows = [i for i, n in enumerate(lens) if n == 0]
        if zero_rows:
            assert (out[zero_rows] == 0).all()
    with pytest.raises(ValueError, match="w_uv"):
        mla_decode(*args, scale=0.37, w_uv=w_uv[1:])


@pytest.mark.parametrize("heads,block_size,first_pos", [
    (8, 16, 0),  # 8 heads a rank (TP 8): a 16-row head block, half of it padding
    (16, 64, 1),  # TP 4; the MTP cache (no entry at position 0)
    (64, 16, 1),  # one rank: all 64 heads in one program
    (64, 64, 0),
])
def test_mla_decode_head_blocks_pages_and_first_pos(heads, block_size, first_pos):
    """All heads of a row in one stage-1 program: odd lengths, padded rows (0), a row over many pages and BLOCK_N
    tiles, first_pos 0 and 1; fp32 (tight) and bf16 (64 heads: fp32 only, for the interpreter's time; the GPU
    tests take bf16 there); one split (stage 1 writes the output) and several, with and without the W_UV merge."""
    from longcat_service.kernels.mla_decode import mla_decode_uv_reference

    lens = [0, 1 + first_pos, 97, 201]
    for dtype in (torch.float32,) if heads == 64 else (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(heads * 1000 + block_size * 10 + first_pos)
        args = _paged_case(gen, len(lens), heads, 32, 16, block_size, lens, dtype)
        w_uv = (torch.randn(heads, 24, 32, generator=gen) * 0.2).to(dtype).to(DEVICE)
        ref = mla_decode_reference(*args, scale=0.29, first_pos=first_pos)
        tol = 1e-5 if dtype == torch.float32 else 2 * BF16_TOL
        for splits in (1, 5):
            out = mla_decode(*args, scale=0.29, num_splits=splits, first_pos=first_pos)
            assert out.dtype == dtype and _rel(out, ref) < tol, (dtype, splits)
            assert (out[0] == 0).all()
        ref_uv = mla_decode_uv_reference(*args, scale=0.29, w_uv=w_uv, first_pos=first_pos)
        out_uv = mla_decode(*args, scale=0.29, num_splits=3, w_uv=w_uv, first_pos=first_pos)
        assert _rel(out_uv, ref_uv) < tol and (out_uv[0] == 0).all(), dtype


def test_mla_decode_longcat_rank_and_rope():
    """The real latent widths (512 + 64) at 64 heads, bf16, a length that ends inside a 64-token page."""
    gen = torch.Generator().manual_seed(3)
    args = _paged_case(gen, 3, 64, 512, 64, 64, [130, 0, 5], torch.bfloat16)
    ref = mla_decode_reference(*args, scale=0.0722)
    for splits in (1, 3):
        out = mla_decode(*args, scale=0.0722, num_splits=splits)
        assert _rel(out, ref) < 2 * BF16_TOL and (out[1] == 0).all()


def test_mla_decode_attends_only_within_seq_len():
    """Entries past seq_len (and in other sequences' pages) must not leak in: changing them changes nothing."""
    gen = torch.Generator().manual_seed(7)
    q_lat, q_rope, cache, tables, lens = _paged_case(gen, 2, 4, 16, 4, 4, [6, 9], torch.float32)
    before = mla_decode(q_lat, q_rope, cache, tables, lens, 0.5, num_splits=2)
    poisoned = cache.clone()
    poisoned[tables[0, 1].long(), 2:] = 1e4  # positions 6.. of sequence 0
    poisoned[tables[1, 2].long(), 1:] = -1e4  # positions 9.. of sequence 1
    after = mla_decode(q_lat, q_rope, poisoned, tables, lens, 0.5, num_splits=2)
    assert torch.equal(before, after)


@pytest.mark.parametrize("uv", [False, True])
def test_mla_decode_first_pos_skips_position_zero(uv):
    """first_pos=1 (the MTP cache: no entry at position 0): equals softmax attention over positions 1..L-1 computed
    here directly, and poisoning position 0 changes nothing; padded rows (0) stay zero."""
    from longcat_service.kernels.mla_decode import mla_decode_uv_reference

    gen = torch.Generator().manual_seed(11)
    lens = [2, 9, 0, 40]
    q_lat, q_rope, cache, tables, seq = _paged_case(gen, len(lens), 4, 16, 4, 4, lens, torch.float32)
    w_uv = (torch.randn(4, 12, 16, generator=gen) * 0.2).to(DEVICE) if uv else None
    flat = cache.view(-1, cache.shape[-1]).float()
    expect = torch.zeros(len(lens), 4, 16, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n:
            pos = torch.arange(1, n, device=tables.device)
            entries = flat[(tables[b].long()[pos // 4] * 4 + pos % 4)].double().cpu()
            q = torch.cat((q_lat[b], q_rope[b]), -1).double().cpu()
            expect[b] = torch.softmax(0.37 * q @ entries.t(), -1) @ entries[:, :16]
    if uv:
        expect = torch.bmm(expect.transpose(0, 1), w_uv.double().cpu().transpose(1, 2)).transpose(0, 1)
        ref = mla_decode_uv_reference(q_lat, q_rope, cache, tables, seq, 0.37, w_uv, first_pos=1)
    else:
        ref = mla_decode_reference(q_lat, q_rope, cache, tables, seq, 0.37, first_pos=1)
    assert _rel(ref.cpu(), expect) < 1e-5
    poisoned = cache.clone()
    for b in range(len(lens)):
        poisoned[tables[b, 0].long(), 0] = 1e3  # position 0 of every row
    for splits in (1, 3, None):
        out = mla_decode(q_lat, q_rope, cache, tables, seq, 0.37, num_splits=splits, w_uv=w_uv, first_pos=1)
        assert _rel(out.cpu(), expect) < 1e-5, f"splits={splits}"
        assert (out[2] == 0).all()
        again = mla_decode(q_lat, q_rope, poisoned, tables, seq, 0.37, num_splits=splits, w_uv=w_uv, first_pos=1)
        assert torch.equal(out, again)
    assert _rel(mla_decode(q_lat, q_rope, cache, tables, seq, 0.37, w_uv=w_uv).cpu(), expect) > 1e-3  # control
    with pytest.raises(ValueError, match="first_pos"):
        mla_decode(q_lat, q_rope, cache, tables, seq, 0.37, first_pos=2)


def test_mla_decode_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    q_lat, q_rope, cache, tables, lens = _paged_case(gen, 2, 4, 16, 4, 4, [3, 5], torch.float32)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(q_lat, q_rope, cache, tables, lens[:1], 1.0)
    with pytest.raises(ValueError, match="kv_cache"):
        mla_decode(q_lat, q_rope, cache[..., :-1].contiguous(), tables, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        mla_decode(q_lat, q_rope, cache, tables[:1], lens, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_matches_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(5, hidden, generator=gen)).to(dtype).to(DEVICE)
    w = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    tol = 1e-6 if dtype == torch.float32 else BF16_TOL
    out = rms_norm(x, w, 1e-5)
    assert _rel(out, rms_norm_reference(x, w, 1e-5)) < tol
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:-1], 1e-5)


@pytest.mark.parametrize("heads", [5, 37])  # 37: three programs of 16 heads per token, the last one masked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_prep_matches_reference_and_skips_padding_slots(dtype, heads):
    gen = torch.Generator().manual_seed(3)
    n, dn, dr, rank = 4, 8, 6, 12
    q = torch.randn(n, heads, dn + dr, generator=gen).to(dtype).to(DEVICE)
    kv_a = torch.randn(n, rank + dr, generator=gen).to(dtype).to(DEVICE)
    ang = torch.randn(n, dr // 2, generator=gen)
    cos, sin = ang.cos().to(dtype).to(DEVICE), ang.sin().to(dtype).to(DEVICE)
    w = (1 + 0.2 * torch.randn(rank, generator=gen)).to(dtype).to(DEVICE)
    slots = torch.tensor([5, -1, 2, 7], device=DEVICE)
    sentinel = torch.full((3, 4, rank + dr), 123.0, dtype=dtype, device=DEVICE)
    ours, ref_cache = sentinel.clone(), sentinel.clone()
    q_out = mla_prep(q, kv_a, cos, sin, w, 1e-6, 2.0, 3.4641016, slots, ours, dr)
    q_ref = mla_prep_reference(q, kv_a, cos, sin, w, 1e-6, 2.0, 3.4641016, slots, ref_cache, dr)
    tol = 1e-6 if dtype == torch.float32 else BF16_TOL
    assert _rel(q_out, q_ref) < tol
    assert _rel(ours, ref_cache) < tol
    flat = ours.view(-1, rank + dr)
    untouched = [s for s in range(12) if s not in (5, 2, 7)]
    assert (flat[untouched] == 123.0).all()  # slot -1 wrote nothing; other slots kept
    assert not (flat[[5, 2, 7]] == 123.0).any()


@pytest.mark.parametrize("n,heads,rank", [(1, 4, 80), (3, 5, 12)])  # 80: two W_UK column blocks, the last masked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_prep_absorb_is_prep_then_the_w_uk_product(dtype, n, heads, rank):
    """mla_prep_absorb = mla_prep's q (scaled, rounded) through W_UK in fp32, plus its rotated rope part; the same
    cache entries (slot -1 writes nothing). W_UK strided as fast_decode's view of kv_b_proj's weight."""
    from longcat_service.kernels.mla_prep import mla_prep_absorb

    gen = torch.Generator().manual_seed(5 + n)
    dn, dr, dv = 8, 6, 4
    q = torch.randn(n, heads, dn + dr, generator=gen).to(dtype).to(DEVICE)
    kv_a = torch.randn(n, rank + dr, generator=gen).to(dtype).to(DEVICE)
    ang = torch.randn(n, dr // 2, generator=gen)
    cos, sin = ang.cos().to(dtype).to(DEVICE), ang.sin().to(dtype).to(DEVICE)
    w = (1 + 0.2 * torch.randn(rank, generator=gen)).to(dtype).to(DEVICE)
    w_kv_b = (0.3 * torch.randn(heads, dn + dv, rank, generator=gen)).to(dtype).to(DEVICE)
    w_uk = w_kv_b[:, :dn, :]
    slots = torch.tensor([5, -1, 2][:n], device=DEVICE)
    sentinel = torch.full((3, 4, rank + dr), 123.0, dtype=dtype, device=DEVICE)
    ours, ref_cache = sentinel.clone(), sentinel.clone()
    q_lat, q_pe = mla_prep_absorb(q, kv_a, cos, sin, w, 1e-6, 2.0, 3.4641016, slots, ours, dr, w_uk)
    q_ref = mla_prep_reference(q, kv_a, cos, sin, w, 1e-6, 2.0, 3.4641016, slots, ref_cache, dr)
    lat_ref = torch.bmm(q_ref[..., :dn].transpose(0, 1).float(), w_uk.float()).transpose(0, 1).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    assert q_lat.shape == (n, heads, rank) and q_pe.shape == (n, heads, dr)
    assert _rel(q_lat, lat_ref) < tol and _rel(q_pe, q_ref[..., dn:]) < tol
    assert _rel(ours, ref_cache) < tol
    assert torch.equal(ours == 123.0, ref_cache == 123.0)  # the same slots written, slot -1 none
    with pytest.raises(ValueError, match="w_uk"):
        mla_prep_absorb(q, kv_a, cos, sin, w, 1e-6, 2.0, 3.4641016, slots, ours, dr, w_uk[:, 1:])


def test_mla_prep_reference_is_the_eager_layer_math():
    """The kernel's reference against the model's own pieces: layers/rotary.py's RoPE and the LoRA RMSNorm."""
    from longcat_service.layers.layernorm import RMSNorm
    from longcat_service.layers.rotary import apply_rope

    gen = torch.Generator().manual_seed(4)
    n, heads, dn, dr, rank = 3, 2, 4, 6, 8
    q = torch.randn(n, heads, dn + dr, generator=gen)
    kv_a = torch.randn(n, rank + dr, generator=gen)
    ang = torch.randn(n, dr // 2, generator=gen)
    cos, sin = ang.cos(), ang.sin()
    norm = RMSNorm(rank, 1e-6, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(rank, generator=gen))
    cache = torch.zeros(2, 4, rank + dr)
    slots = torch.tensor([6, 0, 3])
    got_q = mla_prep_reference(q, kv_a, cos, sin, norm.weight.detach(), 1e-6, 2.0, 3.0, slots, cache, dr)
    q_scaled = q * 2.0
    want_q = torch.cat((q_scaled[..., :dn], apply_rope(q_scaled[..., dn:], cos, sin)), dim=-1)
    with torch.no_grad():
        want_entry = torch.cat((norm(kv_a[:, :rank]) * 3.0, apply_rope(kv_a[:, rank:], cos, sin)), dim=-1)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(cache.view(-1, rank + dr)[slots], want_entry, rtol=0, atol=0)


TINY = TINY_CONFIG


def _decode_logits(model, caches, prompts, block_size, tables):
    """Prefill each prompt (eager path), then one decode step for all; returns the decode logits."""
    for i, p in enumerate(prompts):
        meta = AttentionMetadata.build([len(p)], [len(p)], [tables[i]], block_size, DEVICE)
        ids = torch.tensor(p, device=DEVICE)
        model(ids, torch.arange(len(p), device=DEVICE), meta, caches)
    lens = [len(p) + 1 for p in prompts]
    meta = AttentionMetadata.build([1] * len(prompts), lens, tables, block_size, DEVICE)
    ids = torch.tensor([(7 * i + 3) % 128 for i in range(len(prompts))], device=DEVICE)
    hidden = model(ids, torch.tensor([n - 1 for n in lens], device=DEVICE), meta, caches)
    return model.compute_logits(hidden), caches


@pytest.mark.parametrize("dtype,fused_uv_max_batch,absorb_rows", [
    (torch.float32, 0, 0), (torch.float32, 8, 0), (torch.bfloat16, 0, 0), (torch.bfloat16, 8, 0),
    (torch.float32, 8, 8),  # W_UK in the prep kernel (fp32: its tight tolerance)
])
@pytest.mark.usefixtures("few_mla_decode_splits")  # conftest: interpreted, 4 splits, not 32 (the same outputs here)
def test_fast_decode_path_equals_eager_model(monkeypatch, dtype, fused_uv_max_batch, absorb_rows):
    """The whole model: the Triton decode path (norms, prep, split-K attention; one GEMM for q_a and kv_a, row-strided
    views into the kernels; W_UV in the merge stage or as a separate bmm; W_UK in the prep kernel or a bmm) vs the
    eager layers."""
    config = ModelConfig.from_dict(TINY)
    monkeypatch.setattr(fast_decode_mod, "FUSED_UV_MAX_BATCH", fused_uv_max_batch)
    monkeypatch.setenv("LONGCAT_MLA_ABSORB_PREP_MAX_ROWS", str(absorb_rows))
    model = load_model(config, dtype=dtype, device=DEVICE, load_format="dummy", seed=1)
    assert model.model.layers[0].self_attn[0].fused_a_weight is not None
    block_size, prompts = 4, [[5, 9, 11, 3, 8, 1, 4], [2, 60, 7], [99] * 13]
    tables = [[0, 1], [4], [6, 2, 8, 9]]
    with torch.inference_mode():
        monkeypatch.setenv("LONGCAT_DISABLE_TRITON", "1")
        eager, eager_caches = _decode_logits(model, allocate_kv_caches(config, 12, block_size, dtype, DEVICE),
                                             prompts, block_size, tables)
        monkeypatch.delenv("LONGCAT_DISABLE_TRITON")
        if not ON_GPU:  # route CPU tensors through the interpreted kernels
            monkeypatch.setattr(fast_decode_mod, "fast_path_enabled", lambda t: True)
            monkeypatch.setattr(layernorm_mod, "fast_path_enabled", lambda t: True)
        fast, fast_caches = _decode_logits(model, allocate_kv_caches(config, 12, block_size, dtype, DEVICE),
                                           prompts, block_size, tables)
    tol = 1e-5 if dtype == torch.float32 else 0.03
    assert _rel(fast, eager) < tol
    for a, b in zip(fast_caches, eager_caches, strict=True):
        assert _rel(a, b) < tol


@pytest.mark.usefixtures("few_mla_decode_splits")  # conftest: interpreted, 4 splits, not 32 (the same outputs here)
def test_spec_graph_forwards_equal_the_eager_rows(monkeypatch):
    """The forwards the spec-step CUDA graphs capture (engine/spec_graph_runner.SpecGraphRunner, run uncaptured on
    CPU, captured and replayed on CUDA: the Triton decode kernels on its static buffers, MTP attention with
    first_pos=1) equal the same flat rows through the eager reference layers (tests/spec_rows_twin.py): verify
    hidden states, logits and target cache writes; the MTP pass over emitted tokens and its cache writes; a recursive
    draft pass. Padded rows write nothing."""
    from types import SimpleNamespace

    from longcat_service.engine.spec_graph_runner import SpecGraphRunner
    from tests.spec_rows_twin import EagerSpecRows

    k, bs = 2, 4
    config = ModelConfig.from_dict(TINY)
    model = load_model(config, dtype=torch.float32, device=DEVICE, load_format="dummy", seed=1, mtp=True)
    gen = torch.Generator().manual_seed(3)
    base = [c.normal_(generator=gen) if not ON_GPU else c.copy_(torch.randn(c.shape, generator=gen))
            for c in allocate_kv_caches(config, 16, bs, torch.float32, "cpu", 1)]
    tables = [[3, 7, 1, 12], [0, 5], [9, 2, 14]]
    seqs = [SimpleNamespace(token_ids=list(range(20, 40))), SimpleNamespace(token_ids=list(range(50, 60))),
            SimpleNamespace(token_ids=list(range(70, 84)))]
    starts, drafts = [9, 4, 6], [[11, 12], [], [13]]
    batch = [SimpleNamespace(seq=q, start_pos=p, draft_token_ids=d, block_table=t)
             for q, p, d, t in zip(seqs, starts, drafts, tables, strict=True)]
    emitted = [([11, 12, 30], 9, tables[0]), ([61], 4, tables[1]), ([], 6, tables[2])]  # row 2: failed
    draft_h = torch.randn(2, config.hidden_size, generator=gen).to(DEVICE)
    draft_ids = torch.tensor([5, 6], device=DEVICE)

    def run(runner_cls):
        caches = [c.clone().to(DEVICE) for c in base]
        r = SimpleNamespace(model=model, kv_caches=caches[:-1], mtp_kv_cache=caches[-1], block_size=bs,
                            device=torch.device(DEVICE), vocab_size=int(config.vocab_size))
        if runner_cls is EagerSpecRows:
            g = EagerSpecRows(r, k, (1, 2, 4), max_blocks=4)
        else:
            g = SpecGraphRunner(model, r.kv_caches, r.mtp_kv_cache, bs, 4, k, (1, 2, 4))
        with torch.inference_mode():
            b, hidden, logits = g.verify(batch)
            hidden, logits = hidden.clone(), logits.clone()
            h_mtp = g.mtp(b, emitted).clone()
            h_draft = g.draft(draft_ids, draft_h, [11, 5], [tables[0], tables[1]]).clone()
        return b, hidden, logits, h_mtp, h_draft, caches

    with torch.inference_mode():
        monkeypatch.setenv("LONGCAT_DISABLE_TRITON", "1")
        ref = run(EagerSpecRows)
        monkeypatch.delenv("LONGCAT_DISABLE_TRITON")
        if not ON_GPU:  # route CPU tensors through the interpreted kernels
            monkeypatch.setattr(fast_decode_mod, "fast_path_enabled", lambda t: True)
            monkeypatch.setattr(layernorm_mod, "fast_path_enabled", lambda t: True)
        got = run(SpecGraphRunner)
    assert got[0] == ref[0] == 4  # 3 sequences padded to the bucket of 4
    verify_real = [0, 1, 2, 3, 6, 7]  # seq 0: last + 2 drafts; seq 1: last only; seq 2: last + 1 draft
    mtp_real = [0, 1, 2, 3]  # seq 0: 3 emitted tokens; seq 1: 1; seq 2: none
    for i, real in ((1, verify_real), (2, verify_real), (3, mtp_real)):
        assert _rel(got[i][real], ref[i][real]) < 1e-5, i
    assert _rel(got[4], ref[4]) < 1e-5
    for a, b in zip(got[5], ref[5], strict=True):  # every cache write equal; padding wrote nothing
        assert _rel(a, b) < 1e-5

"""grouped_gemm (Triton, longcat_service/kernels/grouped_gemm.py): the MoE prefill experts' grouped GEMM.

Against an exact (fp64) per-expert x @ w^T: random row counts with empty experts, one expert holding every row,
experts of more rows than a tile, N and K not multiples of the blocks, fp32 and bf16, no rows at all; the
pointer, TMA and split-tail variants; then the prefill expert FFN through it (the default with Triton).
Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1) with small shapes; products of
bf16 values are exact in fp32, and the kernel rounds its output to bf16 to nearest (as a GPU does, not the
interpreter's truncating cast), so bf16 results are within half a bf16 ulp plus the fp32 accumulation error
of the exact value. The sm_90 build of every config is checked offline (triton.compile, no GPU needed).
Tests marked gpu run the real shapes against torch._grouped_mm.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.sm90_aot import assert_fits_shared_memory, compile_for_sm90

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels import grouped_gemm as gg  # noqa: E402
from longcat_service.kernels.grouped_gemm import (  # noqa: E402
    CONFIGS,
    DEFAULT_CONFIG,
    GroupedGemmConfig,
    grouped_gemm,
    grouped_gemm_reference,
    parse_config,
)
from longcat_service.ops import extension  # noqa: E402
from longcat_service.ops import reference as ref  # noqa: E402
from tests.test_moe_prefill import _routed  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# small tiles for the interpreter: pointer loads, TMA descriptors, split tail (last tile of <= 16 rows: 16 rows)
SMALL = {
    "ptr": parse_config("32,16,32,2,4"),
    "tma": parse_config("16,32,32,2,4,tma"),
    "split": parse_config("32,32,32,2,4,split"),
    "tma_split": parse_config("16,16,32,2,4,tma,split"),
}


def _offsets(counts, device=DEVICE):
    offs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offs[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return offs.to(device)


def _case(counts, n, k, dtype, extra_rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + extra_rows  # rows past offsets[-1]: no expert's (zero-expert slots)
    x = torch.randn(rows, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(len(counts), n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    return x, w, _offsets(counts)


def _check(y, x, w, offsets, what=""):
    """y's real rows against fp64 x @ w^T: at most one rounding to y's dtype plus the fp32 accumulation error."""
    n_real = int(offsets[-1])
    assert y.shape == (x.shape[0], w.shape[1]) and y.dtype == x.dtype, (y.shape, y.dtype)
    offs = offsets.tolist()
    exact = torch.zeros(n_real, w.shape[1], dtype=torch.float64)
    magnitude = torch.zeros_like(exact)
    for e in range(w.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            xe, we = x[a:b].double().cpu(), w[e].double().cpu()
            exact[a:b] = xe @ we.t()
            magnitude[a:b] = xe.abs() @ we.abs().t()
    got = y[:n_real].double().cpu()
    ulp = 2.0**-8 if x.dtype == torch.bfloat16 else (2.0**-11 if x.dtype == torch.float16 else 0.0)
    # (2^-24 * K: fp32 sums in any order; an extra 2^-24 per element for ieee vs tensor-core fp32 rounding)
    bound = ulp * exact.abs() + (x.shape[1] + 1) * 2.0**-24 * magnitude * (1 + ulp) + 1e-30
    err = (got - exact).abs()
    assert torch.isfinite(got).all(), what
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {err.numel()} elements off, worst "
                                 f"{float((err / bound).max()):.3g}x the bound")


COUNT_CASES = {
    "mixed": [5, 0, 33, 1, 0, 16, 17, 64],  # empties, 1 row, exactly a half tile, > 2 tiles
    "one_expert_all_rows": [0, 0, 77, 0],
    "all_empty": [0, 0, 0],
    "single_expert": [40],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(SMALL))
@pytest.mark.parametrize("counts", list(COUNT_CASES))
def test_matches_exact(counts, variant, dtype):
    x, w, offsets = _case(COUNT_CASES[counts], n=40, k=72, dtype=dtype)  # N, K not multiples of the blocks
    y = grouped_gemm(x, w, offsets, config=SMALL[variant])
    _check(y, x, w, offsets, f"{counts} {variant}")


@pytest.mark.parametrize("n,k", [(64, 64), (17, 5), (48, 100), (1, 33)])
def test_shapes_even_and_odd(n, k):
    x, w, offsets = _case([3, 0, 21, 40], n=n, k=k, dtype=torch.bfloat16, seed=n + k)
    for name in ("ptr", "tma"):
        _check(grouped_gemm(x, w, offsets, config=SMALL[name]), x, w, offsets, f"{name} n={n} k={k}")


def test_random_offsets_fp16_and_reference():
    g = torch.Generator().manual_seed(7)
    counts = torch.randint(0, 3, (12,), generator=g) * torch.randint(0, 30, (12,), generator=g)
    x, w, offsets = _case(counts.tolist(), n=24, k=40, dtype=torch.float16, seed=7)
    y = grouped_gemm(x, w, offsets, config=SMALL["tma"])
    _check(y, x, w, offsets, "fp16")
    n_real = int(offsets[-1])
    torch.testing.assert_close(y[:n_real], grouped_gemm_reference(x, w, offsets)[:n_real], rtol=2e-3, atol=1e-3)


def test_no_rows_and_no_k():
    x, w, offsets = _case([0, 0, 0, 0], n=24, k=40, dtype=torch.bfloat16, extra_rows=0)
    assert x.shape[0] == 0
    y = grouped_gemm(x, w, offsets)
    assert y.shape == (0, 24) and y.dtype == torch.bfloat16
    x0, w0 = torch.zeros(5, 0, dtype=torch.bfloat16, device=DEVICE), torch.zeros(2, 8, 0, dtype=torch.bfloat16,
                                                                                   device=DEVICE)
    y0 = grouped_gemm(x0, w0, _offsets([2, 3]))
    assert y0.shape == (5, 8) and bool((y0 == 0).all())


def test_row_bound_is_only_a_hint():
    """max_rows_per_expert under the true counts shrinks the tile but rows keep being walked tile by tile."""
    x, w, offsets = _case([0, 50, 3], n=32, k=32, dtype=torch.bfloat16)
    for bound in (1, 3, 50, 10**6):
        _check(grouped_gemm(x, w, offsets, max_rows_per_expert=bound, config=SMALL["tma_split"]), x, w, offsets,
               f"bound {bound}")


def test_tma_falls_back_on_unaligned_rows():
    x, w, offsets = _case([9, 0, 12], n=16, k=36, dtype=torch.bfloat16)  # 72-byte rows: no TMA descriptor
    from longcat_service.kernels._grouped_gemm_triton import tma_supported

    assert not tma_supported(x, w)
    _check(grouped_gemm(x, w, offsets, config=SMALL["tma"]), x, w, offsets, "fallback")
    x_pad = torch.zeros(x.shape[0], 40, dtype=x.dtype, device=DEVICE)
    x_pad[:, :36] = x
    w_pad = torch.zeros(3, 16, 40, dtype=w.dtype, device=DEVICE)
    w_pad[..., :36] = w
    assert tma_supported(x_pad[:, :36], w_pad[..., :36])  # 80-byte row strides: TMA with K = 36
    _check(grouped_gemm(x_pad[:, :36], w_pad[..., :36], offsets, config=SMALL["tma"]), x, w, offsets, "strided")


def test_strided_weights():
    """Weight views: one row per expert (TMA rows then step by the expert stride), a slice of each expert's rows
    (expert and row dimensions do not merge: pointer loads)."""
    from longcat_service.kernels._grouped_gemm_triton import tma_supported

    x, w, offsets = _case([6, 0, 11], n=32, k=40, dtype=torch.bfloat16)
    for view in (w[:, 5:6], w[:, 8:24]):
        assert tma_supported(x, view) == (view.shape[1] == 1)
        for name in ("ptr", "tma"):
            _check(grouped_gemm(x, view, offsets, config=SMALL[name]), x, view, offsets, f"{name} {view.shape}")


def test_env_config(monkeypatch):
    monkeypatch.delenv(gg.CONFIG_ENV, raising=False)
    assert gg.config_from_env() == DEFAULT_CONFIG
    monkeypatch.setenv(gg.CONFIG_ENV, "64, 128, 64, 5, 4, tma")
    assert gg.config_from_env() == GroupedGemmConfig(64, 128, 64, 5, 4, tma=True)
    x, w, offsets = _case([7, 0, 20], n=24, k=40, dtype=torch.bfloat16)
    monkeypatch.setenv(gg.CONFIG_ENV, str(SMALL["split"]))
    _check(grouped_gemm(x, w, offsets), x, w, offsets, "env")


def test_config_table():
    assert DEFAULT_CONFIG in CONFIGS and len(set(CONFIGS)) == len(CONFIGS)
    for cfg in CONFIGS:
        assert parse_config(str(cfg)) == cfg
        assert cfg.block_n in (64, 128, 256) and cfg.block_k in (64, 128) and cfg.block_m in (64, 128)
        assert 3 <= cfg.num_stages <= 5 and cfg.num_warps in (4, 8)
        elem = 2  # bf16: the pipeline's shared memory must fit the H200's 227 KB per block
        assert cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * elem <= 200 * 1024, cfg
    for bad in ("128,64,128,4", "128,64,96,4,8", "a,64,128,4,8", "128,64,128,4,8,fast", "128,64,16,4,8,split"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_rejects_bad_inputs():
    x, w, offsets = _case([2, 3], n=8, k=16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="int32"):
        grouped_gemm(x, w, offsets.long())
    with pytest.raises(ValueError, match="int32"):
        grouped_gemm(x, w, offsets[:-1])
    with pytest.raises(ValueError, match="dtypes"):
        grouped_gemm(x, w.float(), offsets)
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        grouped_gemm(x[:, :8], w, offsets)
    with pytest.raises(ValueError, match="contiguous"):
        grouped_gemm(x, w.transpose(1, 2).contiguous().transpose(1, 2), offsets)


# ---- the prefill expert FFN with the flag on -------------------------------------------------------------------


@pytest.mark.parametrize("t,e,z,k,h,i,share", [(50, 12, 6, 4, 64, 32, "mixed"), (33, 8, 4, 3, 48, 24, "none"),
                                                (20, 8, 4, 3, 48, 24, "all"), (0, 8, 4, 3, 48, 24, "mixed")])
def test_expert_ffn_with_triton_grouped_gemm(monkeypatch, t, e, z, k, h, i, share):
    if ON_GPU and t == 0:
        pytest.skip("the CUDA path never runs the grouped GEMM without tokens (_use_grouped_mm)")
    hidden, w13, w2, offsets, sorted_slots, *_ = _routed(t, e, z, k, h, i, share, seed=t, device=DEVICE)
    monkeypatch.setattr(extension, "fast_path_enabled", lambda _: True)
    monkeypatch.setenv(gg.CONFIG_ENV, "16,16,32,2,4,tma,split")  # small tiles: several per expert
    calls = []
    real = gg.grouped_gemm
    monkeypatch.setattr(gg, "grouped_gemm", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    y = extension._expert_ffn_grouped_mm(hidden, w13, w2, offsets, sorted_slots, k)
    assert calls == [w13.shape, w2.shape]  # both GEMMs through the Triton kernel
    n = int(offsets[-1])
    assert y.shape == (t * k, h) and y.dtype == torch.bfloat16
    want = ref.expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    torch.testing.assert_close(y[:n], want[:n], rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(extension, "fast_path_enabled", lambda _: False)  # torch._grouped_mm, as without Triton
    torch_y = extension._expert_ffn_grouped_mm(hidden, w13, w2, offsets, sorted_slots, k)
    torch.testing.assert_close(y[:n], torch_y[:n], rtol=2e-2, atol=2e-2)


# ---- the GPU build, compiled offline -----------------------------------------------------------------------------

_AOT = """
from longcat_service.kernels._grouped_gemm_triton import aot_compile
from longcat_service.kernels.grouped_gemm import CONFIGS, DEFAULT_CONFIG, parse_config
# every config at the gate_up shape (the down GEMM's N, K specialise the same way: multiples of 16 and of
# the blocks), and masked N / K on two
cases = [(4096, 6144, c) for c in CONFIGS] + [(40, 72, DEFAULT_CONFIG), (40, 72, parse_config("128,64,128,3,8"))]
for n, k, cfg in cases:
    ck = aot_compile(cfg, n, k)
    ttgir = ck.asm["ttgir"]
    assert "warp_group_dot" in ttgir, (cfg, "no wgmma")
    assert ("async_tma_copy_global_to_local" in ttgir) == cfg.tma, (cfg, "tma")
    print(n, k, cfg, ck.metadata.shared, flush=True)
"""


def test_sm90_build_of_every_config():
    """Every config compiles for sm_90 (Hopper: wgmma, TMA where asked) and fits its shared memory."""
    lines = compile_for_sm90(_AOT)
    assert len(lines) == len(CONFIGS) + 2
    assert_fits_shared_memory(lines)


# ---- GPU: real shapes against torch._grouped_mm -----------------------------------------------------------------

H, I_EXPERT = 6144, 2048


def _real_case(num_experts, rows_per_expert, seed=0, skew=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if skew:  # empties, one expert with most rows
        counts = torch.zeros(num_experts, dtype=torch.int64)
        counts[3] = rows_per_expert * num_experts // 2
        counts[num_experts // 2:] = torch.randint(0, 2 * rows_per_expert, (num_experts - num_experts // 2,))
    else:
        counts = torch.poisson(torch.full((num_experts,), float(rows_per_expert))).long()
    offsets = _offsets(counts.tolist(), "cuda")
    rows = int(offsets[-1]) + 100  # and rows of zero experts after them
    x = torch.empty(rows, H, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    w13 = torch.empty(num_experts, 2 * I_EXPERT, H, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    w13.mul_(H**-0.5)
    w2 = torch.empty(num_experts, H, I_EXPERT, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    w2.mul_(I_EXPERT**-0.5)
    return x, w13, w2, offsets


def _assert_close_to_grouped_mm(y, x, w, offsets, what):
    n_real = int(offsets[-1])
    want = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:])[:n_real].float()
    got = y[:n_real].float()
    assert torch.isfinite(got).all(), what
    # both accumulate in fp32 and round once to bf16: at most ~1 bf16 ulp apart (values are O(1))
    err = (got - want).abs()
    assert float(err.max()) <= 2.0**-7 * float(want.abs().max()) + 1e-2, (what, float(err.max()))
    assert float(err.mean()) <= 2e-3 * float(want.abs().mean()) + 1e-4, (what, float(err.mean()))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
@pytest.mark.parametrize("skew", [False, True])
def test_real_shapes_against_grouped_mm(skew):
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm_90+")
    x, w13, w2, offsets = _real_case(64, 64, seed=int(skew), skew=skew)
    act = torch.empty(x.shape[0], I_EXPERT, device="cuda", dtype=torch.bfloat16).normal_()
    configs = CONFIGS if not skew else (DEFAULT_CONFIG,)
    for cfg in configs:
        _assert_close_to_grouped_mm(grouped_gemm(x, w13, offsets, config=cfg), x, w13, offsets, f"gate_up {cfg}")
        _assert_close_to_grouped_mm(grouped_gemm(act, w2, offsets, config=cfg), act, w2, offsets, f"down {cfg}")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
def test_real_expert_ffn_with_flag(monkeypatch):
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm_90+")
    # 16 experts, ~43 rows each (a third of the slots go to zero experts)
    hidden, w13, w2, offsets, sorted_slots, *_ = _routed(256, 16, 8, 4, H, I_EXPERT, "mixed", seed=1, device="cuda")
    monkeypatch.setattr(extension, "fast_path_enabled", lambda _: False)  # torch._grouped_mm
    want = extension._expert_ffn_grouped_mm(hidden, w13, w2, offsets, sorted_slots, 4)
    monkeypatch.undo()
    got = extension._expert_ffn_grouped_mm(hidden, w13, w2, offsets, sorted_slots, 4)
    n = int(offsets[-1])
    torch.testing.assert_close(got[:n].float(), want[:n].float(), rtol=2e-2, atol=2e-2)

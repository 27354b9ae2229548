"""The split-K block-FP8 w8a8 GEMM (kernels/fp8_splitk.py) in Triton's CPU interpreter against the exact fp64 sum of
the quantized products and ops/fp8_reference.w8a8_linear_ref; its config rules; its offline sm_90 build. GPU runs:
tests/test_fp8_splitk_gpu.py.

Bound: the kernel multiplies the same e4m3 values as the reference (exact fp32 products), sums each 128-wide group
in fp32, scales it (two fp32 roundings), adds the groups of its split, then the splits in order: each output is an
fp32 sum of at most k + 2 * groups + 8 rounded steps, so within one rounding to the output dtype plus
(k + 2 * groups + 8) * 2^-24 of the products' magnitude (sum of |x_q * w_q|) of the exact fp64 value. Against the
reference (an fp32 matmul of the same quantized operands, another order) the difference is within two output
roundings of the largest output: 2 * ulp * max|ref|.
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

from longcat_service.kernels import fp8_splitk as fs  # noqa: E402
from longcat_service.ops import fp8 as fp8_ops  # noqa: E402
from longcat_service.ops import fp8_reference as fr  # noqa: E402

pytestmark = pytest.mark.skipif(ON_GPU, reason="interpreter tests (CPU); the GPU runs tests/test_fp8_splitk_gpu.py")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def _case(m, n, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w8, ws = fr.block_quant(torch.randn(n, k, generator=g) * 0.05)
    return x, w8, ws


def _assert_exact_within(out, x, w8, ws):
    k = x.shape[1]
    x8, xs = fr.per_token_group_quant(x)
    xq = x8.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
    wq = fr.block_dequant(w8, ws, dtype=torch.float64)
    exact, mag = xq @ wq.t(), xq.abs() @ wq.abs().t()
    ulp = ULP[out.dtype]
    steps = k + 2 * -(-k // 128) + 8
    bound = ulp * exact.abs() + steps * 2.0**-24 * mag * (1 + ulp) + 1e-30
    err = (out.double() - exact).abs()
    assert torch.isfinite(out.float()).all()
    bad = err > bound
    assert not bool(bad.any()), f"{int(bad.sum())} of {err.numel()} off, worst {float((err / bound).max()):.3g}x"


CONFIGS = {
    "unsplit_swap": "128,1,2,4,swap",
    "split3_bn64_swap": "64,3,2,4,swap",
    "split2_unswapped": "128,2,2,4",
    "split4_bn256_swap": "256,4,2,4,swap",  # block_n > 128: a scale per weight row block within the tile
    "auto": None,  # config_for: the default rule (auto split)
    "split2_tma": "64,2,2,4,swap,tma",  # tensor-descriptor loads (K % 16 == 0), else the pointer loads (K = 300)
}


CASES = [  # (m, n, k, config): every config at two or more shapes
    (1, 128, 512, "auto"),
    (5, 200, 300, "split3_bn64_swap"), (5, 200, 300, "split2_unswapped"), (5, 200, 300, "split4_bn256_swap"),
    (17, 256, 640, "auto"), (17, 256, 640, "split4_bn256_swap"), (17, 256, 640, "split2_unswapped"),
    (64, 72, 384, "split3_bn64_swap"), (64, 72, 384, "unsplit_swap"),
    (5, 200, 400, "split2_tma"), (17, 256, 640, "split2_tma"), (5, 200, 300, "split2_tma"),  # K 400: partial group
]


@pytest.mark.parametrize("m,n,k,cfg", CASES)
def test_splitk_matches_exact_and_reference(m, n, k, cfg):
    """N, K multiples and non-multiples of 128 (partial weight row block, partial last K group), splits 1 and > 1
    (effective split after resolve_split: K = 300 has 3 groups), row tiles 16 and 64."""
    x, w8, ws = _case(m, n, k, seed=m * 1000 + n + k)
    config = fs.parse_splitk_config(CONFIGS[cfg]) if CONFIGS[cfg] else None
    if cfg == "split2_tma":  # which loads run: descriptors where K allows
        from longcat_service.kernels._fp8_splitk_triton import tma_supported

        assert tma_supported(torch.empty(m, k, dtype=torch.float8_e4m3fn), w8) == (k % 16 == 0)
    out = fs.w8a8_splitk_linear(x, w8, ws, config)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    _assert_exact_within(out, x, w8, ws)
    want = fr.w8a8_linear_ref(x, w8, ws)
    assert float((out.float() - want.float()).abs().max()) <= 2 * 2.0**-8 * float(want.float().abs().max())


@pytest.mark.parametrize("m,n,k,cfg", [(5, 200, 300, "64,2,2,4,swap"), (17, 256, 400, "64,2,2,4,swap,tma"),
                                       (64, 72, 384, "128,1,2,4")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_quantization_is_bit_for_bit_the_unfused(m, n, k, cfg, dtype):
    """fuse: each program quantizes its x groups (incl. a partial last group, rows past M) exactly as
    per_token_group_quant_fp8, so the output has the unfused call's bits."""
    x, w8, ws = _case(m, n, k, seed=m + n + k, dtype=dtype)
    fused = fs.w8a8_splitk_linear(x, w8, ws, fs.parse_splitk_config(cfg + ",fuse"))
    assert torch.equal(fused, fs.w8a8_splitk_linear(x, w8, ws, fs.parse_splitk_config(cfg)))
    _assert_exact_within(fused, x, w8, ws)


def test_splitk_more_rows_than_a_row_tile_and_fp16_fp32():
    """M > 128 loops over row tiles (grid axis 2); fp16 and fp32 activations give outputs of their dtype."""
    x, w8, ws = _case(130, 64, 256, seed=3)
    _assert_exact_within(fs.w8a8_splitk_linear(x, w8, ws, fs.parse_splitk_config("64,2,2,4,swap")), x, w8, ws)
    for dtype in (torch.float16, torch.float32):
        x, w8, ws = _case(6, 96, 384, seed=4, dtype=dtype)
        out = fs.w8a8_splitk_linear(x, w8, ws, fs.parse_splitk_config("64,2,2,4,swap"))
        assert out.dtype == dtype
        _assert_exact_within(out, x, w8, ws)


def test_splitk_is_deterministic_and_split_independent_of_rows():
    """The two-pass split sum adds the partials in split order: the same bits on every call; a row's result does not
    depend on the other rows of the batch (same row tile)."""
    x, w8, ws = _case(20, 64, 768, seed=5)
    cfg = fs.parse_splitk_config("64,3,2,4,swap")
    a = fs.w8a8_splitk_linear(x, w8, ws, cfg)
    assert torch.equal(a, fs.w8a8_splitk_linear(x, w8, ws, cfg))
    assert torch.equal(a[:7], fs.w8a8_splitk_linear(x[:7].contiguous(), w8, ws, cfg))


def test_splitk_empty_and_bad_inputs():
    x, w8, ws = _case(3, 40, 256, seed=6)
    assert fs.w8a8_splitk_linear(x[:0], w8, ws).shape == (0, 40)
    assert fs.w8a8_splitk_linear(x, w8[:0], ws[:0]).shape == (3, 0)
    w0, s0 = fr.block_quant(torch.randn(40, 0))
    zero = fs.w8a8_splitk_linear(torch.zeros(3, 0, dtype=torch.bfloat16), w0, s0)
    assert zero.shape == (3, 40) and not bool(zero.any())
    with pytest.raises(ValueError, match="scale"):
        fs.w8a8_splitk_linear(x, w8, ws[:, :1])
    with pytest.raises(ValueError, match="float8"):
        fs.w8a8_splitk_linear(x, w8.float(), ws)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fs.w8a8_splitk_linear(x.double(), w8, ws)
    with pytest.raises(ValueError, match="unit last strides"):
        fs.w8a8_splitk_linear(torch.zeros(256, 3, dtype=torch.bfloat16).t(), w8, ws)
    assert not fs.supported(x, w8, ws)  # CPU tensors
    assert not fp8_ops.splitk_supported(x, w8, ws)


def test_config_grammar_and_rules():
    cfg = fs.parse_splitk_config(" 64, 3, 4, 8, swap")
    assert cfg == fs.SplitKConfig(64, 3, 4, 8, True) and str(cfg) == "64,3,4,8,swap"
    assert fs.parse_splitk_config("128,0,3,4,TMA") == fs.SplitKConfig(128, 0, 3, 4, swap_ab=False, tma=True)
    assert str(fs.parse_splitk_config("64,2,4,4,fuse,tma,swap")) == "64,2,4,4,swap,tma,fuse"
    for cfg in fs.SWEEP_CONFIGS:
        assert fs.parse_splitk_config(str(cfg)) == cfg
    for bad in ("64,3,4", "64,3,4,8,split", "64,3,4,8,tma,tma", "a,3,4,8", "48,1,4,4", "64,99,4,4", "64,1,0,4", "64,1,4,3"):
        with pytest.raises(ValueError):
            fs.parse_splitk_config(bad)
    assert [fs.block_m_for(r) for r in (1, 5, 16, 17, 33, 64, 65, 128, 300)] == [16, 16, 16, 32, 64, 64, 128, 128,
                                                                                  128]
    assert fs.resolve_split(300, 8) == (3, 1)  # 3 groups: never an empty split
    assert fs.resolve_split(8192, 6) == (6, 11)  # 64 groups in ranges of 11: the last holds 9
    assert fs.resolve_split(8192, 7) == (7, 10)
    assert fs.resolve_split(0, 4) == (1, 1)
    # the default rule: about TARGET_WAVES x SMs programs, at least MIN_GROUPS_PER_SPLIT groups each (2L shapes)
    for rows in (8, 16, 64, 128):
        for n, k in ((2176, 6144), (12288, 1536), (6144, 8192), (24576, 6144), (6144, 12288)):
            cfg = fs.default_config(rows, n, k)
            split, per = fs.resolve_split(k, cfg.split)
            programs = -(-n // cfg.block_n) * split
            assert per >= fs.MIN_GROUPS_PER_SPLIT or split == 1
            assert programs >= fs.TARGET_WAVES * fs.DEFAULT_SMS or per < 2 * fs.MIN_GROUPS_PER_SPLIT, (rows, n, k)
            assert cfg.swap_ab and cfg.split >= 1


def test_shape_configs_take_precedence(monkeypatch):
    special = fs.parse_splitk_config("256,2,3,8,swap")
    monkeypatch.setitem(fs.SHAPE_CONFIGS, (64, 6144, 8192), special)
    assert fs.config_for(40, 6144, 8192) == special
    assert fs.config_for(16, 6144, 8192) != special  # another row tile
    monkeypatch.setitem(fs.SHAPE_CONFIGS, (64, 6144, 8192), fs.parse_splitk_config("64,0,4,4,swap"))
    assert fs.config_for(64, 6144, 8192).split == fs.auto_split(6144, 8192, 64)  # split 0: resolved


def test_dispatch_switch_default_and_cap(monkeypatch):
    monkeypatch.delenv("LONGCAT_FP8_SPLITK_MAX_ROWS", raising=False)
    assert fp8_ops.splitk_max_rows() == 128
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "64")
    assert fp8_ops.splitk_max_rows() == 64
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "4096")
    assert fp8_ops.splitk_max_rows() == fs.MAX_ROWS
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "-1")
    with pytest.raises(ValueError, match="LONGCAT_FP8_SPLITK_MAX_ROWS"):
        fp8_ops.splitk_max_rows()
    # the dispatch takes split-K above the GEMV's rows, up to the bound, on the measured shapes only
    w_qa = torch.empty(2176, 6144, dtype=fs.FP8_DTYPE, device="meta")
    w_qb = torch.empty(12288, 1536, dtype=fs.FP8_DTYPE, device="meta")
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "64")
    assert [fp8_ops.splitk_wins(r, w_qa) for r in (fp8_ops.DECODE_ROWS, fp8_ops.DECODE_ROWS + 1, 16, 64, 65)] == [
        False, True, True, True, False]  # 65: above the bound
    w_o = torch.empty(6144, 8192, dtype=fs.FP8_DTYPE, device="meta")
    monkeypatch.delenv("LONGCAT_FP8_SPLITK_MAX_ROWS")
    assert [fp8_ops.splitk_wins(r, w_o) for r in (16, 32, 64, 128)] == [True, True, False, False]  # measured tiles
    assert fp8_ops.splitk_wins(128, w_qa) and not fp8_ops.splitk_wins(129, w_qa)
    assert not any(fp8_ops.splitk_wins(r, w_qb) for r in (9, 16, 64))  # cuBLAS measured faster there
    for (tile, n, k), cfg in fs.SHAPE_CONFIGS.items():
        assert fs.measured_config(tile, n, k) is cfg and fs.config_for(tile, n, k) == cfg
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "0")
    assert not fp8_ops.splitk_wins(16, w_qa)
    # CPU tensors take the reference whatever the switch says
    monkeypatch.setenv("LONGCAT_FP8_SPLITK_MAX_ROWS", "128")
    x, w8, ws = _case(8, 40, 256, seed=7)
    assert torch.equal(fp8_ops.fp8_linear(x, w8, ws), fr.fp8_linear_ref(x, w8, ws))


# ---- the GPU build, compiled offline --------------------------------------------------------------------------

_AOT = """
import os, re, subprocess, tempfile
import triton
from longcat_service.kernels import fp8_splitk as fs
from longcat_service.kernels.fp8_splitk import aot_compile_splitk
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for rows, n, k in [(16, 2176, 6144), (64, 6144, 8192), (128, 24576, 6144), (32, 200, 400)]:
    cfg = fs.config_for(rows, n, k)
    ck = aot_compile_splitk(cfg, rows, n, k, cfg.split)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    # a partial last K group's masked step spills (once per program, off the loop); whole-group shapes must not
    assert re.search(r"STACK:0 ", usage) or k % 128, (rows, str(cfg), "spills registers", usage)
    assert "async_tma_copy_global_to_local" in ck.asm["ttgir"], (rows, str(cfg), "no TMA loads")
    tile = fs.block_m_for(rows)
    assert re.search(rf"wgmma[.]mma_async[.]sync[.]aligned[.]m64n{tile}k32[.]f32[.]e4m3[.]e4m3", ck.asm["ptx"]), (
        rows, str(cfg), "no fp8 wgmma with the row tile on its N side")
    print(rows, n, k, cfg, ck.metadata.shared, flush=True)
fused = fs.parse_splitk_config("64,3,4,4,swap,tma,fuse")
ck = aot_compile_splitk(fused, 64, 6144, 8192, fused.split)
ptx = ck.asm["ptx"]
assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx, "fused quantization: RNE cast, IEEE division"
assert re.search(r"wgmma[.]mma_async[.]sync[.]aligned[.]m64n64k32[.]f32[.]e4m3[.]e4m3", ptx), "fused: no fp8 wgmma"
print("fused", ck.metadata.shared, flush=True)
"""


def test_sm90_build_of_the_default_configs():
    """The default configs at 2L decode shapes (and a ragged one) compile for sm_90 to FP8 wgmma with the row tile
    on the wgmma's N side (swap-AB) and TMA loads, in an H200 SM's shared memory, without register spills where K
    is whole groups (every LongCat shape)."""
    lines = compile_for_sm90(_AOT)
    assert len(lines) == 5, lines
    assert_fits_shared_memory(lines)


# ---- the benchmark's dense_decode section (its GPU timings need a device; its selection and tables do not) -----


def test_bench_dense_decode_candidates_and_table(capsys):
    import dataclasses

    from benchmarks.bench_fp8_kernels import dense_decode_candidates, print_dense_decode

    n, k = 6144, 8192
    default = fs.config_for(64, n, k)
    assert dense_decode_candidates(64, n, k, "default") == []
    sweep = dense_decode_candidates(64, n, k, "sweep")
    assert default not in sweep and len(sweep) == len(set(sweep)) >= 4
    assert dataclasses.replace(default, split=default.split * 2) in sweep
    assert all(c.split == fs.resolve_split(k, c.split)[0] >= 1 for c in sweep)
    listed = dense_decode_candidates(64, 12288, 1536, "64,3,4,4,swap; 64,32,4,4;64,3,4,4,swap")
    assert [str(c) for c in listed] == ["64,3,4,4,swap", "64,12,4,4"]  # K = 1536: 12 groups at most, no duplicates
    for cfg in sweep[:2]:  # the candidates run (interpreter) and equal the reference within the stated bound
        x, w8, ws = _case(5, 72, 384, seed=8)
        _assert_exact_within(fs.w8a8_splitk_linear(x, w8, ws, cfg), x, w8, ws)

    def row(shape, m, cublas, splitk, variants):
        return {"shape": shape, "N": n, "K": k, "M": m, "block_m": fs.block_m_for(m), "default_config": "128,6,4,4,swap",
                "cublas_us": cublas, "cublas_error": None, "splitk_us": splitk, "splitk_error": None,
                "variants_us": variants, "byte_floor_us": 10.0}

    rows = [row("o_proj", 16, 20.0, 15.0, {"64,6,4,4,swap": 12.0}),
            row("down", 16, 30.0, 20.0, {"64,6,4,4,swap": "CompilationError: x"}),
            row("o_proj", 64, 20.0, 25.0, {"64,6,4,4,swap": 19.0})]
    print_dense_decode(rows, 4.2)
    out = capsys.readouterr().out
    assert "CompilationError" not in out and "64,6,4,4,swap:error" in out
    # step totals: 4 x the shapes' sums; split-K wins at 16 rows (140 < 200), loses at 64 by default (100 > 80)
    assert "up to 16 (-> LONGCAT_FP8_SPLITK_MAX_ROWS=16)" in out
    # SHAPE_CONFIGS: the fastest split-K config where it beats cuBLAS by more than 3%
    assert "    (64, 6144, 8192): parse_splitk_config(\"64,6,4,4,swap\"),  # 19.0 / 20.0 at 64 rows" in out
    assert "    (16, 6144, 8192): parse_splitk_config(\"64,6,4,4,swap\"),  # 12.0 / 20.0 at 16 rows" in out
    rows[2]["variants_us"] = {"64,6,4,4,swap": 19.5}  # within 3% of cuBLAS: commented out
    print_dense_decode(rows, 4.2)
    out = capsys.readouterr().out
    assert "    # not faster: (64, 6144, 8192): parse_splitk_config(\"64,6,4,4,swap\"),  # 19.5 / 20.0 at 64 rows" in out


def test_bench_dense_decode_runs_on_the_cpu(monkeypatch, capsys):
    """The section's loop on a tiny shape, kernels in the interpreter, each call run once instead of timed."""
    import dataclasses

    import benchmarks.bench_fp8_kernels as bench

    calls = []

    def run_once(fn_calls, reps):
        out = [f() for f in fn_calls]
        calls.append(len(out))
        return 1.0 + len(calls), None

    monkeypatch.setattr(bench, "timed", run_once)
    monkeypatch.setattr(bench, "ROTATION_BYTES", 1)  # two weight copies
    rows = bench.bench_dense_decode(4.2, 1, (5,), "64,1,2,4,swap;64,2,2,4,swap,tma,fuse", {"tiny": (72, 384)}, "cpu")
    assert len(rows) == 1 and calls == [2, 2, 2, 2]  # cuBLAS path (here the Triton w8a8), default, 2 candidates
    r = rows[0]
    default = fs.config_for(5, 72, 384)
    assert r["default_config"] == str(dataclasses.replace(default, split=fs.resolve_split(384, default.split)[0]))
    assert r["variants_us"] == {"64,1,2,4,swap": 4.0, "64,2,2,4,swap,tma,fuse": 5.0}
    assert (r["cublas_us"], r["splitk_us"], r["M"], r["block_m"]) == (2.0, 3.0, 5, 16)
    bench.print_dense_decode(rows, 4.2)
    assert "tiny" in capsys.readouterr().out


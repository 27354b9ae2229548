"""The Triton w8a16 dense decode linear (kernels/fp8_dense_decode.py) against fp64 sums and ops/fp8_reference.py.

Without a GPU the kernel runs in Triton's CPU interpreter on small shapes: partial 128-blocks in N and K, N not a
multiple of the N tile, K not a multiple of the K tile, odd row counts (one row tile partly filled, or several: the
row loop), split-K with uneven chunks (auto and forced), fp16, a row-strided x, and empty shapes; with a GPU the
same tests run compiled, and the gpu-marked ones add the LongCat-Flash shapes under every config, CUDA-graph
replay and the layers' dispatch (ops/fp8.fp8_linear).

Bound. The kernel multiplies x by the weights dequantized to x's dtype exactly as the reference's (bf16(w8 * s)), so
against the fp64 product of those: fp32 accumulation error (K + 2) * 2^-24 * sum |x_j w_j| (split-K adds the chunk
sums in fp32: within the same bound) plus one rounding (half an ulp of the output dtype; an ulp allowed). Against
the reference (F.linear in x's dtype, its own summation order and rounding): two such bounds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels import fp8_dense_decode as dd  # noqa: E402
from longcat_service.ops import fp8_reference as fr  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@functools.lru_cache(maxsize=8)
def _weight(n: int, k: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w8, scale = fr.block_quant(torch.randn(n, k, generator=g, device=DEV) * max(k, 1)**-0.5)
    return w8, scale * (1 + torch.rand(scale.shape, generator=g, device=DEV))  # distinct scales per block


def _x(rows: int, k: int, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * 2).to(dtype).to(DEV)


def _assert_within(y, x, w8, scale):
    w = fr.block_dequant(w8, scale, dtype=x.dtype).double()
    exact = x.double() @ w.t()
    mag = x.double().abs() @ w.abs().t()
    k = x.shape[1]
    bound = ULP[y.dtype] * exact.abs() + (k + 2) * 2.0**-24 * mag + 1e-7
    err = (y.double() - exact).abs()
    assert torch.isfinite(y.float()).all()
    bad = err > bound
    assert not bool(bad.any()), f"{int(bad.sum())}/{err.numel()} off, worst {float((err / bound).max()):.3g}x"
    ref = fr.fp8_linear_ref(x, w8, scale).double()
    assert bool(((y.double() - ref).abs() <= 2 * bound).all())


# (rows, N, K, dtype, config): small tiles so that the interpreter walks several N tiles, K steps (masked where K is
# not a multiple of the K tile; several per scale block at block_k 32 / 64), row tiles and K chunks. Weights with
# rows of 16-byte multiples and at least a tile go through TMA, the others through pointer loads.
CASES = [
    (9, 200, 272, torch.bfloat16, "16,64,64,2,4"),  # one row tile, partial N tile and scale blocks, no split (auto)
    (5, 96, 128, torch.bfloat16, "16,64,128,2,4"),  # whole blocks, N < the tile
    (33, 130, 520, torch.bfloat16, "16,32,64,1,4,split3"),  # three row tiles, chunks of 256, 256, 8 columns
    (20, 160, 300, torch.float16, "32,32,32,1,4,split4"),  # 3 K blocks: split 4 becomes 3 chunks of one block
    (17, 64, 1100, torch.bfloat16, "16,64,64,2,4,split2"),  # 9 K blocks: chunks of 640 and 460
    (64, 250, 200, torch.bfloat16, "64,32,64,2,4"),  # a 64-row tile, rows exactly filling it
    (40, 192, 640, torch.bfloat16, "32,64,64,2,4,split3"),  # TMA weight tiles (rows of 640 bytes), split-K
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_dense_decode_within_exact_bounds(case):
    rows, n, k, dtype, config = case
    w8, scale = _weight(n, k, seed=n + k)
    x = _x(rows, k, dtype, seed=rows)
    cfg = dd.parse_dense_config(config)
    y = dd.dense_fp8_decode(x, w8, scale, cfg)
    assert y.shape == (rows, n) and y.dtype == dtype
    _assert_within(y, x, w8, scale)
    split, _ = dd.resolve_split(n, k, cfg, dd._sm_count(x.device))
    if split > 1 and not cfg.two_pass:  # the tile counters are left zeroed for the next launch
        counters = dd._COUNTERS[str(x.device)]
        assert int(counters.abs().sum()) == 0


def test_row_strided_x_and_default_config():
    """A row-strided x (a column slice of a wider tensor, unit last stride) through the config picked by rows."""
    w8, scale = _weight(136, 256, seed=3)
    wide = _x(11, 384, seed=4)
    x = wide[:, 64:320]
    assert x.stride(0) == 384
    y = dd.dense_fp8_decode(x, w8, scale)
    _assert_within(y, x.contiguous(), w8, scale)


def test_split_k_changes_only_the_summation_order():
    """The same product unsplit and in 2 / 3 chunks: within fp32 summation error of each other (rounded once)."""
    w8, scale = _weight(64, 384, seed=5)
    x = _x(10, 384, seed=6)
    ys = [dd.dense_fp8_decode(x, w8, scale, dd.parse_dense_config(f"16,64,128,2,4,split{s}")) for s in (1, 2, 3)]
    assert [dd.resolve_split(64, 384, dd.parse_dense_config(f"16,64,128,2,4,split{s}"), 132)[0]
            for s in (1, 2, 3)] == [1, 2, 3]
    for y in ys[1:]:
        assert float((y.float() - ys[0].float()).abs().max()) <= 2 * ULP[y.dtype] * float(ys[0].float().abs().max())


@pytest.mark.parametrize("config", ["16,32,64,1,4,split3", "32,64,64,2,4,split2"])
def test_two_pass_gives_the_fixups_bits(config):
    """The split-K sums by a second launch equal the in-kernel fixup's bit for bit (same sums, same order)."""
    w8, scale = _weight(100, 700, seed=12)
    x = _x(35, 700, seed=13)
    one = dd.dense_fp8_decode(x, w8, scale, dd.parse_dense_config(config))
    two = dd.dense_fp8_decode(x, w8, scale, dd.parse_dense_config(config + ",twopass"))
    assert torch.equal(one, two)
    _assert_within(two, x, w8, scale)


def test_empty_shapes():
    w8, scale = _weight(64, 128)
    assert dd.dense_fp8_decode(_x(0, 128), w8, scale).shape == (0, 64)
    w0, s0 = w8[:0], scale[:0]
    assert dd.dense_fp8_decode(_x(3, 128), w0, s0).shape == (3, 0)
    wk, sk = torch.empty(64, 0, dtype=dd.FP8_DTYPE, device=DEV), torch.empty(1, 0, device=DEV)
    y = dd.dense_fp8_decode(_x(3, 0), wk, sk)
    assert y.shape == (3, 64) and not bool(y.any())


def test_bad_inputs_raise_clear_errors():
    w8, scale = _weight(64, 128)
    x = _x(4, 128)
    with pytest.raises(ValueError, match="x must be 2-D"):
        dd.dense_fp8_decode(x.float(), w8, scale)
    with pytest.raises(ValueError, match="w8 must be"):
        dd.dense_fp8_decode(x, w8.to(torch.bfloat16), scale)
    with pytest.raises(ValueError, match="w8 must be"):
        dd.dense_fp8_decode(x[:, :64], w8, scale)
    with pytest.raises(ValueError, match="scale must be float32"):
        dd.dense_fp8_decode(x, w8, scale.double())
    with pytest.raises(ValueError, match="scale must be float32"):
        dd.dense_fp8_decode(x, w8, scale[:, :0])
    with pytest.raises(ValueError, match="unit last strides"):
        dd.dense_fp8_decode(x, w8.t().contiguous().t(), scale)


def test_config_parsing_and_tables():
    cfg = dd.parse_dense_config(" 32, 64,128,4,4 ")
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps, cfg.split_k) == (32, 64, 128, 4, 4, 0)
    assert str(cfg) == "32,64,128,4,4" and str(dd.parse_dense_config("16,64,128,4,4,split3")) == "16,64,128,4,4,split3"
    assert dd.parse_dense_config(str(dd.parse_dense_config("16,64,128,4,4,split3"))).split_k == 3
    two = dd.parse_dense_config("16,64,128,4,4,twopass,split2")
    assert two.two_pass and two.split_k == 2 and str(two) == "16,64,128,4,4,split2,twopass"
    assert dd.parse_dense_config(str(two)) == two and not cfg.two_pass
    for bad, match in [("16,64,256,4,4", "must divide 128"), ("8,64,128,4,4", "power of two"),
                       ("16,64,128,4", "expected"), ("16,64,128,4,4,tma", "expected"),
                       ("16,64,128,4,4,split2,split3", "expected"), ("16,64,128,4,4,twopass,twopass", "expected"),
                       ("16,64,128,4,4,split9", "split_k=9"), ("a,64,128,4,4", "integers")]:
        with pytest.raises(ValueError, match=match):
            dd.parse_dense_config(bad)
    bounds = [rows for rows, _ in dd.DENSE_CONFIGS]
    assert bounds == sorted(bounds)
    assert dd.config_for_rows(1) == dd.DENSE_CONFIGS[0][1] and dd.config_for_rows(10**6) == dd.DENSE_CONFIGS[-1][1]
    for rows, cfg in dd.DENSE_CONFIGS:  # the row tile covers the bucket's rows: the weight is read once
        assert cfg.block_m >= rows and dd.config_for_rows(rows) == cfg and dd.rows_bound(rows) == rows


def test_shape_exceptions_override_the_rows_default(monkeypatch):
    other = dd.parse_dense_config("16,64,128,4,4,split2")
    bound = dd.DENSE_CONFIGS[0][0]
    monkeypatch.setattr(dd, "SHAPE_CONFIGS", {(bound, 2176, 6144): other})
    assert dd.config_for(bound, 2176, 6144) == other and dd.config_for(1, 2176, 6144) == other
    assert dd.config_for(bound, 2176, 1536) == dd.config_for_rows(bound)
    assert dd.config_for(bound + 1, 2176, 6144) == dd.config_for_rows(bound + 1)
    assert len(set(dd.SWEEP_DENSE_CONFIGS)) == len(dd.SWEEP_DENSE_CONFIGS)


def test_auto_split_fills_the_sms_in_whole_scale_blocks():
    cfg = dd.parse_dense_config("16,128,128,3,4")
    # LongCat-Flash shapes on 132 SMs: (N, K) -> splits
    want = {(2176, 6144): 8, (12288, 1536): 2, (6144, 8192): 3, (24576, 6144): 1, (6144, 12288): 3}
    for (n, k), split in want.items():
        got, chunk = dd.resolve_split(n, k, cfg, 132)
        assert got == split and chunk % 128 == 0 and (got - 1) * chunk < k <= got * chunk, (n, k)
        assert chunk >= dd.MIN_SPLIT_K_COLUMNS
    assert dd.resolve_split(64, 300, cfg, 132) == (1, 384)  # too little K to split
    assert dd.resolve_split(64, 300, dd.parse_dense_config("16,128,128,3,4,split8"), 132) == (3, 128)


_AOT = """
import os, re, subprocess, tempfile
import triton
from longcat_service.kernels.fp8_dense_decode import DENSE_CONFIGS, SWEEP_DENSE_CONFIGS, resolve_split
from longcat_service.kernels._fp8_dense_decode_triton import aot_compile
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
def stack(ck):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.cubin"), "wb") as f:
            f.write(ck.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\\d+)", usage).group(1))
defaults = [c for _, c in DENSE_CONFIGS]
configs = list(dict.fromkeys(defaults + list(SWEEP_DENSE_CONFIGS)))
for cfg in configs:  # q_a_kv_a (split-K: the fixup) for each, dense gate_up (unsplit) for the defaults
    for n, k in ((2176, 6144), (24576, 6144))[: 2 if cfg in defaults else 1]:
        split, chunk = resolve_split(n, k, cfg, 132)
        ck = aot_compile(cfg, cfg.block_m, n, k, split, chunk)
        ttgir = ck.asm["ttgir"]
        assert "warp_group_dot" in ttgir, (str(cfg), n, "no wgmma")
        assert "async_tma_copy_global_to_local" in ttgir, (str(cfg), n, "no tma")
        assert "async_copy_global_to_local" in ttgir, (str(cfg), n, "no pipelined loads")
        assert ck.metadata.num_warps == cfg.num_warps
        print(cfg, n, split, ck.metadata.shared, stack(ck), flush=True)
# odd shapes: K rows of 200 bytes (the pointer-load fallback), one row (M specialised to a constant)
ck = aot_compile(configs[0], 1, 200, 200, 1, 256)
assert "async_tma_copy_global_to_local" not in ck.asm["ttgir"]
print("odd", ck.metadata.shared, stack(ck), flush=True)
"""


def test_sm90_build_of_every_config():
    """Every config compiles for sm_90 to wgmma with pipelined TMA loads at a split-K LongCat shape (the defaults also
    at an unsplit one), fits the shared memory and spills no registers; an odd shape (pointer loads) compiles."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        pytest.skip("triton's CUDA backend is not installed")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    defaults = {c for _, c in dd.DENSE_CONFIGS}
    assert len(lines) == len(defaults | set(dd.SWEEP_DENSE_CONFIGS)) + len(defaults) + 1
    for line in lines:
        shared, spills = (int(v) for v in line.split()[-2:])
        assert shared <= 227 * 1024, line
        assert spills == 0 or line.startswith("odd"), line  # the LongCat shapes spill nothing


def test_bench_dense_decode_table(capsys):
    """benchmarks/bench_fp8_kernels.py --sections dense_decode: the per-shape table (fractions of the byte floor,
    the fastest variant), the step totals (4 of each shape), the fastest config summed over the shapes, and the
    largest row count up to which w8a16 beats w8a8 at every row count."""
    from benchmarks.bench_fp8_kernels import dense_decode_configs, print_dense_decode

    assert dense_decode_configs("default") == ([], False)
    assert dense_decode_configs("sweep") == (list(dd.SWEEP_DENSE_CONFIGS), True)
    listed, match_rows = dense_decode_configs("16,64,128,4,4 ; 32,64,128,4,4,split2;")
    assert [str(c) for c in listed] == ["16,64,128,4,4", "32,64,128,4,4,split2"] and not match_rows
    # the sweep covers every row tile of the benchmark's row counts
    assert {c.block_m for c in dd.SWEEP_DENSE_CONFIGS} == {16, 32, 64, 128, 256}

    def row(shape, m, default, w8a8, variants):
        return {"shape": shape, "N": 2176, "K": 6144, "M": m, "default_config": "16,128,128,3,4", "default_split": 8,
                "w8a16_us": default, "w8a16_error": None, "w8a8_us": w8a8, "w8a8_error": None,
                "variants_us": variants, "byte_floor_us": 3.0}

    rows = [row("a", 16, 4.0, 8.0, {"x": 3.75, "y": 5.0}), row("b", 16, 5.0, 8.0, {"x": 6.0, "y": 4.5}),
            row("a", 64, 6.0, 8.0, {"x": 7.0, "y": "CompilationError: z"}), row("b", 64, 6.0, 8.0, {"x": 7.0}),
            row("a", 128, 12.0, 10.0, {"x": 11.0}), row("b", 128, 12.0, 10.0, {"x": 11.0}),
            row("a", 256, 12.0, 20.0, {"x": 11.0}), row("b", 256, 12.0, 20.0, {"x": 11.0})]
    print_dense_decode(rows, 4.2)
    out = capsys.readouterr().out
    assert "copy rate 4.20 TB/s" in out
    assert " 0.80 " in out  # 3.0 / 3.75
    lines = [line.split() for line in out.splitlines()]
    step16 = next(t for t in lines if t[:1] == ["16"] and len(t) > 5)
    # floor 4 * 6.0, default 4 * 9.0, best 4 * (3.75 + 4.5), w8a8 4 * 16.0; summed: default 9.0 < y 9.5 < x 9.75
    assert step16[1:5] == ["24.0us", "36.0us", "33.0us", "64.0us"] and step16[-1] == "16,128,128,3,4"
    # 128 rows lose to w8a8: 64 is the bound, although 256 rows win again
    assert "(best config) beats w8a8 on the step at every measured row count up to 64 " in out
    assert "(default config) beats w8a8 on the step at every measured row count up to 64 " in out
    # shape exceptions: only where a variant beats the default by more than 3%, keyed by the rows bound
    assert '(16, 2176, 6144): parse_dense_config("x"),  # 0.94 at 16 rows' in out  # a: x 3.75 vs 4.0
    assert '(256, 2176, 6144): parse_dense_config("x"),  # 0.92 at 256 rows' in out
    assert "(64, 2176, 6144)" not in out  # a default that no variant beats


# ---- GPU: LongCat-Flash shapes, graphs, dispatch ----------------------------------------------------------------

FLASH_DENSE_SHAPES = [(2176, 6144), (12288, 1536), (6144, 8192), (24576, 6144), (6144, 12288)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [5, 16, 37, 64, 128, 256])
@pytest.mark.parametrize(("n", "k"), FLASH_DENSE_SHAPES)
def test_longcat_shapes_default_configs(n, k, rows):
    w8, scale = _weight(n, k, seed=n)
    x = _x(rows, k, seed=rows)
    _assert_within(dd.dense_fp8_decode(x, w8, scale), x, w8, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("config", dd.SWEEP_DENSE_CONFIGS, ids=str)
@pytest.mark.parametrize("split", [0, 1])
def test_every_sweep_config(config, split):
    """q_a_kv_a's shape (split-K by default) at the rows of the config's row tile (as the benchmark times it)."""
    cfg = dataclasses.replace(config, split_k=split)
    w8, scale = _weight(2176, 6144, seed=2)
    x = _x(cfg.block_m - 3, 6144, seed=cfg.block_m)
    _assert_within(dd.dense_fp8_decode(x, w8, scale, cfg), x, w8, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("config", ["64,128,128,3,4,split4", "16,64,128,4,4", "32,128,128,3,4,split8,twopass"])
def test_rows_beyond_the_row_tile_loop(config):
    """More rows than the row tile: the program loops over row tiles (each re-reading its weight chunk)."""
    cfg = dd.parse_dense_config(config)
    w8, scale = _weight(2176, 6144, seed=2)
    x = _x(200, 6144, seed=200)
    _assert_within(dd.dense_fp8_decode(x, w8, scale, cfg), x, w8, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["split1", "split8", "split8,twopass", "split8 counters made in capture"])
def test_graph_replay_follows_new_inputs(variant, monkeypatch):
    """Captured once (split-K counters and partials included), replayed on new activations: equal to eager calls,
    bit for bit (the split-K sums are in a fixed order). Without counters when the capture starts, the captured
    call sums its splits in a second launch (a counter buffer zeroed in the capture would be zeroed only at replay)."""
    cfg = dd.parse_dense_config("64,128,128,3,4," + variant.split()[0])
    w8, scale = _weight(2176, 6144, seed=7)
    x = _x(64, 6144, seed=8)
    dd.dense_fp8_decode(x, w8, scale, cfg)  # compile outside the capture
    if "capture" in variant:
        dd.dense_fp8_decode(x, w8, scale, dataclasses.replace(cfg, two_pass=True))  # compile the second launch
        monkeypatch.setattr(dd, "_COUNTERS", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dd.dense_fp8_decode(x, w8, scale, cfg)
    for seed in (9, 10):
        x.copy_(_x(64, 6144, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, dd.dense_fp8_decode(x, w8, scale, cfg))
        assert torch.equal(out, dd.dense_fp8_decode(x, w8, scale, cfg))  # deterministic run to run
    if "capture" in variant:
        assert str(x.device) in dd._COUNTERS  # the eager calls made them


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_fp8_linear_dispatch_and_switch(monkeypatch):
    """ops/fp8.fp8_linear: the GEMV up to DECODE_ROWS, this kernel up to W8A16_MAX_ROWS, w8a8 above; the switch
    forces either of the last two."""
    from longcat_service.ops import fp8

    calls = []
    real = dd.dense_fp8_decode
    monkeypatch.setattr(dd, "dense_fp8_decode", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    monkeypatch.delenv("LONGCAT_FP8_DENSE_KERNEL", raising=False)
    w8, scale = _weight(2176, 6144, seed=11)
    top = fp8.W8A16_MAX_ROWS
    for rows in (fp8.DECODE_ROWS + 1, top, top + 1):
        x = _x(rows, 6144, seed=rows)
        y = fp8.fp8_linear(x, w8, scale)
        if rows <= top:
            _assert_within(y, x, w8, scale)
    assert calls == [fp8.DECODE_ROWS + 1, top]
    calls.clear()
    monkeypatch.setenv("LONGCAT_FP8_DENSE_KERNEL", "w8a8")
    fp8.fp8_linear(_x(16, 6144), w8, scale)
    monkeypatch.setenv("LONGCAT_FP8_DENSE_KERNEL", "triton")
    x = _x(300, 6144)
    _assert_within(fp8.fp8_linear(x, w8, scale), x, w8, scale)
    assert calls == [300]

"""The Triton w8a16 decode experts (kernels/fp8_expert_decode.py) against fp64 sums and ops/fp8_reference.py.

Without a GPU the kernels run in Triton's CPU interpreter on small shapes (partial 128-blocks, a block shared by
gate and up rows, K not a multiple of the K tile, experts with 0 / 1 / more than block_m rows, an empty batch, every
slot on zero experts, compact and full expert grids); with one, the same tests run the compiled kernels, and the
gpu-marked ones add the LongCat-Flash shapes under every benchmarked config, CUDA-graph replay and the dispatch.

Bounds. The SwiGLU launch: gate and up are fp32 sums of exact products of the weights rounded to the activation
dtype as the reference's (which the fp64 values use too), so within (K + 2) * 2^-24 of their magnitude of the fp64 values; each is rounded to the
activation dtype, then silu(gate) (|silu'| <= 1.1, |silu(g)| <= |g|) rounded, then the product rounded:
|h - silu(g) * u| <= 5 ulp |g| |u| + 1.2 (|g| acc_u + |u| acc_g). The down launch, from the kernel's own h: one
rounding plus fp32 accumulation error of the fp64 product. The whole FFN against the reference (which rounds the
dequantized weights to bf16 first, and h differently): a loose bound on top.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from tests.sm90_aot import assert_fits_shared_memory, compile_for_sm90

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels import fp8_expert_decode as fd  # noqa: E402
from longcat_service.ops import fp8_reference as fr  # noqa: E402
from longcat_service.ops import reference as ref  # noqa: E402
from longcat_service.ops.testing import make_router_inputs  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _hand_ids(tokens: int, num_experts: int) -> torch.Tensor:
    """[T, 3] distinct ids per token: expert 0 gets every token (more than 16 rows from T = 17), expert 1 one,
    experts 2..5 a few each, expert 6 none, expert 7 the odd tokens, zero experts (ids >= E) the even ones."""
    ids = torch.empty(tokens, 3, dtype=torch.int64)
    ids[:, 0] = 0
    ids[:, 1] = 2 + torch.arange(tokens) % 4
    ids[0, 1] = 1
    odd = torch.arange(tokens) % 2 == 1
    ids[:, 2] = torch.where(odd, torch.full((tokens,), 7), num_experts + torch.arange(tokens) % 2)
    return ids


@functools.lru_cache(maxsize=4)
def _case(tokens, num_experts, top_k, hidden_size, inter, routing="mixed", dtype=torch.bfloat16, seed=0):
    """Routing (on the CPU, as the reference ops) and weights (on DEV); cached: tests only read them."""
    g = torch.Generator().manual_seed(seed)
    if routing == "hand":
        ids = _hand_ids(tokens, num_experts)
        top_k = 3
    else:
        logits, bias = make_router_inputs(tokens, num_experts, num_experts // 2, zero_share=routing, generator=g)
        ids, _, _ = ref.router_topk(logits, bias, top_k, 6.0, num_experts)
    offsets, sorted_slots, _, active, num_active = ref.moe_align(ids, num_experts)
    hidden = (torch.randn(tokens, hidden_size, generator=g) * 2).to(dtype)
    gd = torch.Generator(device=DEV).manual_seed(seed)

    def weight(n, k):
        w8, scale = fr.block_quant(torch.randn(num_experts, n, k, generator=gd, device=DEV) * max(k, 1)**-0.5)
        # distinct scales per block, so that a scale read from the wrong block shows
        return w8, scale * (1 + torch.rand(scale.shape, generator=gd, device=DEV))

    w13, s13 = weight(2 * inter, hidden_size)
    w2, s2 = weight(hidden_size, inter)
    return dict(hidden=hidden.to(DEV), w13=w13, s13=s13, w2=w2, s2=s2, offsets=offsets.to(DEV),
                sorted_slots=sorted_slots.to(DEV), top_k=top_k, active=active.to(DEV), num_active=num_active.to(DEV))


def _weights(w8, scale, c):
    """The dequantized weights the kernel multiplies by (rounded to hidden's dtype, as the reference's), in fp64."""
    return fr.block_dequant(w8, scale, dtype=c["hidden"].dtype).double()


def _exact_gate_up(c):
    """fp64 gate, up and their products' magnitudes (for the accumulation bound) of the real rows."""
    inter = c["w13"].shape[1] // 2
    n = int(c["offsets"][-1])
    gu = torch.zeros(n, 2 * inter, dtype=torch.float64, device=DEV)
    mag = torch.zeros_like(gu)
    offs = c["offsets"].tolist()
    for e in range(c["w13"].shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            w = _weights(c["w13"][e], c["s13"][e], c)
            x = c["hidden"][c["sorted_slots"][a:b].long() // c["top_k"]].double()
            gu[a:b] = x @ w.t()
            mag[a:b] = x.abs() @ w.abs().t()
    return gu[:, :inter], gu[:, inter:], mag[:, :inter], mag[:, inter:]


def _assert_h_within(h, c):
    g, u, mg, mu = _exact_gate_up(c)
    n, k = g.shape[0], c["hidden"].shape[1]
    ulp = ULP[h.dtype]
    acc_g, acc_u = (k + 2) * 2.0**-24 * mg, (k + 2) * 2.0**-24 * mu
    exact = torch.nn.functional.silu(g) * u
    bound = 5 * ulp * g.abs() * u.abs() + 1.2 * (g.abs() * acc_u + u.abs() * acc_g) + 1e-7
    err = (h[:n].double() - exact).abs()
    assert torch.isfinite(h[:n].float()).all()
    bad = err > bound
    assert not bool(bad.any()), f"h: {int(bad.sum())}/{err.numel()} off, worst {float((err / bound).max()):.3g}x"


def _assert_y_within(y, h, c):
    """y against the fp64 down product of the kernel's own h."""
    n, k = int(c["offsets"][-1]), c["w2"].shape[2]
    offs = c["offsets"].tolist()
    exact = torch.zeros(n, c["w2"].shape[1], dtype=torch.float64, device=DEV)
    mag = torch.zeros_like(exact)
    for e in range(c["w2"].shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            w = _weights(c["w2"][e], c["s2"][e], c)
            exact[a:b] = h[a:b].double() @ w.t()
            mag[a:b] = h[a:b].double().abs() @ w.abs().t()
    bound = ULP[y.dtype] * exact.abs() + (k + 2) * 2.0**-24 * mag + 1e-7
    err = (y[:n].double() - exact).abs()
    assert torch.isfinite(y[:n].float()).all()
    bad = err > bound
    assert not bool(bad.any()), f"y: {int(bad.sum())}/{err.numel()} off, worst {float((err / bound).max()):.3g}x"


def _assert_close_to_reference(y, c):
    n = int(c["offsets"][-1])
    want = fr.expert_ffn_fp8_ref(c["hidden"], c["w13"], c["s13"], c["w2"], c["s2"], c["offsets"],
                                 c["sorted_slots"], c["top_k"])[:n].double()
    err = (y[:n].double() - want).abs()
    # the two differ by their roundings of h (and the reference's of the weights), each ~2^-9 of an h element,
    # which reach the output as a random sum: about 2^-8 of its magnitude on average
    assert float(err.max()) <= 2**-4 * float(want.abs().max()) + 1e-3
    assert float(err.mean()) <= 2**-6 * float(want.abs().mean()) + 1e-4


def _run(c, config, compact=True):
    routing = (c["active"], c["num_active"]) if compact else (None, None)
    h = fd.swiglu_fp8_decode(c["hidden"], c["w13"], c["s13"], c["offsets"], c["sorted_slots"], c["top_k"], *routing,
                             config=config)
    y = fd.down_fp8_decode(h, c["w2"], c["s2"], c["offsets"], *routing, config=config)
    return h, y


# (tokens, E, top_k, H, I, routing, dtype, config, also_full_grid): small tiles so that the interpreter walks several
# N tiles, K steps (masked where H or I is not a multiple of the K tile; several per scale block at block_k 32) and,
# for expert 0 of "hand", two row tiles (or one of 32 rows). Weight rows of a multiple of 16 bytes go through TMA,
# others (H = 200 for w13, I = 40 for w2) through the pointer-load fallback.
CASES = [
    (20, 8, 3, 272, 144, "hand", torch.bfloat16, "16,64,64,2,4", True),
    (20, 8, 3, 272, 144, "hand", torch.bfloat16, "16,64,128,2,4", False),
    (17, 8, 3, 200, 80, "hand", torch.float16, "32,32,64,1,4", False),
    (17, 8, 3, 208, 40, "hand", torch.float16, "16,32,64,1,4", False),
    (9, 8, 4, 200, 40, "mixed", torch.bfloat16, "16,32,32,2,4", True),
    (1, 3, 1, 128, 128, "none", torch.bfloat16, "16,64,128,2,4", False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])).replace("torch.", ""))
def test_decode_ffn_within_exact_bounds(case):
    tokens, num_experts, top_k, hidden_size, inter, routing, dtype, config, also_full_grid = case
    c = _case(tokens, num_experts, top_k, hidden_size, inter, routing, dtype, seed=tokens + inter)
    cfg = fd.parse_config(config)
    h, y = _run(c, cfg)
    assert h.shape == (c["sorted_slots"].numel(), inter) and h.dtype == dtype
    assert y.shape == (c["sorted_slots"].numel(), hidden_size) and y.dtype == dtype
    _assert_h_within(h, c)
    _assert_y_within(y, h, c)
    if dtype == torch.bfloat16:
        _assert_close_to_reference(y, c)
    n = int(c["offsets"][-1])
    whole = fd.expert_ffn_fp8_decode(c["hidden"], c["w13"], c["s13"], c["w2"], c["s2"], c["offsets"],
                                     c["sorted_slots"], c["top_k"], c["active"], c["num_active"], cfg, cfg)
    assert torch.equal(whole[:n], y[:n])
    if also_full_grid:  # every expert in the grid instead of the compact active list
        h_full, y_full = _run(c, cfg, compact=False)
        assert torch.equal(h_full[:n], h[:n]) and torch.equal(y_full[:n], y[:n])


def test_hand_routing_has_the_row_counts_it_claims():
    counts = torch.diff(ref.moe_align(_hand_ids(20, 8), 8)[0]).tolist()
    assert counts[0] == 20 > 16 and counts[1] == 1 and counts[6] == 0 and counts[7] == 10


@pytest.mark.parametrize("tokens,routing", [(0, "mixed"), (5, "all")])
def test_no_real_rows(tokens, routing):
    """An empty batch and a batch whose every slot is a zero expert: shapes right, nothing to compute."""
    c = _case(tokens, 8, 4, 256, 128, routing)
    assert int(c["offsets"][-1]) == 0
    y = fd.expert_ffn_fp8_decode(c["hidden"], c["w13"], c["s13"], c["w2"], c["s2"], c["offsets"],
                                 c["sorted_slots"], c["top_k"], c["active"], c["num_active"])
    assert y.shape == (tokens * 4, 256) and y.dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    c = _case(3, 4, 2, 128, 128, "none")
    args = [c["hidden"], c["w13"], c["s13"], c["w2"], c["s2"], c["offsets"], c["sorted_slots"], c["top_k"]]

    def call(**swap):
        a = list(args)
        for i, v in swap.items():
            a[int(i[1:])] = v
        return fd.expert_ffn_fp8_decode(*a)

    with pytest.raises(ValueError, match="w13_scale must be float32"):
        call(a2=c["s13"][:, :1])
    with pytest.raises(ValueError, match="w13 must be"):
        call(a1=c["w13"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="w2_scale must be float32"):
        call(a4=c["s2"].double())
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        call(a0=c["hidden"].float())
    with pytest.raises(ValueError, match="expert_offsets must be int32"):
        call(a5=c["offsets"].long())
    with pytest.raises(ValueError, match="sorted_slots must be int32"):
        call(a6=c["sorted_slots"][:-1])
    with pytest.raises(ValueError, match="both active_experts and num_active"):
        fd.expert_ffn_fp8_decode(*args, c["active"], None)
    h = torch.zeros(6, 128, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="expert_offsets must be int32"):
        fd.down_fp8_decode(h, c["w2"], c["s2"], c["offsets"].long())
    with pytest.raises(ValueError, match="active_experts must be int32"):
        fd.down_fp8_decode(h, c["w2"], c["s2"], c["offsets"], c["active"].long(), c["num_active"])


def test_config_parsing():
    cfg = fd.parse_config(" 16, 64,128,4,2 ")
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps) == (16, 64, 128, 4, 2)
    assert cfg == fd.DecodeConfig(16, 64, 128, 4, 2)
    assert fd.parse_config(str(cfg)) == cfg and str(fd.parse_config("32,16,32,1,2")) == "32,16,32,1,2"
    for bad, match in [("16,64,256,4,4", "must divide 128"), ("8,64,128,4,4", "power of two"),
                       ("16,64,128,4", "expected"), ("16,64,128,4,4,swap", "expected"),
                       ("16,64,128,4,4,pre", "expected"), ("16,64,128,4,4,tma", "expected"),
                       ("a,64,128,4,4", "integers"), ("16,64,128,0,4", "num_stages")]:
        with pytest.raises(ValueError, match=match):
            fd.parse_config(bad)
    assert len(set(fd.SWEEP_CONFIGS)) == len(fd.SWEEP_CONFIGS)
    assert fd.DEFAULT_GATE_UP_CONFIG in fd.SWEEP_CONFIGS and fd.DEFAULT_DOWN_CONFIG in fd.SWEEP_CONFIGS


def test_dispatch_rule_by_tokens_and_expert_width(monkeypatch):
    from longcat_service.ops import extension

    monkeypatch.delenv("LONGCAT_FP8_EXPERT_KERNEL", raising=False)
    monkeypatch.setattr(extension, "TRITON_FP8_DECODE_MIN_TOKENS_WIDE", 16)
    monkeypatch.setattr(extension, "TRITON_FP8_DECODE_MIN_TOKENS_NARROW", 8)
    assert [extension.fp8_decode_expert_kernel(t, 2048) for t in (1, 8, 15, 16, 64)] == [
        "cuda", "cuda", "cuda", "triton", "triton"]
    narrow = extension.TRITON_FP8_DECODE_WIDE_INTER - 1
    assert [extension.fp8_decode_expert_kernel(t, narrow) for t in (1, 7, 8, 64)] == [
        "cuda", "cuda", "triton", "triton"]
    assert extension.fp8_decode_expert_kernel(8, extension.TRITON_FP8_DECODE_WIDE_INTER) == "cuda"
    monkeypatch.setenv("LONGCAT_FP8_EXPERT_KERNEL", "cuda")
    assert extension.fp8_decode_expert_kernel(64, 2048) == "cuda"
    monkeypatch.setenv("LONGCAT_FP8_EXPERT_KERNEL", "triton")
    assert extension.fp8_decode_expert_kernel(1, 256) == "triton"
    monkeypatch.setenv("LONGCAT_FP8_EXPERT_KERNEL", "mma")
    with pytest.raises(ValueError, match="LONGCAT_FP8_EXPERT_KERNEL"):
        extension.fp8_decode_expert_kernel(64, 2048)


def test_supported_takes_only_cuda_fp8_with_standard_scales():
    c = _case(2, 4, 2, 128, 128, "none")
    assert fd.supported(c["hidden"], c["w13"], c["w2"], c["s13"], c["s2"]) == ON_GPU
    if ON_GPU:
        assert not fd.supported(c["hidden"].float(), c["w13"], c["w2"], c["s13"], c["s2"])
        assert not fd.supported(c["hidden"], c["w13"], c["w2"], c["s13"][:, :1], c["s2"])


_AOT = """
import torch
from longcat_service.kernels.fp8_expert_decode import SWEEP_CONFIGS
from longcat_service.kernels._fp8_expert_decode_triton import aot_compile
for cfg in SWEEP_CONFIGS:
    for kind in ("swiglu", "down"):
        ck = aot_compile(cfg, kind)
        ttgir = ck.asm["ttgir"]
        assert "warp_group_dot" in ttgir, (cfg, kind, "no wgmma")
        assert "async_tma_copy_global_to_local" in ttgir, (cfg, kind, "no tma")
        assert "async_copy_global_to_local" in ttgir, (cfg, kind, "no pipelined loads")
        print(kind, cfg, ck.metadata.shared, flush=True)
# the variants the small cases compile on a GPU: full grid, K not a multiple of the tile, top_k = 1 (a constant), fp16,
# w13 rows of 200 bytes (the pointer-load fallback) and w2 rows of 80 (TMA)
for cfg in (SWEEP_CONFIGS[0], SWEEP_CONFIGS[1]):
    for kind in ("swiglu", "down"):
        ck = aot_compile(cfg, kind, hidden=200, inter=80, num_experts=8, top_k=1, compact=False, dtype=torch.float16)
        ttgir = ck.asm["ttgir"]
        assert "warp_group_dot" in ttgir, (cfg, kind, "odd", "no wgmma")
        assert ("async_tma_copy_global_to_local" in ttgir) == (kind == "down"), (cfg, kind, "odd", "tma")
        print(kind, cfg, "odd", ck.metadata.shared, flush=True)
"""


def test_sm90_build_of_every_config():
    """Every benchmarked config compiles for sm_90 to wgmma with pipelined loads (TMA at the LongCat shapes) and fits
    the shared memory; so do odd shapes (the pointer-load fallback) and specialisations."""
    lines = compile_for_sm90(_AOT)
    assert len(lines) == 2 * len(fd.SWEEP_CONFIGS) + 4
    assert_fits_shared_memory(lines)


# ---- GPU: LongCat-Flash shapes, graphs, dispatch ----------------------------------------------------------------


@pytest.mark.parametrize("config", fd.SWEEP_CONFIGS, ids=str)
@pytest.mark.parametrize("tokens", [8, 64])
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_longcat_shapes_every_config(tokens, config):
    """H = 6144, I = 2048 (16 of the 512 experts: the same per-expert shapes; more rows per expert, at 64 tokens
    more than 16: two row tiles)."""
    c = _case(tokens, 16, 12, 6144, 2048, "mixed", seed=tokens)
    h, y = _run(c, config)
    _assert_h_within(h, c)
    _assert_y_within(y, h, c)
    _assert_close_to_reference(y, c)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("config", [fd.DEFAULT_GATE_UP_CONFIG, fd.parse_config("16,64,128,4,4")], ids=str)
def test_graph_replay_follows_new_routing(config):
    """Captured once, replayed on other routings of the same shapes (device-side counts, static grid)."""
    c = _case(16, 24, 12, 512, 256, "mixed", seed=1)
    static = {k: v.clone() if torch.is_tensor(v) else v for k, v in c.items()}
    args = lambda: (static["hidden"], static["w13"], static["s13"], static["w2"], static["s2"],  # noqa: E731
                    static["offsets"], static["sorted_slots"], static["top_k"], static["active"],
                    static["num_active"], config, config)
    fd.expert_ffn_fp8_decode(*args())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fd.expert_ffn_fp8_decode(*args())
    for seed in (2, 3):
        other = _case(16, 24, 12, 512, 256, "mixed", seed=seed)
        for key in ("hidden", "offsets", "sorted_slots", "active", "num_active"):
            static[key].copy_(other[key])
        graph.replay()
        n = int(other["offsets"][-1])
        want = fd.expert_ffn_fp8_decode(static["hidden"], c["w13"], c["s13"], c["w2"], c["s2"], other["offsets"],
                                        other["sorted_slots"], 12, other["active"], other["num_active"], config,
                                        config)
        assert torch.equal(out[:n], want[:n])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_dispatch_switch_picks_the_kernel(forced, monkeypatch):
    from longcat_service.ops import extension

    if not hasattr(torch.ops.longcat, "expert_ffn_fp8"):
        pytest.skip("FP8 ops not in the extension")
    monkeypatch.setenv("LONGCAT_FP8_EXPERT_KERNEL", forced)
    c = _case(16, 64, 12, 512, 256, "mixed", seed=4)  # 192 slots < 8 per expert: the decode regime
    args = (c["hidden"], c["w13"], c["s13"], c["w2"], c["s2"], c["offsets"], c["sorted_slots"], c["top_k"],
            c["active"], c["num_active"])
    y = extension.expert_ffn_fp8(*args)
    n = int(c["offsets"][-1])
    want = fd.expert_ffn_fp8_decode(*args) if forced == "triton" else torch.ops.longcat.expert_ffn_fp8(*args)
    assert torch.equal(y[:n], want[:n])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_fp8_model_forward_with_either_decode_kernel(tmp_path, monkeypatch):
    """The tiny FP8 model (E = 6, k = 3) on 8 tokens (24 slots: the decode regime) through the layers' dispatch, with
    each kernel forced: the Triton one runs (counted) and both give logits within bf16 rounding of each other."""
    import longcat_service.ops as ops
    from longcat_service.model.loader import load_model
    from tests.engine_utils import full_forward_logits
    from tests.fp8_checkpoint import ALIGNED, write_pair

    if ops.ACTIVE_BACKEND != "extension cpu+cuda" or not hasattr(torch.ops.longcat, "expert_ffn_fp8"):
        pytest.skip("CUDA FP8 ops not built")
    calls = []
    decode = fd.expert_ffn_fp8_decode
    monkeypatch.setattr(fd, "expert_ffn_fp8_decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    model = load_model(write_pair(tmp_path, ALIGNED, seed=5)["fp8"], dtype="bfloat16", device=DEV)
    tokens = list(range(3, 11))
    logits = {}
    for kernel in ("cuda", "triton"):
        monkeypatch.setenv("LONGCAT_FP8_EXPERT_KERNEL", kernel)
        calls.clear()
        logits[kernel] = full_forward_logits(model, tokens).cpu()
        assert bool(calls) == (kernel == "triton"), kernel
    assert torch.isfinite(logits["triton"]).all()
    torch.testing.assert_close(logits["triton"], logits["cuda"], rtol=5e-2, atol=5e-2)

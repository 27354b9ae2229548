"""Block-FP8 prefill kernels (Triton, Hopper FP8 tensor cores): w8a8 with dynamic per-token-group activations.

- per_token_group_quant_fp8(x): x [M, K] -> (x8 e4m3 [M, K], x_scale fp32 [M, ceil(K/128)]), exactly
  ops/fp8_reference.per_token_group_quant (s = max(|x_group|, 1e-10) / 448, x8 = clamp(x / s) rounded to nearest).
- w8a8_block_gemm(x, w8, scale): the dense prefill linears; quantizes x, then a block-scaled FP8 GEMM; out in x's
  dtype. Spec: ops/fp8_reference.w8a8_linear_ref (up to fp32 summation order).
- grouped_gemm_fp8(x8, x_scale, w8, w_scale, expert_offsets): the MoE prefill experts, grouped_gemm.py's contract
  (rows sorted by expert, device offsets, rows at or past expert_offsets[-1] left unwritten) with e4m3 operands.
Every GEMM K step is one 128-wide scale group (or a power-of-two part of it), so its partial product is scaled by
x_scale[m, g] * w_scale[n // 128, g] in fp32. Partial scale blocks (N or K not multiples of 128) are handled.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from longcat_service.kernels import device_capability, next_pow2
from longcat_service.kernels.grouped_gemm import GroupedGemmConfig, parse_config

FP8_DTYPE = torch.float8_e4m3fn
GROUP = 128
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class DenseFp8Config:
    """w8a8_block_gemm tiles: block_m is an upper bound (small M shrinks it); block_k divides 128."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_stages: int = 4
    num_warps: int = 8


DEFAULT_DENSE_CONFIG = DenseFp8Config()
DENSE_CONFIGS: tuple[DenseFp8Config, ...] = (
    DenseFp8Config(),
    DenseFp8Config(num_stages=3),
    DenseFp8Config(block_n=256, num_stages=3),
    DenseFp8Config(block_m=64, num_warps=4),
    DenseFp8Config(block_m=64, block_n=256, num_stages=3),
)

_FP8_FLAGS = ("flat",)


@dataclasses.dataclass(frozen=True)
class GroupedFp8Config(GroupedGemmConfig):
    """grouped_gemm's tiles and flags plus the FP8 kernel's persistent form (kernels/_fp8_gemm_triton.py):
    persistent: 0 = one program per (N tile, expert) walking the expert's row tiles; p > 0 = p programs per SM
    walking a device-side list of (expert, N tile, row tile) tiles of block_m rows (no split tail; p programs must
    fit one SM's shared memory). flatten: the persistent tile and K loops as one software pipeline (the next tile's
    loads overlap this tile's last steps; the compiled path only, the interpreter runs the plain loops)."""

    persistent: int = 0
    flatten: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.persistent <= 8:
            raise ValueError(f"grouped fp8 config: persistent={self.persistent} must be 0..8 programs per SM")
        if self.persistent and self.split_tail:
            raise ValueError("grouped fp8 config: persist and split do not combine (the persistent tiles are equal)")
        if self.flatten and not self.persistent:
            raise ValueError("grouped fp8 config: flat needs persist")
        if GROUP % self.block_k:
            raise ValueError(f"grouped fp8 config: block_k={self.block_k} must divide {GROUP}")

    def __str__(self) -> str:
        flags = (f"persist{self.persistent}",) * bool(self.persistent) + ("flat",) * self.flatten
        return ",".join([super().__str__(), *flags])


@functools.lru_cache(maxsize=128)
def parse_fp8_config(text: str) -> GroupedFp8Config:
    """"bn,bk,bm,stages,warps[,tma][,split][,persist<p>][,flat]" -> GroupedFp8Config ("persist" = persist1)."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    base = [p for p in parts if p not in _FP8_FLAGS and not p.startswith("persist")]
    persist = [p for p in parts if p.startswith("persist")]
    if len(persist) > 1 or (persist and not (persist[0][7:] or "1").isdigit()):
        raise ValueError(f"grouped fp8 config {text!r}: expected one flag 'persist' or 'persist<programs per SM>'")
    cfg = parse_config(",".join(base))
    return GroupedFp8Config(**dataclasses.asdict(cfg), persistent=int(persist[0][7:] or 1) if persist else 0,
                            flatten="flat" in parts)


# Grouped: the bf16 kernel's shapes with K steps of one whole scale group (fp8 tiles are half the bytes: a
# 128 x 128 x 128 stage pair is 32 KB).
GROUPED_CONFIGS: tuple[GroupedFp8Config, ...] = tuple(parse_fp8_config(c) for c in (
    "128,128,128,4,8,tma,split",
    "128,128,128,3,8,tma,split",
    "128,128,128,4,8,tma",
    "128,128,128,4,8",
    "128,128,64,4,4,tma",
    "256,128,128,3,8,tma,split",
    "64,128,128,4,4,tma,split",
    "128,64,128,4,8,tma,split",
))
# The further configs of the H200 sweep at ~64 rows per expert (4096 tokens x 12 slots over 768 experts incl. the
# zero experts; `benchmarks/bench_fp8_kernels.py --sections grouped`), 2026-12-03, us gate_up / down: wide weight
# tiles "256,128,64,5,8,tma" 4576 / 2493, "128,128,64,6,4,tma" 4597 / 2593; persistent "128,128,64,4,4,tma,persist2"
# 4633 / 1978 and flattened 4672 / 1962, "256,128,64,5,8,tma,persist1,flat" 3956 / 2638 (GROUPED_CONFIGS[4] 4609 /
# 2265, [6] 4133 / 2130). Deleted: swap-AB (token tiles on the wgmma's N side; best 4031 / 2309) and two K blocks
# per stage (k2; best 4263 / 2083), both slower than the defaults below, and Triton's warp specialization (ws;
# never timed, its Hopper build was fragile). None of these spills registers in the sm_90 build
# (tests/test_fp8_kernels.py).
VARIANT_CONFIGS: tuple[GroupedFp8Config, ...] = tuple(parse_fp8_config(c) for c in (
    "256,128,64,5,8,tma",
    "128,128,64,6,4,tma",
    "128,128,64,4,4,tma,persist2",
    "128,128,64,4,4,tma,persist2,flat",
    "256,128,64,5,8,tma,persist1,flat",
))
ALL_GROUPED_CONFIGS = GROUPED_CONFIGS + VARIANT_CONFIGS
# H200 run 1 (benchmarks/RESULTS.md): the first is the fastest of the four measured at the LongCat-Flash prefill
# shapes (gate_up 4651 us vs 4923 / 5541 / 5472, down 2474 vs 2732 / 2956 / 3133; bf16 6513 / 3271).
DEFAULT_GROUPED_CONFIG = GROUPED_CONFIGS[0]
# Per call site of the MoE prefill (ops/extension._expert_ffn_grouped_fp8), the fastest at the 4096-token
# LongCat-Flash shapes (32768 expert rows, H = 6144, I = 2048), H200, 2026-12-03, `python
# benchmarks/bench_fp8_kernels.py --sections grouped --reps 10 --no-fusion --config-list ...` (14 configs): gate_up
# "256,128,64,5,8,tma,persist1,flat" 3956 us = 0.79 of the copy floor (former default "64,128,128,4,4,tma,split"
# 4133), down "128,128,64,4,4,tma,persist2,flat" 1962 us = 0.83 (former "128,128,64,4,4,tma" 2265; without flat
# 1978).
DEFAULT_GATE_UP_CONFIG = parse_fp8_config("256,128,64,5,8,tma,persist1,flat")
DEFAULT_DOWN_CONFIG = parse_fp8_config("128,128,64,4,4,tma,persist2,flat")
# The same configs at other prompt lengths (same command, --tokens 1024,16384, H200 2026-12-03), gate_up / down us:
# 1024 tokens (16 rows per expert, weight-bound): "128,128,64,4,4,tma" 3135 / 1588 (1.00 of the copy floor), the
# 4096 pair 3344 / 1643; 16384 tokens (256 rows per expert, compute-bound): "128,128,64,4,4,tma,persist2,flat"
# 11393 / 5983, "256,128,64,5,8,tma,persist1,flat" 15284 (gate_up), "64,128,128,4,4,tma,split" 12644 / 6315.
SMALL_PREFILL_CONFIG = parse_fp8_config("128,128,64,4,4,tma")
LARGE_PREFILL_CONFIG = parse_fp8_config("128,128,64,4,4,tma,persist2,flat")
SMALL_PREFILL_MAX_TOKENS = 2048  # below: SMALL_PREFILL_CONFIG (geometric middles of the measured lengths)
LARGE_PREFILL_MIN_TOKENS = 8192  # from here: LARGE_PREFILL_CONFIG


def prefill_expert_configs(num_tokens: int) -> tuple[GroupedFp8Config, GroupedFp8Config]:
    """(gate_up, down) grouped configs of the MoE prefill of num_tokens tokens: the fastest measured near it."""
    if num_tokens < SMALL_PREFILL_MAX_TOKENS:
        return SMALL_PREFILL_CONFIG, SMALL_PREFILL_CONFIG
    if num_tokens >= LARGE_PREFILL_MIN_TOKENS:
        return LARGE_PREFILL_CONFIG, LARGE_PREFILL_CONFIG
    return DEFAULT_GATE_UP_CONFIG, DEFAULT_DOWN_CONFIG


def _check_scale(name: str, w8: torch.Tensor, scale: torch.Tensor) -> None:
    n, k = w8.shape[-2:]
    want = (*w8.shape[:-2], -(-n // GROUP), -(-k // GROUP))
    if w8.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: weight must be {FP8_DTYPE}, got {w8.dtype}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"{name}: scale must be float32 {want}, got {scale.dtype} {tuple(scale.shape)}")
    if scale.device != w8.device:
        raise ValueError(f"{name}: scale is on {scale.device}, weight on {w8.device}")


def per_token_group_quant_fp8(x: torch.Tensor, group: int = GROUP, pad_rows_to: int = 1,
                              scale_column_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16, fp16 or fp32, unit last stride) -> (x8 e4m3 [M, K], x_scale fp32 [M, ceil(K/group)]).

    pad_rows_to: both get M rounded up to a multiple of it, the extra rows x8 = 0 and x_scale = 1.
    scale_column_major: x_scale is the transposed view of a contiguous [ceil(K/group), M_pad] tensor. Together
    (4, True): the activation operand of cuBLASLt's blockwise scaled-mm as is (scaled_mm_blockwise)."""
    if group != GROUP:
        raise ValueError(f"per_token_group_quant_fp8: only group={GROUP} is implemented, got {group}")
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"per_token_group_quant_fp8: x must be 2-D {ACT_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError("per_token_group_quant_fp8: x needs a unit last stride")
    if pad_rows_to < 1:
        raise ValueError(f"per_token_group_quant_fp8: pad_rows_to must be >= 1, got {pad_rows_to}")
    m, k = x.shape
    m_pad, groups = -(-m // pad_rows_to) * pad_rows_to, -(-k // GROUP)
    x8 = torch.empty(m_pad, k, dtype=FP8_DTYPE, device=x.device)
    if scale_column_major:
        x_scale = torch.empty(groups, m_pad, dtype=torch.float32, device=x.device).t()
    else:
        x_scale = torch.empty(m_pad, groups, dtype=torch.float32, device=x.device)
    if m_pad and k:
        from longcat_service.kernels._fp8_gemm_triton import launch_quant

        launch_quant(x, x8, x_scale)
    return x8, x_scale


def w8a8_block_gemm(
    x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, config: DenseFp8Config | None = None
) -> torch.Tensor:
    """x [M, K] @ dequant(w8 [N, K], scale)^T with x quantized per token-group of 128 -> [M, N] in x's dtype."""
    if x.dim() != 2 or w8.dim() != 2 or x.shape[1] != w8.shape[1]:
        raise ValueError(f"w8a8_block_gemm: x {tuple(x.shape)} must be [M, K] and w8 {tuple(w8.shape)} [N, K]")
    _check_scale("w8a8_block_gemm", w8, scale)
    if x.device != w8.device:
        raise ValueError("w8a8_block_gemm: x and w8 must be on one device")
    if w8.shape[1] > 1 and w8.stride(1) != 1:
        raise ValueError("w8a8_block_gemm: w8 needs a unit last stride")
    x8, x_scale = per_token_group_quant_fp8(x)
    return scaled_gemm_fp8(x8, x_scale, w8, scale, x.dtype, config)


def scaled_gemm_fp8(x8, x_scale, w8, w_scale, out_dtype, config: DenseFp8Config | None = None) -> torch.Tensor:
    """The GEMM of w8a8_block_gemm on already quantized activations."""
    m, k = x8.shape
    n = w8.shape[0]
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"scaled_gemm_fp8: out dtype {out_dtype} not one of {OUT_DTYPES}")
    out = torch.empty(m, n, dtype=out_dtype, device=x8.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = config or DEFAULT_DENSE_CONFIG
    if GROUP % cfg.block_k:
        raise ValueError(f"scaled_gemm_fp8: block_k={cfg.block_k} must divide {GROUP}")
    block_m = min(cfg.block_m, next_pow2(m, minimum=16))
    from longcat_service.kernels._fp8_gemm_triton import launch_w8a8

    launch_w8a8(x8, x_scale.contiguous(), w8, w_scale.contiguous(), out, block_m, cfg.block_n, cfg.block_k,
                cfg.group_m, cfg.num_stages, cfg.num_warps)
    return out


def grouped_gemm_fp8(
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    max_rows_per_expert: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GroupedGemmConfig | None = None,
) -> torch.Tensor:
    """x8 e4m3 [R, K] with x_scale fp32 [R, ceil(K/128)], w8 e4m3 [E, N, K] with w_scale fp32
    [E, ceil(N/128), ceil(K/128)], expert_offsets int32 [E+1] (device, non-decreasing, within [0, R]) -> y [R, N]
    in out_dtype with y[r] = sum_g (x8[r, g] . w8[e, :, g]) * x_scale[r, g] * w_scale[e, :, g] for the rows of
    expert e; other rows are left uninitialised. max_rows_per_expert: grouped_gemm's tile-size hint.
    config: a GroupedFp8Config or GroupedGemmConfig (block_k must divide 128); default DEFAULT_GROUPED_CONFIG."""
    if x8.dim() != 2 or w8.dim() != 3 or x8.shape[1] != w8.shape[2]:
        raise ValueError(f"grouped_gemm_fp8: x8 {tuple(x8.shape)} must be [R, K] and w8 {tuple(w8.shape)} [E, N, K]")
    if x8.dtype != FP8_DTYPE:
        raise ValueError(f"grouped_gemm_fp8: x8 must be {FP8_DTYPE}, got {x8.dtype}")
    _check_scale("grouped_gemm_fp8", w8, w_scale)
    rows, k = x8.shape
    num_experts, n, _ = w8.shape
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (rows, -(-k // GROUP)):
        raise ValueError(f"grouped_gemm_fp8: x_scale must be float32 [{rows}, {-(-k // GROUP)}], got "
                         f"{x_scale.dtype} {tuple(x_scale.shape)}")
    if len({x8.device, w8.device, x_scale.device, expert_offsets.device}) != 1:
        raise ValueError("grouped_gemm_fp8: x8, x_scale, w8 and expert_offsets must be on one device")
    if expert_offsets.dtype != torch.int32 or expert_offsets.shape != (num_experts + 1,):
        raise ValueError(f"grouped_gemm_fp8: expert_offsets must be int32 [E+1] = [{num_experts + 1}], "
                         f"got {expert_offsets.dtype} {tuple(expert_offsets.shape)}")
    if (k > 1 and x8.stride(1) != 1) or (k > 1 and w8.stride(2) != 1):
        raise ValueError("grouped_gemm_fp8: the last dimension of x8 and w8 must be contiguous")
    if k == 0:
        return torch.zeros(rows, n, dtype=out_dtype, device=x8.device)
    y = torch.empty(rows, n, dtype=out_dtype, device=x8.device)
    if rows == 0 or n == 0 or num_experts == 0:
        return y
    cfg = config or DEFAULT_GROUPED_CONFIG
    if GROUP % cfg.block_k:
        raise ValueError(f"grouped_gemm_fp8: block_k={cfg.block_k} must divide {GROUP}")
    block_m = cfg.block_m
    if max_rows_per_expert is not None:
        block_m = min(block_m, next_pow2(max(int(max_rows_per_expert), 1), minimum=16))
    split_tail = cfg.split_tail and block_m >= 32
    from longcat_service.kernels._fp8_gemm_triton import launch_grouped

    launch_grouped(x8, x_scale.contiguous(), w8, w_scale.contiguous(), expert_offsets.contiguous(), y, block_m,
                   cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps, cfg.tma, split_tail,
                   persistent=getattr(cfg, "persistent", 0), flatten=getattr(cfg, "flatten", False))
    return y


def grouped_gemm_fp8_reference(x8, x_scale, w8, w_scale, expert_offsets, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Per expert: exact dequant of both operands, fp32 matmul, one rounding; rows past expert_offsets[-1] zero.
    (The weight's dequant is ops/fp8_reference.block_dequant's, written out: kernels import nothing from ops.)"""
    k, n = x8.shape[1], w8.shape[1]
    xq = x8.float() * x_scale.repeat_interleave(GROUP, dim=1)[:, :k]
    wq = w8.float() * w_scale.float().repeat_interleave(GROUP, dim=-2).repeat_interleave(GROUP, dim=-1)[:, :n, :k]
    y = torch.zeros(x8.shape[0], n, dtype=out_dtype, device=x8.device)
    offsets = expert_offsets.tolist()
    for e in range(w8.shape[0]):
        a, b = offsets[e], offsets[e + 1]
        if b > a:
            y[a:b] = (xq[a:b] @ wq[e].t()).to(out_dtype)
    return y


SCALED_MM_MIN_ROWS = 4  # H200, torch 2.11 (run 1): blockwise scaled-mm rejected M = 1 (scale stride) and 2 (cuBLASLt)
SCALED_MM_ROW_MULTIPLE = 4  # the activation scale's column-major leading dimension (M) must be a multiple of 4


def scaled_mm_supported(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """Whether scaled_mm_blockwise takes x [M, K] bf16 @ w8 [N, K]: Hopper (sm_90; the cuBLASLt blockwise kernels),
    torch with F.scaled_mm, N and K whole 128-blocks, K/128 a multiple of 4 (the weight scale's column-major view
    needs a leading dimension padded to 4), M >= SCALED_MM_MIN_ROWS, contiguous weight and scale. Host metadata."""
    import torch.nn.functional as F

    m, k = x.shape
    n = w8.shape[0]
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "scaled_mm") and m >= SCALED_MM_MIN_ROWS
            and n % GROUP == 0 and k % GROUP == 0 and (k // GROUP) % 4 == 0 and w8.is_contiguous()
            and w_scale.is_contiguous() and w_scale.dtype == torch.float32 and w8.device == x.device
            and device_capability(x.device) == (9, 0))


def w8a8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense prefill product (x quantized per token-group, block-FP8 weight): torch's blockwise scaled-mm where
    it takes the shape (1.4-1.8x faster than w8a8_block_gemm at 4096 rows on the H200, run 1), else the Triton GEMM."""
    if scaled_mm_supported(x, w8, scale):  # the quantizer writes scaled-mm's padded, column-major operands
        x8, x_scale = per_token_group_quant_fp8(x, pad_rows_to=SCALED_MM_ROW_MULTIPLE, scale_column_major=True)
        return scaled_mm_blockwise(x8, x_scale, w8, scale, x.dtype)[: x.shape[0]]
    return w8a8_block_gemm(x, w8, scale)


def scaled_mm_ready(x8: torch.Tensor, x_scale: torch.Tensor) -> bool:
    """Are (x8, x_scale) already in scaled-mm's activation layout (rows a multiple of 4, column-major scale)?"""
    m = x8.shape[0]
    return m % SCALED_MM_ROW_MULTIPLE == 0 and x_scale.shape[0] == m and x_scale.stride() == (1, m)


def scaled_mm_blockwise(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The same product through torch's scaled-mm (cuBLASLt blockwise 1x128 x 128x128 scaling, Hopper, CUDA >=
    12.9). Needs K and N multiples of 128 and K/128 a multiple of 4 (the scale layouts below); M is padded to a
    multiple of 4 (zero rows; the activation scale's column-major leading dimension), here unless
    per_token_group_quant_fp8 already wrote that layout (scaled_mm_ready: no pad / fill / copy kernels); raises
    where torch lacks it."""
    m, k = x8.shape
    n = w8.shape[0]
    if k % GROUP or n % GROUP or (k // GROUP) % 4:
        raise ValueError(f"scaled_mm_blockwise: needs K, N multiples of 128 and K/128 of 4, got K={k} N={n}")
    if scaled_mm_ready(x8, x_scale):
        a_scale = x_scale
    else:
        m_pad = -(-m // SCALED_MM_ROW_MULTIPLE) * SCALED_MM_ROW_MULTIPLE
        if m_pad != m:  # F.pad on the bytes: zero bytes are e4m3 zeros
            x8 = torch.nn.functional.pad(x8.view(torch.uint8), (0, 0, 0, m_pad - m)).view(FP8_DTYPE)
        a_scale = torch.ones(k // GROUP, m_pad, dtype=torch.float32, device=x8.device)
        a_scale[:, :m] = x_scale.t()
        a_scale = a_scale.t()  # [M_pad, K/128], column-major
    b_scale = w_scale.t()  # [K/128, N/128] view of the contiguous [N/128, K/128]: column-major
    import torch.nn.functional as F

    if hasattr(F, "scaled_mm"):
        from torch.nn.functional import ScalingType, SwizzleType

        out = F.scaled_mm(x8, w8.t(), [a_scale], [ScalingType.BlockWise1x128], [b_scale],
                          [ScalingType.BlockWise128x128], swizzle_a=[SwizzleType.NO_SWIZZLE],
                          swizzle_b=[SwizzleType.NO_SWIZZLE], output_dtype=out_dtype)
    else:
        out = torch._scaled_mm(x8, w8.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    return out[:m]

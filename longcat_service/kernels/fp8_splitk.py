"""Split-K block-FP8 w8a8 GEMM for decode row counts (M <= 128): every SM streams weight.

w8a8_splitk_linear(x, w8, scale) = ops/fp8_reference.w8a8_linear_ref up to fp32 summation order: x [M, K] (bf16 /
fp16 / fp32, unit last stride) quantized per token-group of 128 (kernels/fp8_gemm.per_token_group_quant_fp8), w8
e4m3 [N, K] (unit last stride) with its standard fp32 block scale [ceil(N/128), ceil(K/128)] -> [M, N] in x's
dtype. N and K need not be multiples of 128 (masked edge tiles and partial last scale group).

Why: cuBLASLt's blockwise scaled-mm with 128-wide N tiles gives the small-N decode shapes 17-96 CTAs on an H200's
132 SMs, and reached ~0.5 of the copy rate on the 20 dense linears of a LongCat-Flash-2L decode step. Here the K
groups are split over `split` programs per output tile so that a shape launches about TARGET_WAVES x SMs programs
(_fp8_splitk_triton.py: one tile x K range per program; split > 1 sums the fp32 partials in a second launch, in
split order: deterministic).

Configs (SplitKConfig: block_n, split, stages, warps, swap, tma, fuse = quantize x inside the GEMM instead of a
separate per_token_group_quant_fp8 launch, the same bits): the row tile is next_pow2(M) (16..128, one row tile
for decode batches, so the weight is read once), not part of the config. config_for(m, n, k) takes SHAPE_CONFIGS
(the measured winners) else the rule of default_config. Choices use shapes only: CUDA-graph safe (no host sync; the
partial workspace is a plain allocation of each call, the graph's pool at capture). ops/fp8.fp8_linear takes it for
rows in (DECODE_ROWS, LONGCAT_FP8_SPLITK_MAX_ROWS] on the shapes with a SHAPE_CONFIGS entry only.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from longcat_service.kernels import device_capability, next_pow2

FP8_DTYPE = torch.float8_e4m3fn
GROUP = 128
MAX_ROWS = 128  # the largest row tile (one wgmma N side / one program's rows); more rows loop over row tiles
MAX_SPLIT = 32
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_SMS = 132  # an H200's: the SM count assumed off-GPU (the interpreter)
TARGET_WAVES = 2  # programs per SM the default rule aims at (a full wave at two resident programs per SM)
MIN_GROUPS_PER_SPLIT = 4  # the default rule leaves each program at least this many K groups (a pipeline's worth)


@dataclasses.dataclass(frozen=True)
class SplitKConfig:
    """block_n: weight rows per program (64, 128 or 256; <= 128 keeps one weight scale per K group); split: K
    ranges per output tile (0 = the default rule's for the shape); swap_ab: the transposed product (module
    docstring of _fp8_splitk_triton.py); tma: tensor-descriptor (TMA) loads of both tiles where the layout allows
    (K a multiple of 16, aligned rows), else pointer loads (cp.async); fuse: each program quantizes its x groups
    itself (bit for bit per_token_group_quant_fp8's), saving the quantization launch at the price of reading x in
    its dtype and quantizing it once per N tile."""

    block_n: int = 128
    split: int = 0
    num_stages: int = 4
    num_warps: int = 4
    swap_ab: bool = True
    tma: bool = False
    fuse: bool = False

    def __post_init__(self):
        if self.block_n not in (32, 64, 128, 256):
            raise ValueError(f"fp8 split-K config: block_n={self.block_n} must be 32, 64, 128 or 256")
        if not 0 <= self.split <= MAX_SPLIT:
            raise ValueError(f"fp8 split-K config: split={self.split} must be 0 (auto) .. {MAX_SPLIT}")
        if self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8):
            raise ValueError(f"fp8 split-K config: stages={self.num_stages} >= 1, warps={self.num_warps} in 1/2/4/8")

    def __str__(self) -> str:
        flags = ("swap",) * self.swap_ab + ("tma",) * self.tma + ("fuse",) * self.fuse
        return ",".join([*map(str, (self.block_n, self.split, self.num_stages, self.num_warps)), *flags])


@functools.lru_cache(maxsize=128)
def parse_splitk_config(text: str) -> SplitKConfig:
    """"bn,split,stages,warps[,swap][,tma][,fuse]" -> SplitKConfig (split 0: the default rule's split)."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    flags = parts[4:]
    if len(parts) < 4 or any(f not in ("swap", "tma", "fuse") for f in flags) or len(set(flags)) < len(flags):
        raise ValueError(f"fp8 split-K config {text!r}: expected 'bn,split,stages,warps[,swap][,tma][,fuse]'")
    try:
        bn, split, stages, warps = (int(p) for p in parts[:4])
    except ValueError:
        raise ValueError(f"fp8 split-K config {text!r}: the first four fields must be integers") from None
    return SplitKConfig(bn, split, stages, warps, swap_ab="swap" in flags, tma="tma" in flags, fuse="fuse" in flags)


# Where split-K beats cuBLAS's blockwise scaled-mm (the dispatch takes it there only): (row tile, N, K) -> the fastest
# config. H200 2026-12-04, `python benchmarks/bench_fp8_kernels.py --sections dense_decode --reps 10 --dense-rows
# 16,64` and `--dense-rows 32,128` (us at the tile's row count: this config / cuBLAS). Not entered (cuBLAS as fast or
# faster): q_b 12288x1536 at every tile (16: 12.2 / 11.7, 32: 12.6 / 12.0, 64: 12.3 / 11.3, 128: 12.4 / 11.5),
# o_proj and down at 64 (29.1 / 28.9, 40.7 / 40.9) and 128 rows (36.1 / 29.9, 53.2 / 42.1), gate_up at 128 (71.6 /
# 56.2). The 20 linears of a 2L decode step: 484 / 584 us at 16 rows, 502 / 623 at 32, 596 / 629 at 64.
SHAPE_CONFIGS: dict[tuple[int, int, int], SplitKConfig] = {
    (16, 2176, 6144): parse_splitk_config("64,8,4,4,swap,tma"),  # 12.4 / 15.4
    (16, 6144, 8192): parse_splitk_config("64,3,4,4,swap,tma"),  # 21.7 / 24.4
    (16, 24576, 6144): parse_splitk_config("64,1,4,4,swap,tma"),  # 45.5 / 60.1
    (16, 6144, 12288): parse_splitk_config("64,3,4,4,swap,tma"),  # 29.1 / 34.4
    (32, 2176, 6144): parse_splitk_config("64,8,4,4,swap,tma"),  # 13.2 / 15.7
    (32, 6144, 8192): parse_splitk_config("64,3,4,4,swap,tma"),  # 22.5 / 28.6
    (32, 24576, 6144): parse_splitk_config("64,1,4,4,swap,tma"),  # 46.7 / 58.9
    (32, 6144, 12288): parse_splitk_config("64,3,4,4,swap,tma"),  # 30.6 / 40.5
    (64, 2176, 6144): parse_splitk_config("128,12,4,4,tma"),  # 15.6 / 21.9
    (64, 24576, 6144): parse_splitk_config("128,1,4,4,swap,tma"),  # 51.1 / 54.2
    (128, 2176, 6144): parse_splitk_config("64,4,4,4,swap,tma"),  # 18.5 / 22.4
}


def measured_config(rows: int, n: int, k: int) -> SplitKConfig | None:
    """The SHAPE_CONFIGS entry of this many rows' tile and shape: where the dispatch takes split-K."""
    return SHAPE_CONFIGS.get((block_m_for(rows), n, k))


# Candidates the benchmark times per shape and row count beside the default (split 0 = the rule's for the shape).
SWEEP_CONFIGS: tuple[SplitKConfig, ...] = tuple(parse_splitk_config(c) for c in (
    "64,0,4,4,swap",
    "64,0,4,4,swap,tma",
    "128,0,4,4,swap",
    "128,0,4,4,swap,tma",
    "128,0,4,8,swap,tma",
    "128,0,4,4,tma",
    "256,0,3,8,swap,tma",
    "64,0,4,4,swap,tma,fuse",
    "128,0,4,4,swap,tma,fuse",
))


def block_m_for(rows: int) -> int:
    """The row tile of a call: next_pow2(rows), 16..MAX_ROWS."""
    return min(next_pow2(max(rows, 1), minimum=16), MAX_ROWS)


def auto_split(n: int, k: int, block_n: int, sms: int = DEFAULT_SMS) -> int:
    """The default rule's split: the smallest that gives the shape TARGET_WAVES x sms programs, at most one split
    per MIN_GROUPS_PER_SPLIT K groups (and at least 1)."""
    n_tiles = -(-n // block_n)
    groups = -(-k // GROUP)
    most = max(1, min(MAX_SPLIT, groups // MIN_GROUPS_PER_SPLIT))
    want = -(-TARGET_WAVES * sms // max(n_tiles, 1))
    return max(1, min(want, most))


def default_config(rows: int, n: int, k: int, sms: int = DEFAULT_SMS) -> SplitKConfig:
    """The config of shapes without a SHAPE_CONFIGS entry (direct calls; the dispatch does not take those). Timed on
    the H200 2026-12-04: slower than cuBLAS on every LongCat shape at 16 and 64 rows. The rule: 128-row weight tiles
    (64 where the 128-row grid is under one program per SM, and for the 128-row tile: 128 x 128 fp32 accumulators
    need 8 warps and still spill in the sm_90 build), the swapped product (unswapped, Triton's sm_90 build of a
    16-row tile runs no FP8 MMA at all), TMA loads (fewer registers than pointer loads in the sm_90 build: 208
    against 246 at 64 rows x 128), 4 stages, 4 warps, the auto split, and the quantization fused up to 32-row tiles
    (it saves a launch of a few us against linears whose byte floor is 3-35 us; each program's share of it grows
    with the rows, 16 divisions per thread and group at 16 rows, 64 at 64)."""
    tile = block_m_for(rows)
    block_n = 128 if -(-n // 128) >= sms and tile <= 64 else 64
    return SplitKConfig(block_n=block_n, split=auto_split(n, k, block_n, sms), num_stages=4, num_warps=4, tma=True,
                        fuse=tile <= 32)


def config_for(rows: int, n: int, k: int, sms: int = DEFAULT_SMS) -> SplitKConfig:
    """The config of a call: a measured SHAPE_CONFIGS entry for its row tile and shape, else default_config. A
    config's split 0 is resolved to auto_split."""
    cfg = SHAPE_CONFIGS.get((block_m_for(rows), n, k)) or default_config(rows, n, k, sms)
    if cfg.split == 0:
        cfg = dataclasses.replace(cfg, split=auto_split(n, k, cfg.block_n, sms))
    return cfg


def resolve_split(k: int, split: int) -> tuple[int, int]:
    """(split, groups per split): K's 128-wide groups in `split` ranges of whole groups, none empty (so the
    effective split may be smaller than asked)."""
    groups = max(1, -(-k // GROUP))
    per = -(-groups // max(1, min(split, groups)))
    return -(-groups // per), per


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def _check(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"w8a8_splitk_linear: x must be 2-D {ACT_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if w8.dim() != 2 or w8.dtype != FP8_DTYPE or w8.shape[1] != x.shape[1]:
        raise ValueError(f"w8a8_splitk_linear: w8 must be {FP8_DTYPE} [N, {x.shape[1]}], got {w8.dtype} "
                         f"{tuple(w8.shape)}")
    n, k = w8.shape
    want = (-(-n // GROUP), -(-k // GROUP))
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"w8a8_splitk_linear: scale must be float32 {want} (the standard 128-block layout), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if k > 1 and (w8.stride(1) != 1 or x.stride(1) != 1):
        raise ValueError("w8a8_splitk_linear: x and w8 need unit last strides")
    if w8.device != x.device or scale.device != x.device:
        raise ValueError("w8a8_splitk_linear: w8 and scale must be on x's device")


def w8a8_splitk_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                       config: SplitKConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(w8, scale)^T with x quantized per token-group of 128 -> [M, N] in x's dtype."""
    _check(x, w8, scale)
    m, k = x.shape
    n = w8.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = config or config_for(m, n, k, sm_count(x.device))
    if cfg.fuse:
        return splitk_gemm_fp8(x, None, w8, scale, out, cfg)
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8

    x8, x_scale = per_token_group_quant_fp8(x)
    return splitk_gemm_fp8(x8, x_scale, w8, scale, out, cfg)


def splitk_gemm_fp8(x8, x_scale, w8, w_scale, out, config: SplitKConfig | None = None) -> torch.Tensor:
    """The GEMM of w8a8_splitk_linear on quantized activations (x_scale [M, ceil(K/128)], unit last stride) into
    out [M, N] (contiguous); returns out. x_scale None: x8 is the unquantized x, quantized inside the GEMM (the
    config's fuse)."""
    m, k = x8.shape
    n = w8.shape[0]
    if not out.is_contiguous() or tuple(out.shape) != (m, n):
        raise ValueError(f"splitk_gemm_fp8: out must be a contiguous [{m}, {n}], got {tuple(out.shape)}")
    sms = sm_count(x8.device)
    cfg = config or config_for(m, n, k, sms)
    split, per = resolve_split(k, cfg.split or auto_split(n, k, cfg.block_n, sms))
    if split * m * n >= 2**31:
        raise ValueError(f"w8a8_splitk_linear: {split} K splits of [{m}, {n}] exceed the partials' int32 indexing")
    from longcat_service.kernels._fp8_splitk_triton import launch_splitk

    launch_splitk(x8, x_scale, w8, w_scale.contiguous(), out, block_m_for(m), cfg.block_n, split, per, cfg.swap_ab,
                  cfg.num_stages, cfg.num_warps, cfg.tma)
    return out


def supported(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether w8a8_splitk_linear takes these on a GPU: CUDA with FP8 tensor cores (sm_89+), x [M, K] bf16 / fp16
    and e4m3 w8 [N, K] with unit last strides and the standard block scale, all on one device. Host metadata only."""
    if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16) or w8.dim() != 2:
        return False
    n, k = w8.shape
    if w8.dtype != FP8_DTYPE or x.shape[1] != k or w8.device != x.device or scale.device != x.device:
        return False
    if scale.dtype != torch.float32 or tuple(scale.shape) != (-(-n // GROUP), -(-k // GROUP)):
        return False
    if k > 1 and (w8.stride(1) != 1 or x.stride(1) != 1):
        return False
    return device_capability(x.device) >= (8, 9)


def aot_compile_splitk(config, rows: int, n: int, k: int, split: int, capability: int = 90):
    """triton.compile of _splitk_kernel as launch_splitk() would specialise it for x [rows, k] @ w [n, k] (the row
    tile as block_m_for picks it), for a CUDA GPU of this capability, without a GPU (offline check of the
    GPU build; needs TRITON_INTERPRET unset at import). Returns triton's CompiledKernel."""
    from longcat_service.kernels._fp8_gemm_triton import _aot
    from longcat_service.kernels._fp8_splitk_triton import TensorDescriptor, _splitk_kernel, tma_supported

    split, groups_per_split = resolve_split(k, split)
    x8 = torch.empty(rows, k, dtype=torch.float8_e4m3fn)
    f32 = torch.empty(rows, 1)
    w_rows = torch.empty(64, k, dtype=torch.float8_e4m3fn)  # a stand-in: specialisation reads dtype and block
    if config.fuse:
        x8 = torch.empty(rows, k, dtype=torch.bfloat16)
    use_tma = config.tma and tma_supported(x8, w_rows)
    block_m = block_m_for(rows)
    values = dict(a_ptr=x8, b_ptr=w_rows, c_ptr=torch.empty(1, dtype=torch.bfloat16), part_ptr=f32, as_ptr=f32,
                  bs_ptr=f32, M=rows, N=n, K=k, groups_per_split=groups_per_split, s_am=k, s_bn=k, s_cm=n,
                  s_asm=-(-k // GROUP), s_bsn=-(-k // GROUP), s_ps=rows * n,
                  a_desc=TensorDescriptor(x8, [rows, k], [k, 1], [block_m, GROUP]) if use_tma else None,
                  b_desc=TensorDescriptor(w_rows, [n, k], [k, 1], [config.block_n, GROUP]) if use_tma else None)
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=config.block_n, PARTIAL=split > 1, SWAP_AB=config.swap_ab,
                      EVEN_K=k % GROUP == 0, TMA=use_tma, FUSE_QUANT=config.fuse, MANUAL_FP8=False, MANUAL_BF16=False,
                      USE_WHILE=False)
    return _aot(_splitk_kernel, values, constexprs, config.num_warps, config.num_stages, capability)

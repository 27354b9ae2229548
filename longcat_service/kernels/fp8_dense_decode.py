"""Dense linears of decode batches with block-FP8 weights (Triton, w8a16): the weight streamed once per step.

dense_fp8_decode(x, w8, scale) = ops/fp8_reference.fp8_linear_ref (weight-only): x [M, K] bf16 / fp16 (unit last
stride), w8 e4m3 [N, K] (unit last stride) with its standard fp32 block scale [ceil(N/128), ceil(K/128)] -> y [M, N]
in x's dtype. Numerics: each weight tile dequantized to x's dtype as the reference's weights (bf16(w8 * scale),
bit for bit), exact products, fp32 sums (split-K: per-chunk fp32 sums added in chunk order), one rounding.

The kernel (_fp8_dense_decode_triton.py) is the decode experts' machinery (fp8_expert_decode.py) with one expert:
one program per N tile and K chunk, all rows in row tiles of block_m (config by row count: DENSE_CONFIGS, whose row
tile covers its rows, so that the weight is read once; SHAPE_CONFIGS for shapes whose fastest config differs), K
split so that the grid covers the SMs (split_k 0 = auto: resolve_split's modelled trade of a full grid against the
split-K fixup's reads). ops/fp8.fp8_linear takes it for decode rows above its GEMV's (ops/fp8.dense_regime).

CUDA-graph safe: grid and split come from shapes only; the split-K tile counters are kept per device, zeroed once
(outside captures) and left zeroed by every launch; no host sync.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from longcat_service.kernels import device_capability, next_pow2
from longcat_service.kernels.fp8_expert_decode import DecodeConfig

FP8_DTYPE = torch.float8_e4m3fn
SCALE_BLOCK = 128
ACT_DTYPES = (torch.bfloat16, torch.float16)
MIN_SPLIT_K_COLUMNS = 512  # an auto split leaves each program at least this much K (4 K steps of 128: a pipeline)
MAX_SPLIT_K = 8  # the fixup holds one small tile per split in registers (unspilled up to 8)
DEFAULT_SMS = 132  # the SM count assumed off-GPU (the interpreter): an H200's


@dataclasses.dataclass(frozen=True)
class DenseDecodeConfig(DecodeConfig):
    """DecodeConfig's tiles (block_m: the row tile; rows above it loop, re-reading the weight chunk) plus split_k:
    K chunks per N tile, 0 = auto (module docstring), and two_pass: split-K sums by a second launch over all SMs
    instead of the last-arriving program of each N tile (the same sums: the same bits)."""

    split_k: int = 0
    two_pass: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"fp8 dense decode config: split_k={self.split_k} must be 0 (auto) .. {MAX_SPLIT_K}")

    def __str__(self) -> str:
        flags = (f"split{self.split_k}",) * bool(self.split_k) + ("twopass",) * self.two_pass
        return ",".join([super().__str__(), *flags])


@functools.lru_cache(maxsize=128)
def parse_dense_config(text: str) -> DenseDecodeConfig:
    """"bm,bn,bk,stages,warps[,split<S>][,twopass]" -> DenseDecodeConfig (no split field: auto; twopass: the split-K
    sums in a second launch instead of the last program of each N tile)."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    flags = parts[5:]
    splits = [f for f in flags if f.startswith("split") and f[5:].isdigit()]
    if len(parts) < 5 or len(splits) > 1 or len(set(flags)) < len(flags) or any(
            f not in ("twopass", *splits) for f in flags):
        raise ValueError(f"fp8 dense decode config {text!r}: expected 'bm,bn,bk,stages,warps[,split<S>][,twopass]'")
    try:
        bm, bn, bk, stages, warps = (int(p) for p in parts[:5])
    except ValueError:
        raise ValueError(f"fp8 dense decode config {text!r}: the first five fields must be integers") from None
    return DenseDecodeConfig(bm, bn, bk, stages, warps, int(splits[0][5:]) if splits else 0, "twopass" in flags)


# The config of a call by its row count: the first entry whose rows bound takes it (the last one beyond). NOT YET
# MEASURED (starting points from the decode experts' H200 winner "16,128,128,3,4": the row tile grows with the rows,
# K tiles shrink where the activation tile would crowd the shared memory); `benchmarks/bench_fp8_kernels.py
# --sections dense_decode` times these and SWEEP_DENSE_CONFIGS (each at the row counts whose tile is its block_m) at the
# LongCat shapes and prints the fastest per rows.
DENSE_CONFIGS: tuple[tuple[int, DenseDecodeConfig], ...] = tuple((rows, parse_dense_config(c)) for rows, c in (
    (16, "16,128,128,3,4"),
    (32, "32,128,128,3,4"),
    (64, "64,128,128,3,4"),
    (128, "128,128,64,3,8"),
    (256, "256,64,64,3,8"),
))
SWEEP_DENSE_CONFIGS: tuple[DenseDecodeConfig, ...] = tuple(parse_dense_config(c) for c in (
    "16,64,128,4,4",
    "16,128,128,4,4",
    "16,128,128,3,4,twopass",
    "16,256,128,2,4",
    "32,64,128,4,4",
    "32,128,128,4,4",
    "32,128,64,4,4",
    "64,64,128,4,4",
    "64,128,64,4,8",
    "64,128,128,3,8",
    "64,128,128,3,4,twopass",
    "64,256,128,3,8",
    "128,64,128,3,4",
    "128,128,64,3,8",
    "128,128,128,2,8",
    "256,64,128,2,8",
    "256,64,64,3,8,twopass",
))


# Per-shape exceptions to DENSE_CONFIGS: (rows bound of a DENSE_CONFIGS entry, N, K) -> config. Empty until measured:
# the dense_decode benchmark prints the entries where a shape's fastest config beats its rows' default.
SHAPE_CONFIGS: dict[tuple[int, int, int], DenseDecodeConfig] = {}


def rows_bound(rows: int) -> int:
    """The DENSE_CONFIGS rows bound that takes a call of `rows` rows (the last one beyond)."""
    return next((bound for bound, _ in DENSE_CONFIGS if rows <= bound), DENSE_CONFIGS[-1][0])


def config_for_rows(rows: int) -> DenseDecodeConfig:
    return dict(DENSE_CONFIGS)[rows_bound(rows)]


def config_for(rows: int, n: int, k: int) -> DenseDecodeConfig:
    """The config of a call: its shape's exception, else its rows' default."""
    return SHAPE_CONFIGS.get((rows_bound(rows), n, k)) or config_for_rows(rows)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# The auto split's model (assumed, not measured: the dense_decode benchmark's split sweep checks it): the weight
# streams at the copy rate when the grid covers the SMs, proportionally slower on fewer; each N tile's fixup then
# reads split * block_m * block_n fp32 partials from L2 on one SM.
COPY_BYTES_PER_US = 4.2e6
SM_L2_BYTES_PER_US = 1.2e5


def _modelled_us(n: int, k: int, config: DenseDecodeConfig, split: int, sms: int) -> float:
    n_tiles = -(-n // config.block_n)
    stream = n * k / COPY_BYTES_PER_US / min(1.0, n_tiles * split / sms)
    fixup = split * config.block_m * config.block_n * 4 / SM_L2_BYTES_PER_US if split > 1 else 0.0
    return stream + fixup


def resolve_split(n: int, k: int, config: DenseDecodeConfig, sms: int) -> tuple[int, int]:
    """(split, chunk): K chunks of `chunk` columns (whole 128-column scale blocks), none empty. Auto (split_k 0): the
    split of the least modelled time (_modelled_us, rows = the config's row tile, so that one binary serves all of
    its row counts), chunks of at least MIN_SPLIT_K_COLUMNS, at most MAX_SPLIT_K."""
    k_blocks = max(1, -(-k // SCALE_BLOCK))
    if config.split_k:
        want = config.split_k
    else:
        most = min(MAX_SPLIT_K, max(1, k // MIN_SPLIT_K_COLUMNS), k_blocks)
        want = min(range(1, most + 1), key=lambda s: _modelled_us(n, k, config, s, sms))
    chunk_blocks = -(-k_blocks // max(1, min(want, k_blocks)))
    return -(-k_blocks // chunk_blocks), chunk_blocks * SCALE_BLOCK


# Split-K tile counters, one buffer per device (created outside CUDA-graph captures, e.g. by the engine's eager
# warm-up; every fixup launch leaves it zeroed). Per device, not per stream: two fixup launches running at once on
# two streams would share them; the decode step runs every dense linear on one stream (the side stream of
# layers/side_stream.py carries the routed experts only). Outgrown buffers stay referenced: a CUDA graph captured
# with one keeps using it.
_COUNTERS: dict[str, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []
MIN_COUNTERS = 4096


def _counters(device: torch.device, n_tiles: int) -> torch.Tensor | None:
    """The device's zeroed counters (at least n_tiles), or None where they cannot be made now: during a CUDA-graph
    capture a new buffer's zeroing would only run at replay (that call sums its splits in a second launch instead)."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= n_tiles:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _RETIRED.append(buf)
    buf = _COUNTERS[key] = torch.zeros(max(n_tiles, MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf


def _check(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"dense_fp8_decode: x must be 2-D {ACT_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if w8.dim() != 2 or w8.dtype != FP8_DTYPE or w8.shape[1] != x.shape[1]:
        raise ValueError(f"dense_fp8_decode: w8 must be {FP8_DTYPE} [N, {x.shape[1]}], got {w8.dtype} "
                         f"{tuple(w8.shape)}")
    n, k = w8.shape
    want = (-(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"dense_fp8_decode: scale must be float32 {want} (the standard 128-block layout), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if k > 1 and (w8.stride(1) != 1 or x.stride(1) != 1):
        raise ValueError("dense_fp8_decode: x and w8 need unit last strides")
    if w8.device != x.device or scale.device != x.device:
        raise ValueError("dense_fp8_decode: w8 and scale must be on x's device")


def dense_fp8_decode(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                     config: DenseDecodeConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(w8, scale)^T -> [M, N] in x's dtype (module docstring)."""
    _check(x, w8, scale)
    m, k = x.shape
    n = w8.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    cfg = config or config_for(m, n, k)
    block_m = min(cfg.block_m, next_pow2(m, minimum=16))
    split, chunk = resolve_split(n, k, cfg, _sm_count(x.device))
    if split * m * n >= 2**31:
        raise ValueError(f"dense_fp8_decode: {split} K splits of [{m}, {n}] exceed the partials' int32 indexing")
    counters = y  # a placeholder where no fixup runs
    if split > 1 and not cfg.two_pass:
        counters = _counters(x.device, -(-n // cfg.block_n))
        if counters is None:
            cfg, counters = dataclasses.replace(cfg, two_pass=True), y
    from longcat_service.kernels._fp8_dense_decode_triton import launch_dense

    launch_dense(x, w8, scale.contiguous(), y, counters, block_m, cfg, split, chunk)
    return y


def supported(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether dense_fp8_decode takes these on a GPU: CUDA with e4m3 in Triton (sm_89+), bf16 / fp16 x [M, K] and
    e4m3 w8 [N, K] with unit last strides and the standard block scale, all on one device. Host metadata only."""
    if not x.is_cuda or x.dim() != 2 or x.dtype not in ACT_DTYPES or w8.dim() != 2 or w8.dtype != FP8_DTYPE:
        return False
    n, k = w8.shape
    if x.shape[1] != k or w8.device != x.device or scale.device != x.device or scale.dtype != torch.float32:
        return False
    if tuple(scale.shape) != (-(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK)):
        return False
    if k > 1 and (w8.stride(1) != 1 or x.stride(1) != 1):
        return False
    return device_capability(x.device) >= (8, 9)

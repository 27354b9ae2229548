"""Grouped GEMM of the MoE prefill experts (Triton): y[r] = x[r] @ w[e]^T for the rows r of expert e.

The same contract as torch._grouped_mm(x, w.transpose(1, 2), offs=expert_offsets[1:]) (with
expert_offsets[0] == 0): rows sorted by expert, expert e's rows are expert_offsets[e] .. expert_offsets[e+1]
(device values: no host sync), rows at or past expert_offsets[-1] are left unwritten. fp32 accumulation,
output in x's dtype.

At prefill sizes (LongCat-Flash: 512 experts, ~64 rows each for a 4096-token prompt) the GEMMs are bound by
streaming every expert's weights once, so each program owns one expert and one N tile and walks the
expert's rows in BLOCK_M tiles itself (see _grouped_gemm_triton.py). The tile sizes come from CONFIGS,
picked by env LONGCAT_GROUPED_GEMM_CONFIG ("bn,bk,bm,stages,warps" plus optional flags ",tma" and ",split",
e.g. "128,64,128,4,8,tma"; read at each call) or DEFAULT_CONFIG; benchmarks/bench_grouped_gemm.py times
them all.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from longcat_service import envs
from longcat_service.kernels import next_pow2

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_ENV = "LONGCAT_GROUPED_GEMM_CONFIG"
_FLAGS = ("tma", "split")


@dataclasses.dataclass(frozen=True)
class GroupedGemmConfig:
    """Tile shape and launch options. tma: TMA descriptor loads (16-bit dtypes with 16-byte aligned rows;
    otherwise the launch falls back to pointer loads). split_tail: an expert's last row tile runs with
    block_m // 2 rows when those suffice."""

    block_n: int
    block_k: int
    block_m: int
    num_stages: int
    num_warps: int
    tma: bool = False
    split_tail: bool = False

    def __post_init__(self):
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"grouped_gemm config: {name}={v} must be a power of two >= 16")
        if self.split_tail and self.block_m < 32:
            raise ValueError("grouped_gemm config: split needs block_m >= 32 (the half tile is >= 16 rows)")
        if self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"grouped_gemm config: bad num_stages={self.num_stages} / num_warps={self.num_warps}")

    def __str__(self) -> str:
        flags = ("tma",) * self.tma + ("split",) * self.split_tail
        return ",".join([str(v) for v in (self.block_n, self.block_k, self.block_m, self.num_stages,
                                          self.num_warps)] + list(flags))


@functools.lru_cache(maxsize=64)
def parse_config(text: str) -> GroupedGemmConfig:
    """"bn,bk,bm,stages,warps[,tma][,split]" -> GroupedGemmConfig."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    flags = parts[5:]
    if len(parts) < 5 or any(f not in _FLAGS for f in flags):
        raise ValueError(f"{CONFIG_ENV}={text!r}: expected 'bn,bk,bm,stages,warps' and optional flags {_FLAGS}")
    try:
        bn, bk, bm, stages, warps = (int(p) for p in parts[:5])
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}={text!r}: the first five fields must be integers") from None
    return GroupedGemmConfig(bn, bk, bm, stages, warps, tma="tma" in flags, split_tail="split" in flags)


# Candidates for the H200 (228 KB shared memory per SM; each stage holds a (bm + bn) x bk tile pair, e.g.
# 32 KB at 128/128/64 bf16, so 3 stages (96 KB) leave room for two programs per SM: one streams while the other
# fills its pipeline or stores). bm = 128 covers nearly every expert of a 4096-token prompt in one row tile
# (~64 +- 8 rows per expert), so each weight tile is streamed once; bm = 64 splits about half the experts into
# two tiles (their weights read twice, the second time mostly from HBM); split runs an expert's last tile with
# bm / 2 rows when they suffice (half the tensor-core work for those experts).
CONFIGS: tuple[GroupedGemmConfig, ...] = tuple(parse_config(c) for c in (
    "128,64,128,4,8,tma",
    "128,64,128,3,8,tma",
    "128,64,128,4,8",
    "128,64,128,3,8",
    "128,64,128,4,8,tma,split",
    "128,64,128,3,8,tma,split",
    "128,128,128,3,8,tma",
    "256,64,128,3,8,tma",
    "64,128,128,4,4,tma",
    "64,64,128,4,4,tma",
    "128,64,64,4,4,tma",
    "128,64,64,5,4,tma",
    "128,64,64,4,4",
    "256,64,64,4,8,tma",
    "128,128,64,4,4,tma",
))
# fastest for both GEMMs of a 4096-token prefill on the H200 (session 4: gate_up 6.73 vs torch._grouped_mm 7.84 ms,
# down 3.49 vs 4.13 ms; outputs bit-identical)
DEFAULT_CONFIG = parse_config(envs.default(CONFIG_ENV))  # "128,64,128,3,8,tma,split"


def config_from_env() -> GroupedGemmConfig:
    return parse_config(envs.LONGCAT_GROUPED_GEMM_CONFIG)


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert x @ w^T in fp32, rounded once to x's dtype; rows past expert_offsets[-1] are zero."""
    y = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    offsets = expert_offsets.tolist()
    for e in range(w.shape[0]):
        a, b = offsets[e], offsets[e + 1]
        if b > a:
            y[a:b] = (x[a:b].float() @ w[e].float().t()).to(x.dtype)
    return y


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    max_rows_per_expert: int | None = None,
    config: GroupedGemmConfig | None = None,
) -> torch.Tensor:
    """x [R, K], w [E, N, K] (one dtype, unit last strides), expert_offsets int32 [E+1] on x's device, non-
    decreasing, within [0, R] -> y [R, N] with y[r] = x[r] @ w[e]^T for expert_offsets[e] <= r <
    expert_offsets[e+1]; other rows are left uninitialised.

    max_rows_per_expert: an optional host-known bound on any expert's rows (e.g. the token count: top-k
    experts are distinct); a bound under the config's block_m shrinks the row tile to fit it. config:
    overrides LONGCAT_GROUPED_GEMM_CONFIG / DEFAULT_CONFIG.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(f"grouped_gemm: x {tuple(x.shape)} must be [R, K] and w {tuple(w.shape)} [E, N, K]")
    if x.dtype not in DTYPES or w.dtype != x.dtype:
        raise ValueError(f"grouped_gemm: dtypes x {x.dtype}, w {w.dtype} must match and be one of {DTYPES}")
    if x.device != w.device or expert_offsets.device != x.device:
        raise ValueError("grouped_gemm: x, w and expert_offsets must be on one device")
    if expert_offsets.dtype != torch.int32 or expert_offsets.shape != (w.shape[0] + 1,):
        raise ValueError(f"grouped_gemm: expert_offsets must be int32 [E+1] = [{w.shape[0] + 1}], "
                         f"got {expert_offsets.dtype} {tuple(expert_offsets.shape)}")
    if (x.shape[1] > 1 and x.stride(1) != 1) or (w.shape[2] > 1 and w.stride(2) != 1):
        raise ValueError("grouped_gemm: the last dimension of x and w must be contiguous")
    rows, k = x.shape
    num_experts, n, _ = w.shape
    if k == 0:  # empty sums
        return torch.zeros(rows, n, dtype=x.dtype, device=x.device)
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0 or num_experts == 0:
        return y
    cfg = config or config_from_env()
    block_m = cfg.block_m
    if max_rows_per_expert is not None:
        block_m = min(block_m, next_pow2(max(int(max_rows_per_expert), 1), minimum=16))
    split_tail = cfg.split_tail and block_m >= 32
    from longcat_service.kernels._grouped_gemm_triton import launch

    launch(x, w, expert_offsets.contiguous(), y, block_m, cfg.block_n, cfg.block_k, cfg.num_stages,
           cfg.num_warps, cfg.tma, split_tail)
    return y

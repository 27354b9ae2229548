"""Routed experts at decode with block-FP8 weights (Triton, w8a16): each active expert's weights streamed once.

expert_ffn_fp8_decode has the contract of ops/extension.expert_ffn_fp8 (spec: ops/fp8_reference.expert_ffn_fp8_ref,
weight-only): hidden [T, H] bf16 / fp16, w13 e4m3 [E, 2I, H] (gate rows, then up rows) and w2 e4m3 [E, H, I] with
their standard fp32 block scales [E, ceil(N/128), ceil(K/128)], moe_align's expert_offsets / sorted_slots (and
optionally its compact active_experts / num_active) -> y [T*k, H] in hidden's dtype, row r = the SwiGLU FFN of
expert e on token sorted_slots[r] // k for r in expert e's range; rows at or past expert_offsets[-1] unspecified.

Two launches (kernels in _fp8_expert_decode_triton.py): SwiGLU (gate_up GEMM, silu(gate) * up fused in its epilogue)
into h [T*k, I], then down. Each program owns one expert and one N tile and runs all of the expert's rows (up to
block_m) through one pass over its weight tile, so at decode (~1-5 rows per expert) each active expert's e4m3 bytes
are read from HBM once; the CUDA kernel (csrc/cuda/expert_ffn_fp8.cu) runs passes of at most 2 rows, re-streaming
the weights of experts with more. Numerics: each weight tile dequantized to the activation dtype as the
reference's weights, bf16(w8 * scale) bit for bit, exact products, fp32 sums; gate and up rounded to the activation
dtype before silu(gate) * up, as the reference's eager ops.

CUDA-graph safe: the grids come from shapes only (E or min(E, T*k) experts, N tiles); the row counts are read on
the device, programs without rows exit at once; no host sync.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

FP8_DTYPE = torch.float8_e4m3fn
SCALE_BLOCK = 128
ACT_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles of one of the two GEMMs. block_m: rows per pass over the weights (>= 16, the tensor cores' minimum);
    block_k divides 128 (one scale block per K step). The kernel's form (swap-AB, prescaled weight tiles, TMA
    where the layout allows) is fixed: see the Triton module."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_stages: int = 4
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"fp8 decode config: {name}={v} must be a power of two >= 16")
        if SCALE_BLOCK % self.block_k:
            raise ValueError(f"fp8 decode config: block_k={self.block_k} must divide {SCALE_BLOCK}")
        if self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"fp8 decode config: bad num_stages={self.num_stages} / num_warps={self.num_warps}")

    def __str__(self) -> str:
        return ",".join(str(v) for v in (self.block_m, self.block_n, self.block_k, self.num_stages, self.num_warps))


@functools.lru_cache(maxsize=64)
def parse_config(text: str) -> DecodeConfig:
    """"bm,bn,bk,stages,warps" -> DecodeConfig."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if len(parts) != 5:
        raise ValueError(f"fp8 decode config {text!r}: expected 'bm,bn,bk,stages,warps'")
    try:
        bm, bn, bk, stages, warps = (int(p) for p in parts[:5])
    except ValueError:
        raise ValueError(f"fp8 decode config {text!r}: the first five fields must be integers") from None
    return DecodeConfig(bm, bn, bk, stages, warps)


# Tile sizes around the H200 winner, timed per launch by `benchmarks/bench_fp8_kernels.py --sections experts`. Per
# stage a program holds a bn x bk e4m3 tile (SwiGLU: two, gate and up) plus bm x bk bf16 rows. H200, 2026-12-03,
# I = 2048, B = 64 (gate_up / down us), all in the kernel's one form (then flags swap,pre,tma): 16,128,128,3,4 2130 /
# 1060 (0.91 of the byte floors; the fastest of both), 16,64,128,4,4 2464 / 1248, 16,64,128,6,4 2475 / 1275,
# 16,128,128,3,8 2536 / 1214, 32,64,128,4,4 2695 / 1365. The other forms measured at 16,64,128,4,4 (unswapped
# 2577 / 1262, unswapped prescaled 2398 / 1266, swapped without prescale or TMA 2653-3394 / 1292-1370) were slower
# than the winner and are deleted. 16,128,128,4,4 and 16,256,128,2,4 are not yet measured.
SWEEP_CONFIGS: tuple[DecodeConfig, ...] = tuple(parse_config(c) for c in (
    "16,128,128,3,4",
    "16,64,128,4,4",
    "16,64,128,6,4",
    "16,128,128,3,8",
    "32,64,128,4,4",
    "16,128,128,4,4",
    "16,256,128,2,4",
))
DEFAULT_GATE_UP_CONFIG = parse_config("16,128,128,3,4")
DEFAULT_DOWN_CONFIG = DEFAULT_GATE_UP_CONFIG


def _check_weight(name: str, w8: torch.Tensor, scale: torch.Tensor, n: int, k: int, num_experts: int) -> None:
    want = (num_experts, -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))
    if w8.dtype != FP8_DTYPE or tuple(w8.shape) != (num_experts, n, k):
        raise ValueError(f"expert_ffn_fp8_decode: {name} must be {FP8_DTYPE} [{num_experts}, {n}, {k}], got "
                         f"{w8.dtype} {tuple(w8.shape)}")
    if k > 1 and w8.stride(2) != 1:
        raise ValueError(f"expert_ffn_fp8_decode: {name} needs a unit last stride")
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"expert_ffn_fp8_decode: {name}_scale must be float32 {want} (the standard 128-block "
                         f"layout), got {scale.dtype} {tuple(scale.shape)}")


def _check_routing(expert_offsets, sorted_slots, active_experts, num_active, num_experts, num_slots, device):
    if expert_offsets.dtype != torch.int32 or tuple(expert_offsets.shape) != (num_experts + 1,):
        raise ValueError(f"expert_ffn_fp8_decode: expert_offsets must be int32 [{num_experts + 1}], got "
                         f"{expert_offsets.dtype} {tuple(expert_offsets.shape)}")
    tensors = [expert_offsets]
    if sorted_slots is not None:  # the down launch has no sorted_slots
        if sorted_slots.dtype != torch.int32 or sorted_slots.dim() != 1 or sorted_slots.shape[0] != num_slots:
            raise ValueError(f"expert_ffn_fp8_decode: sorted_slots must be int32 [T*k] = [{num_slots}], got "
                             f"{sorted_slots.dtype} {tuple(sorted_slots.shape)}")
        tensors.append(sorted_slots)
    if (active_experts is None) != (num_active is None):
        raise ValueError("expert_ffn_fp8_decode: pass both active_experts and num_active, or neither")
    if active_experts is not None:
        if active_experts.dtype != torch.int32 or tuple(active_experts.shape) != (num_experts,):
            raise ValueError(f"expert_ffn_fp8_decode: active_experts must be int32 [{num_experts}]")
        if num_active.dtype != torch.int32 or num_active.numel() != 1:
            raise ValueError("expert_ffn_fp8_decode: num_active must be int32 [1]")
        tensors += [active_experts, num_active]
    if any(t.device != device for t in tensors):
        raise ValueError("expert_ffn_fp8_decode: the routing tensors must be on hidden's device")


def expert_ffn_fp8_decode(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    top_k: int,
    active_experts: torch.Tensor | None = None,
    num_active: torch.Tensor | None = None,
    gate_up_config: DecodeConfig | None = None,
    down_config: DecodeConfig | None = None,
) -> torch.Tensor:
    """The routed experts' SwiGLU FFN (module docstring) -> y [T*k, H] in hidden's dtype."""
    h = swiglu_fp8_decode(hidden, w13, w13_scale, expert_offsets, sorted_slots, top_k, active_experts, num_active,
                          gate_up_config)
    return down_fp8_decode(h, w2, w2_scale, expert_offsets, active_experts, num_active, down_config,
                           hidden_size=hidden.shape[1])


def swiglu_fp8_decode(hidden, w13, w13_scale, expert_offsets, sorted_slots, top_k, active_experts=None,
                      num_active=None, config: DecodeConfig | None = None) -> torch.Tensor:
    """First launch: h [T*k, I] (hidden's dtype), h[r] = silu(x_r @ Wg[e]^T) * (x_r @ Wu[e]^T) rounded as the
    reference, x_r = hidden[sorted_slots[r] // top_k]; rows of no expert unspecified."""
    if hidden.dim() != 2 or hidden.dtype not in ACT_DTYPES:
        raise ValueError(f"expert_ffn_fp8_decode: hidden must be 2-D {ACT_DTYPES}, got {hidden.dtype} "
                         f"{tuple(hidden.shape)}")
    if w13.dim() != 3 or w13.shape[1] % 2:
        raise ValueError(f"expert_ffn_fp8_decode: w13 must be [E, 2I, H], got {tuple(w13.shape)}")
    if top_k < 1:
        raise ValueError(f"expert_ffn_fp8_decode: top_k must be >= 1, got {top_k}")
    num_experts, two_i, h_size = w13.shape
    inter = two_i // 2
    num_slots = sorted_slots.shape[0] if sorted_slots.dim() == 1 else -1
    if h_size != hidden.shape[1]:
        raise ValueError(f"expert_ffn_fp8_decode: w13 {tuple(w13.shape)} does not match hidden size {hidden.shape[1]}")
    _check_weight("w13", w13, w13_scale, two_i, h_size, num_experts)
    _check_routing(expert_offsets, sorted_slots, active_experts, num_active, num_experts, hidden.shape[0] * top_k,
                   hidden.device)
    if w13.device != hidden.device or w13_scale.device != hidden.device:
        raise ValueError("expert_ffn_fp8_decode: w13 and its scale must be on hidden's device")
    h = torch.empty(num_slots, inter, dtype=hidden.dtype, device=hidden.device)
    if num_slots == 0 or num_experts == 0 or inter == 0:
        return h
    if h_size == 0:
        return h.zero_()  # silu(0) * 0
    if h_size > 1 and hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    from longcat_service.kernels._fp8_expert_decode_triton import launch_swiglu

    launch_swiglu(hidden, w13, w13_scale.contiguous(), h, expert_offsets, sorted_slots, int(top_k), active_experts,
                  num_active, config or DEFAULT_GATE_UP_CONFIG)
    return h


def down_fp8_decode(h, w2, w2_scale, expert_offsets, active_experts=None, num_active=None,
                    config: DecodeConfig | None = None, hidden_size: int | None = None) -> torch.Tensor:
    """Second launch: y [T*k, H] = h @ W2[e]^T for expert e's rows (h's dtype); rows of no expert unspecified."""
    if w2.dim() != 3:
        raise ValueError(f"expert_ffn_fp8_decode: w2 must be [E, H, I], got {tuple(w2.shape)}")
    num_experts, h_size, inter = w2.shape
    if hidden_size is not None and h_size != hidden_size:
        raise ValueError(f"expert_ffn_fp8_decode: w2 {tuple(w2.shape)} does not match hidden size {hidden_size}")
    if h.dim() != 2 or h.shape[1] != inter or h.dtype not in ACT_DTYPES:
        raise ValueError(f"expert_ffn_fp8_decode: h must be [T*k, {inter}] {ACT_DTYPES}, got {h.dtype} "
                         f"{tuple(h.shape)}")
    _check_weight("w2", w2, w2_scale, h_size, inter, num_experts)
    _check_routing(expert_offsets, None, active_experts, num_active, num_experts, h.shape[0], h.device)
    if w2.device != h.device or w2_scale.device != h.device:
        raise ValueError("expert_ffn_fp8_decode: w2 and its scale must be on hidden's device")
    y = torch.empty(h.shape[0], h_size, dtype=h.dtype, device=h.device)
    if h.shape[0] == 0 or num_experts == 0 or h_size == 0:
        return y
    if inter == 0:
        return y.zero_()
    from longcat_service.kernels._fp8_expert_decode_triton import launch_down

    launch_down(h, w2, w2_scale.contiguous(), y, expert_offsets, active_experts, num_active,
                config or DEFAULT_DOWN_CONFIG)
    return y


def supported(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
              w2_scale: torch.Tensor) -> bool:
    """Whether expert_ffn_fp8_decode takes these on a GPU: CUDA, bf16 / fp16 hidden, e4m3 weights with unit last
    strides and standard block scales (host metadata only)."""
    if not hidden.is_cuda or hidden.dim() != 2 or hidden.dtype not in ACT_DTYPES:
        return False
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE or w13.dim() != 3 or w2.dim() != 3:
        return False
    e, two_i, h_size = w13.shape
    want13 = (e, -(-two_i // SCALE_BLOCK), -(-h_size // SCALE_BLOCK))
    want2 = (e, -(-h_size // SCALE_BLOCK), -(-(two_i // 2) // SCALE_BLOCK))
    return (tuple(w2.shape) == (e, h_size, two_i // 2) and tuple(w13_scale.shape) == want13
            and tuple(w2_scale.shape) == want2 and w13.stride(2) == 1 and w2.stride(2) == 1)

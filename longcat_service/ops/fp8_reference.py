"""Pure-PyTorch reference of the block-FP8 ops: the spec of the FP8 CUDA/Triton kernels and their CPU path.

Weight format (DeepSeek-V3 block FP8): w8 float8_e4m3fn [..., N, K] with an fp32 scale [..., ceil(N/B), ceil(K/B)]
(B = 128); W[i, j] = float(w8[i, j]) * scale[i // B, j // B]. The scale is a multiplier (the checkpoints call it
weight_scale_inv). Edge blocks may be partial (N or K not a multiple of B); every function here handles them.
Activations (prefill, w8a8) are quantized per token and group of B columns: s = max(|x_group|, 1e-10) / 448.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_service.ops import reference as ref

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _expand_scale(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """scale [..., ceil(rows/b), ceil(cols/b)] -> [..., rows, cols], each block's value repeated over its elements."""
    full = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return full[..., :rows, :cols]


def _check_scale(w8: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    if w8.dim() not in (2, 3):
        raise ValueError(f"fp8 weight must be 2-D [N, K] or 3-D [E, N, K], got shape {tuple(w8.shape)}")
    n, k = w8.shape[-2:]
    want = (*w8.shape[:-2], _cdiv(n, block), _cdiv(k, block))
    if tuple(scale.shape) != want:
        raise ValueError(f"fp8 weight {tuple(w8.shape)} needs a scale of shape {want}, got {tuple(scale.shape)}")


def block_dequant(
    w8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """w8 [N, K] or [E, N, K] (float8_e4m3fn) and its block scale -> the weight in `dtype` (computed in fp32)."""
    _check_scale(w8, scale, block)
    n, k = w8.shape[-2:]
    return (w8.float() * _expand_scale(scale.float(), n, k, block)).to(dtype)


def block_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] or [E, N, K] -> (w8 float8_e4m3fn, scale fp32 [..., ceil(N/b), ceil(K/b)]), one scale per b x b block.

    scale = max(amax(|block|), 1e-12) / 448, w8 = clamp(w / scale, -448, 448) rounded to e4m3, so that
    block_dequant(w8, scale) equals w within e4m3 rounding (relative 2^-4 of each element, block by block).
    """
    if w.dim() not in (2, 3):
        raise ValueError(f"weight to quantize must be 2-D [N, K] or 3-D [E, N, K], got shape {tuple(w.shape)}")
    n, k = w.shape[-2:]
    nb, kb = _cdiv(n, block), _cdiv(k, block)
    wf = w.float()
    padded = F.pad(wf.abs(), (0, kb * block - k, 0, nb * block - n))  # zeros never raise a block's amax
    blocks = padded.reshape(*w.shape[:-2], nb, block, kb, block)
    amax = blocks.amax(dim=(-3, -1)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    w8 = (wf / _expand_scale(scale, n, k, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w8, scale


def per_token_group_quant(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 float8_e4m3fn [M, K], x_scale fp32 [M, ceil(K/group)]); x ~= x8 * x_scale per group.

    s = max(|x_group|, 1e-10) / 448 (computed in fp32), x8 = clamp(x / s, -448, 448) rounded to e4m3. A partial
    last group uses only its real columns.
    """
    if x.dim() != 2:
        raise ValueError(f"activations to quantize must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    g = _cdiv(k, group)
    xf = x.float()
    padded = F.pad(xf.abs(), (0, g * group - k))
    amax = padded.reshape(m, g, group).amax(dim=-1).clamp(min=1e-10)
    # tensor / tensor: IEEE division on every device (CUDA divides by a Python scalar as a multiply by its
    # reciprocal, which rounds differently from the kernels' correctly rounded division)
    x_scale = amax / torch.full_like(amax, FP8_MAX)
    full = x_scale.repeat_interleave(group, dim=-1)[:, :k]
    x8 = (xf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, x_scale


def fp8_linear_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only FP8 linear: x [..., K] @ dequant(w8)^T -> [..., N] in x's dtype (dequantized to x's dtype)."""
    return F.linear(x, block_dequant(w8, scale, dtype=x.dtype))


def w8a8_linear_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w8a8 block FP8 linear, the spec of the prefill kernels: x [M, K] quantized per token-group of 128, both
    operands dequantized exactly in fp32, matmul in fp32, out [M, N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x8, x_scale = per_token_group_quant(x2)
    xq = x8.float() * x_scale.repeat_interleave(BLOCK, dim=-1)[:, : x2.shape[-1]]
    out = xq @ block_dequant(w8, scale, dtype=torch.float32).t()
    return out.to(x.dtype).reshape(*lead, w8.shape[0])


def expert_ffn_fp8_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """ops.reference.expert_ffn with block-FP8 expert weights, dequantized to hidden's dtype (weight-only)."""
    return ref.expert_ffn(
        hidden,
        block_dequant(w13, w13_scale, dtype=hidden.dtype),
        block_dequant(w2, w2_scale, dtype=hidden.dtype),
        expert_offsets,
        sorted_slots,
        top_k,
    )

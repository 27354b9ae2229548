"""Block-FP8 linear dispatch: which kernel computes x @ dequant(w8, scale)^T (spec: ops/fp8_reference.py).

- CUDA, at most FP8_GEMV_MAX_ROWS rows (decode): the weight-streaming CUDA GEMV (ops.extension.dense_gemv_fp8),
  weight-only: activations stay in x's dtype.
- CUDA, more rows (prefill): w8a8, x quantized per token-group of 128, then the Triton block-scaled FP8 GEMM
  (kernels/fp8_gemm.py) on Hopper FP8 tensor cores.
- CPU, or inputs neither kernel takes: the reference (dequantize, then F.linear).
The choice reads shapes, dtypes and devices only (host metadata), so a captured CUDA graph keeps its kernel.
"""

from __future__ import annotations

import torch

from longcat_service.kernels import fast_path_enabled
from longcat_service.ops import fp8_reference

FP8_DTYPE = torch.float8_e4m3fn
# Rows up to which the CUDA GEMV streams the weight (the kernel takes <= 8); above, the tensor-core GEMM.
FP8_GEMV_MAX_ROWS = 8


def _extension():
    """ops.extension when the compiled ops (with the FP8 ones) are importable, else None."""
    try:
        from longcat_service.ops import extension
    except (ImportError, AttributeError):
        return None
    return extension if hasattr(torch.ops.longcat, "dense_gemv_fp8") else None


def w8a8_supported(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> bool:
    """Inputs the Triton w8a8 GEMM takes: CUDA (FP8 tensor cores: sm_89+) with Triton on, x [M, K] bf16 / fp16 /
    fp32 and w8 e4m3 [N, K] with its fp32 block scale on x's device, unit last strides."""
    if not x.is_cuda or x.dim() != 2 or w8.dim() != 2 or w8.dtype != FP8_DTYPE or not fast_path_enabled(x):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w8.device != x.device:
        return False
    n, k = w8.shape
    if x.shape[1] != k or scale.dtype != torch.float32 or tuple(scale.shape) != (-(-n // 128), -(-k // 128)):
        return False
    if k > 1 and (x.stride(1) != 1 or w8.stride(1) != 1):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(w8 [N, K], scale)^T -> [..., N] in x's dtype, by the rule in the module docstring."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.is_cuda:
        ext = _extension()
        if x2.shape[0] <= FP8_GEMV_MAX_ROWS and ext is not None and ext.dense_gemv_fp8_supported(x2, w8, scale):
            return ext.dense_gemv_fp8(x2, w8, scale).reshape(*lead, w8.shape[0])
        if w8a8_supported(x2, w8, scale):
            from longcat_service.kernels.fp8_gemm import w8a8_block_gemm

            return w8a8_block_gemm(x2, w8, scale).reshape(*lead, w8.shape[0])
    return fp8_reference.fp8_linear_ref(x, w8, scale)

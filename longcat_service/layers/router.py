"""The MoE router: fp32 logits over real + zero experts (transformers keeps the router in fp32).

Decode-size batches run the fp32 GEMM (a memory-bound GEMV). Prefill-size batches on CUDA run one bf16
tensor-core GEMM with fp32 output against an exact 3-way bf16 split of the fp32 weight (same logits to fp32
accuracy: the SIMT fp32 GEMM took 0.87-0.96 ms at 4096 tokens on the H200, the split 0.19-0.27 ms).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_service import envs
from longcat_service.layers.weight_utils import make_param

logger = logging.getLogger(__name__)

# torch.mm(bf16, bf16, out_dtype=torch.float32): CUDA only (the CPU kernel of aten::mm.dtype is missing).
_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def router_bf16x3_min_tokens() -> int:
    """Router GEMMs of at least this many tokens (prefill) run as bf16 tensor-core GEMMs against a 3-way bf16
    split of the fp32 weight (0: never). Below it (decode, at most 256 tokens per CUDA graph) the fp32 GEMV is
    memory-bound and stays as it is."""
    return envs.LONGCAT_ROUTER_BF16X3_MIN_TOKENS


def split_bf16x3(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [E, H] -> bf16 [3E, H], the rows of hi, then mid, then lo, with hi + mid + lo == weight.

    Each part is the round-to-nearest of what the previous parts leave (exact fp32 differences): three
    8-bit significands hold fp32's 24 bits, so the sum is exact (unless |weight| < ~1e-30, where lo
    underflows; the error is then below 1e-38).
    """
    w = weight.float()
    hi = w.to(torch.bfloat16)
    rest = w - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return torch.cat([hi, mid, lo])


def linear_bf16x3(x: torch.Tensor, weight_split: torch.Tensor, mm=None) -> torch.Tensor:
    """x bf16 [T, H] @ (hi + mid + lo)^T -> fp32 [T, E], i.e. F.linear(x.float(), weight) to fp32 accuracy.

    x is exact in bf16, so every product is exact and one bf16 GEMM with fp32 accumulation and fp32 output
    (tensor cores) over the stacked [3E, H] weight replaces the fp32 (SIMT) GEMM; the three [T, E] slices
    are added smallest first. `mm(a, b) -> fp32` defaults to torch.mm with out_dtype (CUDA).
    """
    if mm is None:
        y = torch.mm(x, weight_split.t(), out_dtype=torch.float32)
    else:
        y = mm(x, weight_split.t())
    e = weight_split.shape[0] // 3
    return (y[:, 2 * e :] + y[:, e : 2 * e]) + y[:, :e]


class TopkRouter(nn.Module):
    """Replicated and kept in fp32 whatever the model dtype (the classifier bias is never used, as in HF)."""

    _bf16x3_failed = False  # set (for the process) if the GPU's torch rejects mm with out_dtype

    def __init__(self, hidden_size: int, num_router_experts: int):
        super().__init__()
        self.classifier = nn.Module()
        self.classifier.weight = make_param(num_router_experts, hidden_size, dtype=torch.float32)
        self.e_score_correction_bias = make_param(num_router_experts, dtype=torch.float32)
        self._split_cache: tuple[tuple, torch.Tensor] | None = None  # (weight key, split_bf16x3(weight))

    def forward(self, x: torch.Tensor, x_f32: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> fp32 logits [T, E]. x_f32: x.float() when the caller already has it (the decoder's norm
        writes it beside its output, so the fp32 GEMM needs no cast kernel of its own)."""
        if self._use_bf16x3(x):
            try:
                return linear_bf16x3(x, self.split_weight())
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError) as exc:  # e.g. a torch without mm.dtype's CUDA kernel
                logger.warning("router: bf16x3 GEMM unavailable (%s); using the fp32 GEMM", exc)
                TopkRouter._bf16x3_failed = True
        return F.linear(x.float() if x_f32 is None else x_f32, self.classifier.weight)

    def reads_fp32(self, x: torch.Tensor) -> bool:
        """Will forward(x) multiply x in fp32 (so an x_f32 from the caller saves a cast)? Host metadata only."""
        return not self._use_bf16x3(x)

    def _use_bf16x3(self, x: torch.Tensor) -> bool:
        if not (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and _HAS_MM_OUT_DTYPE):
            return False
        if TopkRouter._bf16x3_failed or torch.cuda.is_current_stream_capturing():
            return False
        threshold = router_bf16x3_min_tokens()
        return 0 < threshold <= x.shape[0]

    def split_weight(self) -> torch.Tensor:
        """split_bf16x3 of the classifier weight, rebuilt when the weight changes (new storage, or an in-place
        write such as weight loading, which bumps the parameter's version counter)."""
        w = self.classifier.weight
        try:
            version = w._version
        except RuntimeError:  # an inference tensor tracks no version: its storage alone identifies it
            version = None
        key = (w.data_ptr(), version, w.device, tuple(w.shape))
        if self._split_cache is None or self._split_cache[0] != key:
            self._split_cache = None  # free the old split before building the new one
            with torch.no_grad():
                self._split_cache = (key, split_bf16x3(w.detach()))
        return self._split_cache[1]

"""The seeded spec-decode uniforms in one kernel launch (Triton): for rows r and columns j, the uniform that the
counter (4 base[r] + offsets[j]) mod 2^32 hashes to under row r's four 32-bit keys.

Its spec and CPU path is engine/seeded_draws.py's torch code (hashed_uniforms_at_reference: MurmurHash3's fmix32,
two rounds per half, a 53-bit float64), about 30 small elementwise int64 kernels on a GPU; the kernel gives the
same bits in one launch. It computes in uint32 (Triton's uint32 multiply wraps mod 2^32, >> is logical), takes the
counter's low 32 bits by truncation (what & (2^32 - 1) keeps of the torch code's int64), and builds the float64
from an int64 below 2^53 times 2^-53 as the torch code does (both steps exact). Static shapes and no host read: it
runs inside the spec-step CUDA graphs.
"""

from __future__ import annotations

import torch


def hashed_uniforms_at(keys: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """keys [4, R] int64 (seeded_draws.seed_keys per row, any strides), base [R] int64, offsets [C] int64 ->
    float64 [R, C] uniforms in [0, 1), on their (shared) device."""
    if keys.dim() != 2 or keys.shape[0] != 4 or base.dim() != 1 or offsets.dim() != 1:
        raise ValueError(f"hashed_uniforms_at: keys {tuple(keys.shape)} must be [4, R], base {tuple(base.shape)} "
                         f"[R], offsets {tuple(offsets.shape)} [C]")
    if keys.shape[1] != base.shape[0]:
        raise ValueError(f"hashed_uniforms_at: keys have {keys.shape[1]} rows, base {base.shape[0]}")
    if any(t.dtype != torch.int64 for t in (keys, base, offsets)):
        raise ValueError("hashed_uniforms_at: keys, base and offsets must be int64")
    if base.device != keys.device or offsets.device != keys.device:
        raise ValueError("hashed_uniforms_at: keys, base and offsets must be on one device")
    from longcat_service.kernels._counter_hash_triton import launch

    return launch(keys, base, offsets)

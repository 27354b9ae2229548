"""Triton kernels for the GPU decode path (imported lazily: triton is optional and GPU-only in production).

Every kernel module holds its pure-PyTorch reference next to it. Callers ask `fast_path_enabled(t)` before
using a kernel: it is true only for CUDA tensors when triton imports and LONGCAT_DISABLE_TRITON is unset.
Tests run the kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os

import torch

from longcat_service import envs


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum): Triton block shapes must be powers of two."""
    p = minimum
    while p < n:
        p *= 2
    return p


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fast_path_enabled(t: torch.Tensor) -> bool:
    """Use the Triton kernels for this tensor? (CUDA tensor, triton importable, not disabled by env)."""
    return t.is_cuda and not envs.LONGCAT_DISABLE_TRITON and triton_available()


def device_capability(device: torch.device) -> tuple[int, int]:
    """torch.cuda.get_device_capability of a CUDA device, looked up once per device: the dispatch checks of every
    prefill op ask it (a few us of host time per call otherwise)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))

"""Host lists -> device tensors without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory with a blocking copy, which waits for every
kernel already queued on the stream: in a step launched while the previous work runs, that would stall the host
until the GPU catches up. Staging through pinned memory and an asynchronous copy returns at once (the caching
host allocator keeps the pinned buffer alive until the copy has run).
"""

from __future__ import annotations

import numpy as np
import torch

NUMPY_MIN_LEN = 256
_NUMPY_INTS = {torch.int64: np.int64, torch.int32: np.int32}


def host_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """`values` (a list, or a CPU tensor) as a CPU `dtype` tensor."""
    if isinstance(values, torch.Tensor):
        return values.to(dtype)
    if len(values) >= NUMPY_MIN_LEN and dtype in _NUMPY_INTS:  # numpy builds long int lists ~2x faster
        return torch.from_numpy(np.asarray(values, dtype=_NUMPY_INTS[dtype]))
    return torch.tensor(values, dtype=dtype, device="cpu")  # CPU whatever torch's default device is


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, or a CPU tensor) as a `dtype` tensor on `device`, enqueued without waiting."""
    t = host_tensor(values, dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

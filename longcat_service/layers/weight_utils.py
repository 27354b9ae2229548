"""Errors and helpers shared by every parameter's `weight_loader(param, loaded, ...)`.

`loaded` is either a tensor or a safetensors slice (`f.get_slice(name)`), which supports `get_shape()` and
`[a:b]` indexing, so a tensor-parallel rank reads only its shard from the memory-mapped file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint problem; the message names the file and/or key (also kept as `.file` / `.key`)."""

    def __init__(self, message: str, file: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"key '{key}'" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.key = key
        self.detail = message


class WeightLoadError(CheckpointError):
    """A tensor that does not fit its parameter (shape, dtype, tensor-parallel divisibility)."""


def loaded_shape(loaded: Any) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def read_narrow(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """loaded[..., start:start+length, ...] along dim, as a tensor (reads only that range from a slice)."""
    index = [slice(None)] * len(loaded_shape(loaded))
    index[dim] = slice(start, start + length)
    out = loaded[tuple(index)]
    if not isinstance(out, torch.Tensor):
        raise WeightLoadError(f"reading the slice returned {type(out).__name__}, not a tensor")
    if not (out.is_floating_point()):
        raise WeightLoadError(f"expected a floating-point tensor, got {out.dtype}")
    return out


def read_full(loaded: Any) -> torch.Tensor:
    shape = loaded_shape(loaded)
    if not shape:  # 0-d
        out = loaded if isinstance(loaded, torch.Tensor) else loaded[...]
        return out
    return read_narrow(loaded, 0, 0, shape[0])


def check_shape(loaded: Any, expected: tuple[int, ...], what: str = "tensor") -> None:
    shape = loaded_shape(loaded)
    if shape != tuple(expected):
        raise WeightLoadError(f"{what} has shape {list(shape)}, expected {list(expected)}")


def make_param(*shape: int, dtype: torch.dtype, loader=None) -> nn.Parameter:
    """An uninitialised inference parameter (allocated on the current default device) with its loader."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader or replicated_loader  # type: ignore[attr-defined]
    return param


@torch.no_grad()
def replicated_loader(param: torch.Tensor, loaded: Any) -> None:
    check_shape(loaded, tuple(param.shape))
    param.copy_(read_full(loaded))


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator

"""silu_and_mul (Triton, longcat_service/kernels/silu_mul.py) against the eager torch code it replaces.

The kernel must round exactly like `F.silu(gate) * up`: on a GPU the outputs are compared bit for bit with
torch's CUDA kernels in every dtype. Without a GPU the kernel runs in Triton's CPU interpreter
(TRITON_INTERPRET=1), whose exp is numpy's (a few fp32 ulps off torch's): bf16 is still bit-identical to
torch on every one of the 65536 gate values (checked exhaustively below), while fp16 / fp32 are compared
bit for bit with the same formula evaluated with numpy's exp, and closely with torch.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels.silu_mul import silu_and_mul, silu_and_mul_reference  # noqa: E402
from longcat_service.layers import mlp as mlp_mod  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bits everywhere (any NaN matches any NaN; -0 differs from +0)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if got.numel() == 0:
        return
    same = (got.view(INT_VIEW[got.dtype]) == want.view(INT_VIEW[want.dtype])) | (got.isnan() & want.isnan())
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        tiny = torch.finfo(got.dtype).tiny
        subnormal = bool(((got.abs() < tiny) | (want.abs() < tiny))[~same].all())
        pos = tuple(bad[0])
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {got.numel()} elements differ"
            f"{' (all of them at subnormal values)' if subnormal else ''}, first at {bad}: "
            f"got {got[pos].item()!r} want {want[pos].item()!r}")


def numpy_exp_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up with numpy's fp32 exp (the interpreter's), same roundings as torch."""
    gate, up = gate_up.float().cpu().chunk(2, dim=-1)
    with np.errstate(over="ignore"):
        e = torch.from_numpy(np.exp(-gate.numpy()))
    silu = (gate / (1 + e)).to(gate_up.dtype).float()
    return (silu * up).to(gate_up.dtype)


def check(gate_up: torch.Tensor, what: str = "") -> None:
    got = silu_and_mul(gate_up)
    want = silu_and_mul_reference(gate_up)
    if ON_GPU or gate_up.dtype == torch.bfloat16:
        assert_bitwise_equal(got, want, what)
    else:
        assert_bitwise_equal(got, numpy_exp_reference(gate_up), what + " (numpy exp)")
        torch.testing.assert_close(got, want, rtol=4 * torch.finfo(got.dtype).eps, atol=0, equal_nan=True)


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit dtype (zeros, subnormals, infinities, NaNs), as [64, 1024]."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(64, 1024)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_gate_value(dtype):
    gen = torch.Generator().manual_seed(1)
    gate = every_value(dtype)
    up = torch.randn(64, 1024, generator=gen).to(dtype)
    up[0, :8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38, -1.0])
    check(torch.cat([gate, up], dim=1).to(DEVICE), f"every {dtype} gate")
    # and every value as `up` against ordinary gates (silu's rounding then the product's)
    gate2 = (torch.randn(64, 1024, generator=gen) * 3).to(dtype)
    check(torch.cat([gate2, every_value(dtype)], dim=1).to(DEVICE), f"every {dtype} up")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "rows,inter",
    [(1, 1), (3, 5), (7, 333), (2, 2048), (5, 2049), (4, 6000)],  # odd, one block, past one block, several
)
def test_matches_eager_torch(dtype, rows, inter):
    gen = torch.Generator().manual_seed(rows * 7 + inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=gen) * 4).to(dtype).to(DEVICE)
    check(gate_up, f"{rows}x{inter} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp32_specials_and_row_stride(dtype):
    gen = torch.Generator().manual_seed(3)
    big = (torch.randn(6, 2 * 100 + 17, generator=gen) * 30).to(dtype)
    big[0, :10] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, 88.0, -88.0,
                                -104.0])
    big[1, :4] = torch.tensor([1e-39, -1e-39, 1e-44, 3e38]) if dtype == torch.float32 else big[1, :4]
    gate_up = big.to(DEVICE)[:, : 2 * 100]  # rows 217 elements apart: the kernel takes the row stride
    assert gate_up.stride(0) == 217
    check(gate_up, f"strided {dtype}")


def test_empty_and_bad_inputs():
    assert silu_and_mul(torch.empty(0, 8, dtype=torch.bfloat16, device=DEVICE)).shape == (0, 4)
    assert silu_and_mul(torch.empty(3, 0, dtype=torch.bfloat16, device=DEVICE)).shape == (3, 0)
    with pytest.raises(ValueError, match=r"\[N, 2I\]"):
        silu_and_mul(torch.zeros(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[N, 2I\]"):
        silu_and_mul(torch.zeros(6, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.zeros(2, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="num_rows"):
        silu_and_mul(torch.zeros(2, 4, device=DEVICE), torch.tensor([1, 2], device=DEVICE))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_num_rows_limits_the_rows_read_on_the_device(index_dtype):
    gen = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(9, 2 * 40, generator=gen) * 4).to(torch.bfloat16).to(DEVICE)
    want = silu_and_mul_reference(gate_up)
    for n in (0, 1, 5, 9):
        got = silu_and_mul(gate_up, torch.tensor([n], dtype=index_dtype, device=DEVICE))
        assert got.shape == want.shape
        assert_bitwise_equal(got[:n], want[:n], f"num_rows={n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_mlp_fast_path_is_bit_identical(dtype, monkeypatch):
    torch.manual_seed(0)
    mlp = mlp_mod.DenseMLP(48, 40, dtype).to(DEVICE)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(dtype) * 0.2)
    x = torch.randn(2, 7, 48).to(dtype).to(DEVICE)  # leading dims are kept
    with torch.no_grad():
        monkeypatch.setattr(mlp_mod, "fast_path_enabled", lambda t: False)
        eager = mlp(x)
        monkeypatch.setattr(mlp_mod, "fast_path_enabled", lambda t: True)
        fast = mlp(x)
    assert fast.shape == eager.shape == (2, 7, 48)
    if ON_GPU or dtype == torch.bfloat16:
        assert_bitwise_equal(fast, eager, "DenseMLP")
    else:
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)

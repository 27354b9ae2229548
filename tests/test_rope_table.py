"""The rotary cos/sin table (CUDA decode and prefill) against the per-step computation it replaces, and mla_prep
with cos/sin as row-strided views of the table's gathered [cos | sin] rows."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from longcat_service.config import ModelConfig  # noqa: E402
from longcat_service.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.tiny_config import TINY_CONFIG  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _rotary(**overrides) -> RotaryEmbedding:
    raw = dict(TINY_CONFIG, **overrides)
    return RotaryEmbedding(ModelConfig.from_dict(raw))


@pytest.mark.parametrize("scaling", [None, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_rows_equal_the_per_position_computation(scaling, dtype):
    rot = _rotary(max_position_embeddings=256, rope_scaling=scaling)
    table = rot._table(torch.device(DEVICE), dtype)
    assert table.shape == (256, rot.inv_freq.shape[0] * 2) and table.dtype == dtype
    positions = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cos, sin = rot.compute_cos_sin(positions, dtype)
    rows = table[positions]
    half = cos.shape[-1]
    # CPU kernels may round a vectorised body and a scalar tail differently: one ulp there, none on CUDA
    tol = 0 if ON_GPU else (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(rows[:, :half], cos, atol=tol, rtol=0)
    torch.testing.assert_close(rows[:, half:], sin, atol=tol, rtol=0)


def test_cpu_positions_are_computed_not_gathered():
    rot = _rotary(max_position_embeddings=64)
    positions = torch.tensor([0, 5, 63])
    cos, sin = rot.cos_sin(positions, torch.float32)
    assert not rot._tables  # no table on the CPU path
    ref_cos, ref_sin = rot.compute_cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_cpu_position_past_the_table_is_refused_like_the_cuda_gather():
    rot = _rotary(max_position_embeddings=64)
    with pytest.raises(IndexError, match="position 64 is past max_position_embeddings \\(64\\)"):
        rot.cos_sin(torch.tensor([3, 64, 1]), torch.float32)
    cos, _ = rot.cos_sin(torch.tensor([], dtype=torch.long), torch.float32)  # an empty batch is fine
    assert cos.shape[0] == 0


@pytest.mark.skipif(not ON_GPU, reason="the table is the CUDA path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cos_sin_bit_identical_to_computation(dtype):
    rot = _rotary(max_position_embeddings=4096)
    positions = torch.randint(0, 4096, (500,), device="cuda")
    cos, sin = rot.cos_sin(positions, dtype)
    ref_cos, ref_sin = rot.compute_cos_sin(positions, dtype)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_prep_takes_row_strided_cos_sin(dtype):
    pytest.importorskip("triton")
    from longcat_service.kernels.mla_prep import mla_prep

    gen = torch.Generator().manual_seed(4)
    n, heads, dn, dr, rank = 5, 3, 8, 6, 12
    q = torch.randn(n, heads, dn + dr, generator=gen).to(dtype).to(DEVICE)
    kv_a = torch.randn(n, rank + dr, generator=gen).to(dtype).to(DEVICE)
    ang = torch.randn(n, dr // 2, generator=gen)
    both = torch.cat((ang.cos(), ang.sin()), dim=-1).to(dtype).to(DEVICE)  # the table's row layout
    cos_view, sin_view = both[:, : dr // 2], both[:, dr // 2 :]
    assert not cos_view.is_contiguous()
    w = (1 + 0.2 * torch.randn(rank, generator=gen)).to(dtype).to(DEVICE)
    slots = torch.tensor([3, -1, 0, 9, 4], device=DEVICE)
    strided_cache = torch.zeros(3, 4, rank + dr, dtype=dtype, device=DEVICE)
    dense_cache = strided_cache.clone()
    q_strided = mla_prep(q, kv_a, cos_view, sin_view, w, 1e-6, 2.0, 3.0, slots, strided_cache, dr)
    q_dense = mla_prep(q, kv_a, cos_view.contiguous(), sin_view.contiguous(), w, 1e-6, 2.0, 3.0, slots, dense_cache,
                       dr)
    assert torch.equal(q_strided, q_dense)
    assert torch.equal(strided_cache, dense_cache)

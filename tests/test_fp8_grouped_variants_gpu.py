"""The grouped FP8 GEMM variants beyond GROUPED_CONFIGS (kernels/fp8_gemm.VARIANT_CONFIGS: persistent, flattened,
wide tiles, incl. both MoE prefill defaults) on the GPU at the LongCat-Flash prefill shapes, against the fp64
product of the quantized operands (tests/test_fp8_gpu.py's tensor-core bound). A file of its own: one Triton
compile per variant and shape (minutes), apart from the FP8 session's test_fp8_gpu.py step.

    python -m pytest -q -rfEs -p no:cacheprovider tests/test_fp8_grouped_variants_gpu.py
"""

from __future__ import annotations

import functools

import pytest
import torch

from longcat_service.kernels.fp8_gemm import VARIANT_CONFIGS
from longcat_service.ops import fp8_reference as fr
from tests.test_fp8_gpu import _assert_bf16_within, _offsets, _quantized

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"


VARIANT_COUNTS = [0, 1, 17, 32, 63, 64, 65, 130, 0, 200, 512, 40]  # 16..512 rows per expert, empty experts


@functools.cache
def _variant_case(n, k):
    """LongCat-shaped expert operands (12 experts, rows as VARIANT_COUNTS, 20 zero-expert rows after them) and the
    fp64 exact product per expert (with its magnitude), shared by every variant."""
    from longcat_service.kernels.fp8_gemm import per_token_group_quant_fp8

    offsets = _offsets(VARIANT_COUNTS)
    x8, xs = per_token_group_quant_fp8(torch.randn(sum(VARIANT_COUNTS) + 20, k, device=DEV).to(torch.bfloat16))
    w8, ws = _quantized((len(VARIANT_COUNTS), n, k), seed=n + k, std=k**-0.5)
    exact = []
    offs = offsets.tolist()
    for e in range(len(VARIANT_COUNTS)):
        a, b = offs[e], offs[e + 1]
        xq = x8[a:b].double() * xs[a:b].double().repeat_interleave(128, dim=1)[:, :k]
        w = fr.block_dequant(w8[e], ws[e], dtype=torch.float64)
        exact.append((a, b, xq @ w.t(), xq.abs() @ w.abs().t()))
    return x8, xs, w8, ws, offsets, exact


@pytest.mark.parametrize("n,k", [(4096, 6144), (6144, 2048)])
@pytest.mark.parametrize("cfg", VARIANT_CONFIGS, ids=str)
def test_grouped_gemm_fp8_variants(cfg, n, k):
    """Each of fp8_gemm.VARIANT_CONFIGS (persistent, flattened, wide tiles; both prefill defaults) at the LongCat-Flash
    gate_up and down shapes: within the tensor-core bound of the exact product for experts of 0 to 512 rows, and
    rows past the last real one left as they were (launch_grouped into a NaN-filled output)."""
    from longcat_service.kernels._fp8_gemm_triton import launch_grouped
    from longcat_service.kernels.fp8_gemm import grouped_gemm_fp8

    x8, xs, w8, ws, offsets, exact = _variant_case(n, k)
    y = grouped_gemm_fp8(x8, xs, w8, ws, offsets, 4096, config=cfg)
    for e, (a, b, want, mag) in enumerate(exact):
        if b > a:
            _assert_bf16_within(y[a:b], want, mag, k, f"{cfg} expert {e}", mma=True)
    y = torch.full((x8.shape[0], n), float("nan"), dtype=torch.bfloat16, device=DEV)
    launch_grouped(x8, xs, w8, ws, offsets, y, cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps,
                   cfg.tma, cfg.split_tail, persistent=cfg.persistent, flatten=cfg.flatten)
    n_real = int(offsets[-1])
    assert y[n_real:].isnan().all() and not y[:n_real].isnan().any(), str(cfg)
    torch.cuda.synchronize()

"""Which kernels one decode step launches on the GPU (torch.profiler over the tiny model's Triton decode path): the
residual adds run inside the fused add + RMSNorm kernels and no eager add kernel is left on the dense path; the
norm counts are what longcat_flash.py's wiring implies. Skipped without a CUDA device and the built extension."""

from __future__ import annotations

import collections

import pytest
import torch

from longcat_service import ops
from longcat_service.config import ModelConfig
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.model.kv_cache import allocate_kv_caches
from longcat_service.model.loader import load_model
from tests.tiny_config import TINY_CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _step_kernels(batch: int) -> collections.Counter:
    config = ModelConfig.from_dict(TINY_CONFIG)
    model = load_model(config, dtype=torch.bfloat16, device="cuda", load_format="dummy", seed=1)
    block_size = 4
    caches = allocate_kv_caches(config, 4 * batch + 4, block_size, torch.bfloat16, "cuda")
    tables = [[4 * i, 4 * i + 1] for i in range(batch)]
    with torch.inference_mode():
        for i in range(batch):  # a 5-token prompt each (eager prefill), then one decode step for all
            meta = AttentionMetadata.build([5], [5], [tables[i]], block_size, "cuda")
            model(torch.arange(5, device="cuda") + i, torch.arange(5, device="cuda"), meta, caches)
        meta = AttentionMetadata.build([1] * batch, [6] * batch, tables, block_size, "cuda")
        ids, pos = torch.arange(batch, device="cuda") + 7, torch.full((batch,), 5, device="cuda")
        model(ids, pos, meta, caches)  # compile the kernels outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(ids, pos, meta, caches)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    counts = collections.Counter(names)
    print(f"batch {batch}:", *(f"{n} x {c}: {name[:140]}" for n, (name, c) in enumerate(sorted(counts.items()))),
          sep="\n  ")
    return counts


@pytest.mark.parametrize("batch", [1, 12])  # 12: above FUSED_UV_MAX_BATCH (the separate W_UV bmm)
def test_decode_step_runs_the_fused_norms_and_no_residual_adds(batch):
    layers = TINY_CONFIG["num_layers"]
    counts = _step_kernels(batch)

    def count(fragment: str) -> int:
        return sum(c for name, c in counts.items() if fragment in name)

    # per layer: input_layernorm[0] (plain in layer 0: nothing to add yet), post_attention_layernorm[0],
    # input_layernorm[1], post_attention_layernorm[1]; then the final norm with the last layer's MLP and MoE outputs
    assert count("_fused_add_rms_norm_kernel") == 4 * layers
    assert count("_rms_norm_kernel") - count("_fused_add_rms_norm_kernel") == 1 + 2 * layers  # + the q_a norms
    if ops.ACTIVE_BACKEND == "extension cpu+cuda":  # (the pure-PyTorch MoE ops have adds and casts of their own)
        assert count("CUDAFunctor_add") == 0 and count("AddFunctor") == 0
        # casts: no router input cast (the norm writes it), no MoE output cast (the fused add does it), no reshape
        # copy of the W_UV bmm's output
        assert count("direct_copy_kernel") == 0

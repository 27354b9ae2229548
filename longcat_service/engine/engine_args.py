"""Engine options (vLLM names) with validation that names the bad field."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_service.engine.errors import EngineArgsError
from longcat_service.engine.spec_config import SpeculativeConfig

# Token budget of one engine step (chunked prefill) when none is given. CUDA: a 4096-token prompt in one step
# rather than two: LLM.generate of 4096 tokens on LongCat-Flash-2L on the H200 took 41.8 ms in one chunk against
# 69.7 ms in two of 2048 (each chunk reads every expert's weights again); vLLM and SGLang use 8192-16384 on Hopper.
# A bigger budget lets one long prompt hold running decodes for a longer step. CPU: steps are slow anyway and
# 2048 keeps a decode batch's wait short.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EngineArgs:
    model: str | Path | None = None  # checkpoint dir; None -> the generated demo model
    dtype: str | torch.dtype | None = None  # None -> the loader's default
    device: str | None = None  # None -> cuda if available, else cpu
    load_format: str = "auto"
    quantization: str | None = None  # "fp8": quantize an unquantized checkpoint (or dummy weights) to block FP8
    seed: int = 0  # for requests without their own seed
    block_size: int = 16
    num_kv_blocks: int | None = None  # None -> from kv_cache_memory_bytes or a default budget
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9  # share of the free GPU memory for the KV cache when nothing is given
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None -> DEFAULT_MAX_NUM_BATCHED_TOKENS for the device
    max_model_len: int | None = None  # None -> config max_position_embeddings (capped to the cache size)
    enable_prefix_caching: bool = True
    step_timeout_s: float = 120.0  # AsyncEngine health: one step longer than this marks the engine unhealthy
    tensor_parallel_size: int = 1  # > 1: local ranks are spawned (or torchrun's ranks joined); see engine/tp_worker.py
    # whole routed experts per rank instead of a slice of every expert (distributed/expert_parallel.py); placement:
    # None (contiguous groups), a {expert: rank} dict or the path of a JSON file holding one
    enable_expert_parallel: bool = False
    expert_placement: str | dict | None = None
    # EP CUDA-graph decode steps: all-to-all rows per peer = this factor x a uniform routing's share, at most the
    # never-overflowing bound; a step that overflows runs again eagerly (distributed/ep_static_dispatch.py).
    # None: the bound (largest token share x top-k per peer)
    ep_capacity_factor: float | None = None
    # count the tokens routed to each expert (longcat_expert_routed_tokens_total; input of distributed/eplb.py)
    collect_expert_load: bool = False
    hf_overrides: dict | None = None  # config.json keys replaced before the model config is parsed ({"num_layers": 2})
    overlap_steps: bool = True  # LLMEngine: host work of step N runs while step N+1 computes (see llm_engine.step)
    # with overlap_steps: a decode step whose batch follows from the previous one is launched before that one's
    # tokens are read back, its input ids taken from the device (see llm_engine._launch_chained)
    async_scheduling: bool = True
    capture_graphs_at_startup: bool = True  # CUDA: decode graphs captured and prefill kernels warmed up before serving
    # AsyncEngine: "process" runs the step loop in a spawned engine-core process (the server's event loop keeps its
    # own GIL), "thread" in a thread of the server process; "auto": process, but thread under torchrun
    engine_mode: str = "auto"
    # called with the built LLMEngine wherever it runs (the engine-core process too); must be picklable (a module
    # function or functools.partial of one): benchmarks and tests swap its runner
    engine_hook: Callable | None = None
    # {"method": "mtp" | "longcat_flash_mtp", "num_speculative_tokens": 1..3} (or its JSON): speculative decoding
    # with the checkpoint's MTP layer (engine/spec_decode.py); None: off
    speculative_config: dict | str | SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            kind = self.torch_device.type if self._device_is_valid() else "cpu"
            self.max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS.get(kind, DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"])
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise EngineArgsError(name, f"must be a positive integer, got {value!r}")
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise EngineArgsError(name, f"must be a positive integer or None, got {value!r}")
        if not _is_int(self.seed):
            raise EngineArgsError("seed", f"must be an integer, got {self.seed!r}")
        for name in ("enable_prefix_caching", "enable_expert_parallel", "collect_expert_load", "overlap_steps",
                     "async_scheduling", "capture_graphs_at_startup"):
            if not isinstance(getattr(self, name), bool):  # a string such as "no" would read as true
                raise EngineArgsError(name, f"must be True or False, got {getattr(self, name)!r}")
        for name in ("gpu_memory_utilization", "step_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise EngineArgsError(name, f"must be a number, got {value!r}")
        if self.hf_overrides is not None and not isinstance(self.hf_overrides, dict):
            raise EngineArgsError("hf_overrides", f"must be a dict of config.json keys, got {self.hf_overrides!r}")
        if self.quantization not in (None, "fp8"):
            raise EngineArgsError("quantization", f"unsupported method {self.quantization!r}; supported: 'fp8'")
        if self.expert_placement is not None and not self.enable_expert_parallel:
            raise EngineArgsError("expert_placement", "needs enable_expert_parallel=True")
        if self.ep_capacity_factor is not None:
            if not self.enable_expert_parallel:
                raise EngineArgsError("ep_capacity_factor", "needs enable_expert_parallel=True")
            if isinstance(self.ep_capacity_factor, bool) or not isinstance(self.ep_capacity_factor, int | float) \
                    or not self.ep_capacity_factor > 0:
                raise EngineArgsError("ep_capacity_factor", f"must be a number > 0, got {self.ep_capacity_factor!r}")
        if self.expert_placement is not None and not isinstance(self.expert_placement, str | Path | dict):
            raise EngineArgsError("expert_placement", f"must be a JSON file path or a dict, got {self.expert_placement!r}")
        if self.engine_mode not in ("auto", "process", "thread"):
            raise EngineArgsError("engine_mode", f"must be 'auto', 'process' or 'thread', got {self.engine_mode!r}")
        if self.engine_hook is not None and not callable(self.engine_hook):
            raise EngineArgsError("engine_hook", f"must be callable, got {self.engine_hook!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise EngineArgsError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.step_timeout_s > 0:
            raise EngineArgsError("step_timeout_s", f"must be > 0, got {self.step_timeout_s}")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype) and self.dtype not in _DTYPES:
            raise EngineArgsError("dtype", f"unknown dtype {self.dtype!r}; use one of {sorted(_DTYPES)}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise EngineArgsError("device", f"invalid device {self.device!r}: {e}") from None

    def _device_is_valid(self) -> bool:
        try:
            self.torch_device  # noqa: B018 (parses self.device)
        except (RuntimeError, TypeError):
            return False  # reported below, naming the field
        return True

    @property
    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is None or isinstance(self.dtype, torch.dtype):
            return self.dtype
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

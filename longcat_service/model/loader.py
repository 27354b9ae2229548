"""load_model: build LongcatFlashForCausalLM on the target device and fill it from a HF checkpoint directory
(or with random "dummy" weights).

- Checkpoint: `config.json` plus `model.safetensors` or a sharded `model.safetensors.index.json`. Tensors are
  streamed from memory-mapped files with `safe_open`; each parameter's weight_loader reads only this rank's
  slice. All keys are checked (missing / unexpected / listed in the index but absent) before any data is read.
- `model.mtp.*` (the multi-token-prediction layer) is set aside (recorded in `model.mtp_weight_names`) unless
  `mtp=True` builds the MTP block (model/mtp.py): then every MTP key must be there (a checkpoint without them is
  refused, naming the missing keys); `model.mtp.embed_tokens` is kept only when it differs from the target's.
- dtype None -> float32 on CPU (half-precision matmuls are slow on most CPUs and fp32 is the reference
  precision); on an accelerator the config's `torch_dtype`, else bfloat16.
- Block-FP8 (config `quantization_config`, or `quantization="fp8"` for a bf16/fp32 checkpoint, quantized as it
  loads): an FP8 checkpoint must hold every quantized weight as float8_e4m3fn with its `weight_scale_inv`; a
  float8 tensor for a module the config keeps unquantized is refused too (its scale would be lost).
- Parameters are allocated directly on the target device (uninitialised, then overwritten), so a full-size
  model is never built twice nor materialised on the host.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from longcat_service.config import ConfigError, ModelConfig, QuantConfig
from longcat_service.layers.weight_utils import CheckpointError, WeightLoadError
from longcat_service.model.dummy_weights import DUMMY_STD, init_dummy  # noqa: F401 (DUMMY_STD: re-exported)
from longcat_service.model.longcat_flash import LongcatFlashForCausalLM, WeightTarget

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MTP_PREFIX = "model.mtp."
MTP_EMBED_KEY = "model.mtp.embed_tokens.weight"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = ("fp8",)
# safetensors dtype names (slice.get_dtype()) of the float8 formats
_FP8_NAMES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

__all__ = ["CheckpointError", "WeightLoadError", "load_model", "resolve_dtype"]


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        return DTYPES[config.torch_dtype] if config.torch_dtype is not None else torch.bfloat16
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[name]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype}")
    return dtype


def load_model(
    model_path: str | Path | ModelConfig | None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    load_format: str = "auto",
    seed: int = 0,
    hf_overrides: dict[str, Any] | None = None,
    quantization: str | None = None,
    mtp: bool = False,
) -> LongcatFlashForCausalLM:
    """Return an eval-mode LongcatFlashForCausalLM on `device`.

    model_path: a checkpoint directory, a ModelConfig (dummy weights only), or None for the demo checkpoint.
    load_format: "auto" (safetensors) or "dummy" (random weights from `seed`; only the config is read).
    hf_overrides: keys replacing those of the raw config.json before it is parsed (e.g. {"num_layers": 2}).
    quantization: "fp8" quantizes an unquantized checkpoint (or dummy weights) into block FP8 as it loads; a no-op
    for a checkpoint whose config already says fp8.
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format: must be 'auto', 'safetensors' or 'dummy', got {load_format!r}")
    if model_path is None:
        from longcat_service.demo import default_model_path

        model_path = default_model_path()
    model_dir: Path | None = None
    if isinstance(model_path, ModelConfig):
        if hf_overrides:
            raise ValueError("hf_overrides: applies to a config.json, not to a ModelConfig")
        if load_format != "dummy":
            raise ValueError("load_format: a ModelConfig carries no weights; use load_format='dummy'")
        config = model_path
    else:
        model_dir = Path(model_path)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError("config.json not found", file=str(config_path))
        config = _read_config(config_path, hf_overrides)

    config = with_quantization(config, quantization)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, config, device)

    checkpoint = None if load_format == "dummy" else _CheckpointIndex.open(model_dir)  # type: ignore[arg-type]
    with torch.device(device):
        model = LongcatFlashForCausalLM(config, dtype)
        if mtp:
            model.enable_mtp()
    model.eval()
    if checkpoint is None:
        _init_dummy(model, seed)
    else:
        if mtp:
            _check_mtp_keys(model, checkpoint)
        model.mtp_weight_names = _load_checkpoint(model, checkpoint)
        if mtp and MTP_EMBED_KEY in checkpoint.key_to_file:
            _load_mtp_embedding(model, checkpoint)
    model.process_weights_after_loading()
    # One GEMM for q_a + kv_a (H200 decode: batch 1 1.58 -> 1.56 ms, graph replay 1.64 -> 1.56 ms).
    for layer in model.model.layers:
        for attn in layer.self_attn:
            attn.fuse_a_projections()
    return model


def with_quantization(config: ModelConfig, quantization: str | None) -> ModelConfig:
    """config with load-time quantization applied (quantization None or already in the checkpoint: unchanged)."""
    if quantization is None:
        return config
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: unsupported method {quantization!r}; supported: {list(QUANTIZATIONS)}")
    if config.quantization is not None:
        return config
    return dataclasses.replace(config, quantization=QuantConfig(checkpoint_quantized=False))


def _read_config(config_path: Path, hf_overrides: dict[str, Any] | None) -> ModelConfig:
    if not hf_overrides:
        return ModelConfig.from_pretrained(config_path)
    if not isinstance(hf_overrides, dict):
        raise ValueError(f"hf_overrides: must be a dict of config.json keys, got {type(hf_overrides).__name__}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("config.json", f"not valid JSON ({exc})", str(config_path)) from exc
    if not isinstance(raw, dict):
        raise ConfigError("config.json", "top level must be a JSON object", str(config_path))
    return ModelConfig.from_dict({**raw, **hf_overrides}, source=f"{config_path} with hf_overrides")


class _CheckpointIndex:
    """Which key lives in which file (from the index json or the single file's header)."""

    def __init__(self, key_to_file: dict[str, Path], index_path: Path | None):
        self.key_to_file = key_to_file
        self.index_path = index_path

    @classmethod
    def open(cls, model_dir: Path) -> _CheckpointIndex:
        index_path = model_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"unreadable index ({exc})", file=str(index_path)) from exc
            key_to_file = {key: model_dir / name for key, name in weight_map.items()}
            for key, path in key_to_file.items():
                if not path.is_file():
                    raise CheckpointError(f"shard '{path.name}' listed in {INDEX_FILE} is missing", file=str(path), key=key)
            return cls(key_to_file, index_path)
        single = model_dir / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory", file=str(model_dir))
        with _open_safetensors(single) as f:
            return cls({key: single for key in f.keys()}, None)


class _open_safetensors:
    """safe_open that reports a corrupt / truncated file as a CheckpointError naming it."""

    def __init__(self, path: Path):
        self.path = path
        self._ctx: Any = None

    def __enter__(self):
        try:
            self._ctx = safe_open(str(self.path), framework="pt", device="cpu")
            return self._ctx.__enter__()
        except Exception as exc:  # safetensors raises its own error types for bad headers / short files
            raise CheckpointError(f"corrupt or truncated safetensors file ({exc})", file=str(self.path)) from exc

    def __exit__(self, *exc_info):
        return self._ctx.__exit__(*exc_info)


def _check_mtp_keys(model: LongcatFlashForCausalLM, checkpoint: _CheckpointIndex) -> None:
    """MTP asked for: every MTP key must be in the checkpoint (refused up front, naming them)."""
    missing = [k for k in model.checkpoint_targets() if k.startswith(MTP_PREFIX) and k not in checkpoint.key_to_file]
    if missing:
        where = checkpoint.index_path or next(iter(checkpoint.key_to_file.values()), None)
        raise CheckpointError(f"speculative decoding with MTP needs the MTP layer's weights, and {len(missing)} "
                              f"model.mtp.* keys are missing: {', '.join(missing)}",
                              file=str(where) if where else None, key=missing[0])


def _load_mtp_embedding(model: LongcatFlashForCausalLM, checkpoint: _CheckpointIndex) -> None:
    """The checkpoint's own MTP embedding, kept only where it differs from the target's (SGLang ignores it; the
    released checkpoint's copy equals the target's)."""
    from longcat_service.layers.embed_head import VocabParallelEmbedding

    target = model.model.embed_tokens
    with torch.device(target.weight.device):
        embed = VocabParallelEmbedding(model.config.vocab_size, model.config.hidden_size, target.weight.dtype)
    path = checkpoint.key_to_file[MTP_EMBED_KEY]
    with _open_safetensors(path) as f:
        _load_one(WeightTarget(embed.weight), f, MTP_EMBED_KEY, path)
    if not torch.equal(embed.weight, target.weight):
        model.mtp.embed_tokens = embed


def _load_checkpoint(model: LongcatFlashForCausalLM, checkpoint: _CheckpointIndex) -> list[str]:
    targets = model.checkpoint_targets()
    mtp = sorted(k for k in checkpoint.key_to_file if k.startswith(MTP_PREFIX) and k not in targets)
    for key, path in checkpoint.key_to_file.items():
        if key not in targets and not key.startswith(MTP_PREFIX):  # model.mtp.* without MTP: set aside
            raise CheckpointError("unexpected key (not part of LongCat-Flash as configured)", file=str(path), key=key)
    missing = [k for k in targets if k not in checkpoint.key_to_file]
    if missing:
        where = checkpoint.index_path or next(iter(checkpoint.key_to_file.values()), None)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing key{more}", file=str(where) if where else None, key=missing[0])

    by_file: dict[Path, list[str]] = {}
    for key, path in checkpoint.key_to_file.items():
        if key in targets:
            by_file.setdefault(path, []).append(key)
    quant = model.config.quantization
    fp8_checkpoint = quant is not None and quant.checkpoint_quantized
    for path, keys in by_file.items():
        with _open_safetensors(path) as f:  # one shard mapped at a time
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"key listed in {INDEX_FILE} is not in this shard", file=str(path), key=key)
                _load_one(targets[key], f, key, path, fp8_checkpoint)
    return mtp


def _check_fp8_dtype(param: torch.Tensor, loaded: Any, fp8_checkpoint: bool, key: str, path: Path) -> None:
    """An FP8 checkpoint's quantized weights must be e4m3; a float8 tensor anywhere else has no scale to go with
    it (an unquantized module, or a checkpoint without quantization_config), so it is refused too."""
    name = loaded.get_dtype() if hasattr(loaded, "get_dtype") else None
    dtype = _FP8_NAMES.get(name) if name is not None else getattr(loaded, "dtype", None)
    loaded_fp8 = dtype in _FP8_NAMES.values()
    if param.dtype == torch.float8_e4m3fn and fp8_checkpoint and dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"weight has dtype {name or dtype}, expected float8_e4m3fn (config.json "
                              "quantization_config says fp8)", file=str(path), key=key)
    if param.dtype == torch.float8_e4m3fn and not fp8_checkpoint and loaded_fp8:
        raise CheckpointError(f"{name or dtype} weight in a checkpoint whose config.json has no quantization_config "
                              "(no weight_scale_inv is read for it)", file=str(path), key=key)
    if param.dtype != torch.float8_e4m3fn and loaded_fp8:
        raise CheckpointError(f"{name or dtype} tensor for a module the config does not quantize (no "
                              "quantization_config, or the module is listed in modules_to_not_convert / "
                              "disable_quant_module)", file=str(path), key=key)


def _load_one(target: WeightTarget, f: Any, key: str, path: Path, fp8_checkpoint: bool = False) -> None:
    if target.param is None:
        return
    try:
        loaded = f.get_slice(key)
        _check_fp8_dtype(target.param, loaded, fp8_checkpoint, key, path)
        target.param.weight_loader(target.param, loaded, *target.args)
    except WeightLoadError as exc:
        raise WeightLoadError(exc.detail, file=str(path), key=key) from exc
    except CheckpointError:
        raise
    except Exception as exc:  # a short read of a truncated file surfaces here
        raise CheckpointError(f"could not read tensor ({type(exc).__name__}: {exc})", file=str(path), key=key) from exc


def _init_dummy(model: LongcatFlashForCausalLM, seed: int) -> None:
    """Random weights generated on the target device, the same model at every tensor-parallel size."""
    init_dummy(model, seed)

"""ModelConfig: the one place that turns a LongCat-Flash HF `config.json` into a frozen dataclass.

Decisions (see docs/interfaces.md and the architecture spec §1, §8):
- `num_layers` is the decoder-layer count. When present, `num_hidden_layers` is ignored, as transformers does
  (4.57 overwrites it with 2*num_layers in the model and a bare LongcatFlashConfig keeps its default 56).
  When only `num_hidden_layers` is present it is taken as the decoder-layer count, as Meituan's original remote
  code, vLLM and SGLang do (a wrong guess cannot pass silently: the checkpoint's layer keys would not match).
- Structural sizes are required (a missing `hidden_size` must not silently become 6144); numeric knobs default
  to the transformers 4.57 defaults (rope_theta 1e7, rms_norm_eps 1e-5, routed_scaling_factor 6.0, ...).
- The MLA LoRA scales sqrt(H/q_lora_rank) and sqrt(H/kv_lora_rank) are always applied, as transformers does;
  the `mla_scale_q_lora` / `mla_scale_kv_lora` flags are only recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
FP8_BLOCK = 128  # the only weight_block_size supported: [128, 128] (DeepSeek-V3 / LongCat-Flash-Chat-FP8)


class ConfigError(ValueError):
    """A missing or inconsistent config field; `.field` names it, `.source` the file (or '<dict>')."""

    def __init__(self, field: str, message: str, source: str = "<dict>"):
        super().__init__(f"{source}: field '{field}': {message}")
        self.field = field
        self.source = source


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (transformers `_compute_yarn_parameters` semantics; None fields take its defaults)."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QuantConfig:
    """Block-FP8 weights (`quantization_config` of an FP8 checkpoint, or `--quantization fp8` at load time).

    Quantized: every MLA projection, the dense MLPs, the routed experts and the MTP layer's linears, except modules
    named in `skipped` (modules_to_not_convert / ignored_layers / disable_quant_module, matched as whole dotted
    name parts: "self_attn" skips every attention, "model.layers.0.mlps" one layer's MLPs, "mtp" the MTP layer).
    Never: router, norms, embeddings, lm_head. `checkpoint_quantized` False: the checkpoint holds bf16/fp32 weights
    that the loader quantizes into the same format (no weight_scale_inv keys expected).
    """

    method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    skipped: tuple[str, ...] = ()
    checkpoint_quantized: bool = True

    def quantizes(self, prefix: str) -> bool:
        """Whether the linear module at checkpoint prefix `prefix` (e.g. model.layers.0.self_attn.1.q_b_proj)
        holds FP8 weights."""
        dotted = f".{prefix}."
        return not any(f".{name}." in dotted for name in self.skipped)


def quantizes(config: ModelConfig, prefix: str) -> bool:
    """config.quantization is set and covers the module at `prefix`."""
    return config.quantization is not None and config.quantization.quantizes(prefix)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int  # decoder layers; each holds 2 attention sublayers, 2 dense MLPs and 1 MoE
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    ffn_hidden_size: int
    expert_ffn_hidden_size: int
    n_routed_experts: int
    zero_expert_num: int
    moe_topk: int
    routed_scaling_factor: float = 6.0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e7
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    router_bias: bool = False  # transformers creates classifier.bias but never uses it; neither do we
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    mla_scale_q_lora: bool = True  # recorded only: the scales are always applied (transformers semantics)
    mla_scale_kv_lora: bool = True
    quantization: QuantConfig | None = None  # block-FP8 weights; None: every weight in the model dtype

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_attention_sublayers(self) -> int:
        return 2 * self.num_layers

    @property
    def kv_cache_entry_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_router_experts(self) -> int:
        return self.n_routed_experts + self.zero_expert_num

    @property
    def mla_q_scale(self) -> float:
        return (self.hidden_size / self.q_lora_rank) ** 0.5

    @property
    def mla_kv_scale(self) -> float:
        return (self.hidden_size / self.kv_lora_rank) ** 0.5

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            mscale = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * mscale * mscale
        return scale

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read `<model_dir>/config.json` (or a path to the json file itself)."""
        path = Path(model_dir)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError("config.json", "file not found", str(path))
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError("config.json", f"not valid JSON ({exc})", str(path)) from exc
        if not isinstance(raw, dict):
            raise ConfigError("config.json", "top level must be a JSON object", str(path))
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        return _parse(raw, source)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---- parsing ---------------------------------------------------------------------------------------

_REQUIRED_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "ffn_hidden_size",
    "expert_ffn_hidden_size",
    "n_routed_experts",
    "moe_topk",
)


class _Reader:
    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(field, message, self.source)

    def int(self, field: str, default: Any = ..., minimum: int = 1, allow_none: bool = False) -> Any:
        value = self.raw.get(field, None)
        if value is None:
            if field in self.raw and allow_none:
                return None
            if default is ...:
                raise self.error(field, "missing (required)")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.error(field, f"must be >= {minimum}, got {value}")
        return value

    def float(self, field: str, default: float, positive: bool = True) -> float:
        value = self.raw.get(field, None)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(field, f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.error(field, f"must be > 0, got {value}")
        return float(value)

    def bool(self, field: str, default: bool) -> bool:
        value = self.raw.get(field, None)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {value!r}")
        return value


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    r = _Reader(raw, source)
    model_type = raw.get("model_type")
    if model_type is not None and model_type != "longcat_flash":
        raise r.error("model_type", f"expected 'longcat_flash', got {model_type!r}")

    if "q_lora_rank" in raw and raw["q_lora_rank"] is None:  # before the generic "missing (required)"
        raise r.error("q_lora_rank", "null is not supported (transformers' LongCat forward always uses the q LoRA)")
    sizes = {name: r.int(name) for name in _REQUIRED_POSITIVE_INTS}
    zero_expert_num = r.int("zero_expert_num", minimum=0)
    num_layers = _num_layers(r)
    heads = sizes["num_attention_heads"]

    kv_heads = r.int("num_key_value_heads", default=heads)
    if kv_heads != heads:
        raise r.error("num_key_value_heads", f"MLA needs num_key_value_heads == num_attention_heads ({heads}), got {kv_heads}")
    head_dim = r.int("head_dim", default=sizes["qk_rope_head_dim"])
    if head_dim != sizes["qk_rope_head_dim"]:
        # transformers sizes RoPE's inv_freq from head_dim; anything else is silently wrong (spec §8.3).
        raise r.error("head_dim", f"must equal qk_rope_head_dim ({sizes['qk_rope_head_dim']}), got {head_dim}")
    if sizes["qk_rope_head_dim"] % 2:
        raise r.error("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {sizes['qk_rope_head_dim']}")
    qk_head_dim = r.int("qk_head_dim", default=sizes["qk_nope_head_dim"] + sizes["qk_rope_head_dim"])
    if qk_head_dim != sizes["qk_nope_head_dim"] + sizes["qk_rope_head_dim"]:
        raise r.error("qk_head_dim", f"must equal qk_nope_head_dim + qk_rope_head_dim, got {qk_head_dim}")
    if sizes["moe_topk"] > sizes["n_routed_experts"] + zero_expert_num:
        raise r.error("moe_topk", f"{sizes['moe_topk']} exceeds n_routed_experts + zero_expert_num")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise r.error("hidden_act", f"only 'silu' is supported, got {act!r}")
    zero_type = raw.get("zero_expert_type", "identity")
    if zero_type not in (None, "identity"):
        raise r.error("zero_expert_type", f"only 'identity' is supported, got {zero_type!r}")
    if raw.get("norm_topk_prob"):
        raise r.error("norm_topk_prob", "renormalised top-k weights are not part of LongCat-Flash (must be false)")

    rope_theta, rope_scaling = _rope(r)
    return ModelConfig(
        **sizes,
        num_layers=num_layers,
        zero_expert_num=zero_expert_num,
        routed_scaling_factor=r.float("routed_scaling_factor", 6.0),
        rms_norm_eps=r.float("rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=r.int("max_position_embeddings", default=131072),
        attention_bias=r.bool("attention_bias", False),
        router_bias=r.bool("router_bias", False),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        bos_token_id=r.int("bos_token_id", default=1, minimum=0, allow_none=True),
        eos_token_ids=_eos_ids(r, sizes["vocab_size"]),
        pad_token_id=r.int("pad_token_id", default=None, minimum=0, allow_none=True),
        torch_dtype=_dtype(r),
        mla_scale_q_lora=r.bool("mla_scale_q_lora", True),
        mla_scale_kv_lora=r.bool("mla_scale_kv_lora", True),
        quantization=_quantization(r),
    )


def _num_layers(r: _Reader) -> int:
    num_hidden = r.int("num_hidden_layers", default=None)
    if "num_layers" not in r.raw or r.raw["num_layers"] is None:
        if num_hidden is None:
            raise r.error("num_layers", "missing (and no num_hidden_layers to fall back on)")
        return num_hidden  # original remote-code / vLLM convention: decoder-layer count
    return r.int("num_layers")


def _rope(r: _Reader) -> tuple[float, RopeScaling | None]:
    theta = r.float("rope_theta", 1e7)
    scaling = r.raw.get("rope_scaling")
    field = "rope_scaling"
    params = r.raw.get("rope_parameters")  # transformers 5.x layout
    if params is not None:
        if not isinstance(params, dict):
            raise r.error("rope_parameters", f"must be an object, got {params!r}")
        if "rope_theta" in params:
            p_theta = params["rope_theta"]
            if isinstance(p_theta, bool) or not isinstance(p_theta, (int, float)) or p_theta <= 0:
                raise r.error("rope_parameters.rope_theta", f"must be a positive number, got {p_theta!r}")
            if "rope_theta" in r.raw and r.raw["rope_theta"] is not None and float(p_theta) != theta:
                raise r.error("rope_theta", f"{theta} disagrees with rope_parameters.rope_theta {p_theta}")
            theta = float(p_theta)
        if scaling is None:
            scaling, field = params, "rope_parameters"
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise r.error(field, f"must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("yarn", "deepseek_yarn"):
        raise r.error(f"{field}.rope_type", f"only 'default' and 'yarn' are supported, got {rope_type!r}")

    def num(key: str, required: bool = False) -> float | None:
        value = scaling.get(key)
        if value is None:
            if required:
                raise r.error(f"{field}.{key}", "missing (required for YaRN)")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise r.error(f"{field}.{key}", f"must be a positive number, got {value!r}")
        return float(value)

    orig = num("original_max_position_embeddings")
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise r.error(f"{field}.truncate", f"must be true or false, got {truncate!r}")
    return theta, RopeScaling(
        rope_type="yarn",
        factor=num("factor", required=True),  # type: ignore[arg-type]
        original_max_position_embeddings=int(orig) if orig is not None else None,
        beta_fast=num("beta_fast"),
        beta_slow=num("beta_slow"),
        mscale=num("mscale"),
        mscale_all_dim=num("mscale_all_dim"),
        attention_factor=num("attention_factor"),
        truncate=truncate,
    )


def _names(r: _Reader, raw: dict[str, Any], key: str, field: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip(".") for v in value):
        raise r.error(field, f"must be a list of module names, got {value!r}")
    return tuple(v.strip(".") for v in value)


def _quantization(r: _Reader) -> QuantConfig | None:
    """`quantization_config` (vLLM / transformers FineGrainedFP8 names). `disable_quant_module` may sit at the top
    level of config.json (where vLLM and SGLang read it) or inside quantization_config."""
    q = r.raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise r.error("quantization_config", f"must be an object or null, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise r.error("quantization_config.quant_method", f"unsupported quantization method {method!r} (only 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise r.error("quantization_config.fmt", f"only 'e4m3' is supported, got {fmt!r}")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise r.error("quantization_config.activation_scheme", f"only 'dynamic' is supported, got {scheme!r}")
    block = q.get("weight_block_size")
    if block != [FP8_BLOCK, FP8_BLOCK]:
        raise r.error("quantization_config.weight_block_size",
                      f"only [{FP8_BLOCK}, {FP8_BLOCK}] block scales are supported, got {block!r}")
    skipped = (
        _names(r, q, "modules_to_not_convert", "quantization_config.modules_to_not_convert")
        + _names(r, q, "ignored_layers", "quantization_config.ignored_layers")
        + _names(r, q, "disable_quant_module", "quantization_config.disable_quant_module")
        + _names(r, r.raw, "disable_quant_module", "disable_quant_module")
    )
    return QuantConfig(skipped=skipped)


def _eos_ids(r: _Reader, vocab_size: int) -> tuple[int, ...]:
    value = r.raw.get("eos_token_id", 2)
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size for v in values):
        raise r.error("eos_token_id", f"must be an int or a non-empty list of ints in [0, vocab_size), got {value!r}")
    return tuple(values)


def _dtype(r: _Reader) -> str | None:
    value = r.raw.get("torch_dtype", r.raw.get("dtype"))  # transformers 5 writes "dtype"
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("torch."):
        value = value[len("torch.") :]
    if value not in SUPPORTED_DTYPES:
        raise r.error("torch_dtype", f"must be one of {SUPPORTED_DTYPES}, got {value!r}")
    return value

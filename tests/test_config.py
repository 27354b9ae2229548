"""ModelConfig: reading transformers-written config.json files, derived constants, errors naming the field."""

from __future__ import annotations

import json
import math

import pytest
from transformers import LongcatFlashConfig

from longcat_service.config import ConfigError, ModelConfig
from tests.hf_tiny import BASE


def _hf_dict(**overrides) -> dict:
    return LongcatFlashConfig(**{**BASE, **overrides}).to_dict()


def _write(tmp_path, raw: dict):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def _error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(raw)
    return info.value


def test_reads_transformers_saved_config(tmp_path):
    LongcatFlashConfig(**BASE).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["num_layers"] == 2  # written alongside num_hidden_layers
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert (cfg.num_layers, cfg.num_attention_sublayers) == (2, 4)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank) == (64, 4, 16)
    assert (cfg.n_routed_experts, cfg.zero_expert_num, cfg.num_router_experts, cfg.moe_topk) == (6, 3, 9, 3)
    assert cfg.kv_cache_entry_width == 16 + 4
    assert cfg.eos_token_ids == (2,) and cfg.eos_token_id == 2
    assert cfg.rope_theta == 1e7 and cfg.rope_scaling is None


@pytest.mark.parametrize("num_hidden_layers", [4, 56, 2])
def test_num_layers_wins_over_num_hidden_layers_like_transformers(num_hidden_layers):
    # model.save_pretrained writes 2*num_layers; a bare LongcatFlashConfig keeps the default 56
    assert ModelConfig.from_dict(_hf_dict(num_hidden_layers=num_hidden_layers)).num_layers == 2


def test_released_560b_derived_constants():
    cfg = ModelConfig.from_dict(LongcatFlashConfig().to_dict())  # transformers defaults = the 560B model
    assert cfg.num_layers == 28 and cfg.num_attention_sublayers == 56
    assert cfg.qk_head_dim == 192
    assert cfg.kv_cache_entry_width == 576
    assert cfg.mla_q_scale == pytest.approx(2.0)
    assert cfg.mla_kv_scale == pytest.approx(3.4641016, rel=1e-7)
    assert cfg.softmax_scale == pytest.approx(0.0721688, rel=1e-6)
    assert cfg.num_router_experts == 768
    assert cfg.mla_scale_q_lora and cfg.mla_scale_kv_lora


def test_only_num_hidden_layers_counts_decoder_layers():
    raw = _hf_dict()
    del raw["num_layers"]
    raw["num_hidden_layers"] = 3
    assert ModelConfig.from_dict(raw).num_layers == 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": 8}, "head_dim"),
        ({"qk_head_dim": 13}, "qk_head_dim"),
        ({"moe_topk": 10}, "moe_topk"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"eos_token_id": [2, 999]}, "eos_token_id"),
        ({"eos_token_id": "2"}, "eos_token_id"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": 12.5}, "vocab_size"),
        ({"zero_expert_num": -1}, "zero_expert_num"),
        ({"model_type": "llama"}, "model_type"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
    ],
)
def test_inconsistent_field_is_named(overrides, field):
    err = _error({**_hf_dict(), **overrides})
    assert err.field == field
    assert f"'{field}'" in str(err)


@pytest.mark.parametrize("field", ["hidden_size", "kv_lora_rank", "n_routed_experts", "zero_expert_num", "moe_topk"])
def test_missing_required_field_names_field_and_file(tmp_path, field):
    raw = _hf_dict()
    del raw[field]
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(_write(tmp_path, raw))
    assert info.value.field == field
    assert str(tmp_path / "config.json") in str(info.value) and "missing" in str(info.value)


def test_missing_or_invalid_json_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json.*not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_zero_experts_optional_and_top1():
    cfg = ModelConfig.from_dict(_hf_dict(zero_expert_num=0, moe_topk=1))
    assert cfg.zero_expert_num == 0 and cfg.num_router_experts == 6 and cfg.moe_topk == 1


def test_eos_list_and_defaults():
    raw = _hf_dict(eos_token_id=[2, 7])
    for key in ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "head_dim", "qk_head_dim"):
        raw.pop(key)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.eos_token_ids == (2, 7)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.routed_scaling_factor) == (1e7, 1e-5, 6.0)
    assert cfg.qk_head_dim == 12


def test_mla_scale_flags_are_recorded_not_applied():
    cfg = ModelConfig.from_dict({**_hf_dict(), "mla_scale_q_lora": False, "mla_scale_kv_lora": False})
    assert (cfg.mla_scale_q_lora, cfg.mla_scale_kv_lora) == (False, False)
    assert cfg.mla_q_scale == pytest.approx(math.sqrt(64 / 32))  # transformers applies the scales regardless


def test_transformers5_rope_parameters():
    raw = _hf_dict()
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None
    err = _error({**raw, "rope_theta": 1e7})
    assert err.field == "rope_theta"


def test_yarn_mscale_scales_softmax():
    scaling = {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 64}
    cfg = ModelConfig.from_dict(_hf_dict(rope_scaling=scaling))
    mscale = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 40.0
    assert cfg.softmax_scale == pytest.approx(12**-0.5 * mscale**2)


def test_config_is_frozen():
    cfg = ModelConfig.from_dict(_hf_dict())
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]

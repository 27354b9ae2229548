"""ModelConfig parsing rules on plain dicts (no transformers import): every refused value gets an error naming its
field with a readable message, optional fields take their documented defaults, RoPE / YaRN and FP8 quantization
blocks in both the transformers 4 and 5 layouts. Reading transformers-written files: tests/test_config.py."""

from __future__ import annotations

import json
import math

import pytest

from longcat_service.config import ConfigError, ModelConfig, QuantConfig, RopeScaling, quantizes, yarn_get_mscale
from tests.tiny_config import TINY_CONFIG

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def parse(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**TINY_CONFIG, **overrides})


def error(**overrides) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(**overrides)
    return info.value


def message(**overrides) -> str:
    err = error(**overrides)
    assert str(err) == f"<dict>: field '{err.field}': " + str(err).split(": ", 2)[2]
    return f"{err.field}: " + str(err).split(": ", 2)[2]


# ---- files ------------------------------------------------------------------------------------------------------

def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "config.json"
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(tmp_path)
    assert (info.value.field, info.value.source) == ("config.json", str(missing))
    assert str(info.value) == f"{missing}: field 'config.json': file not found"
    missing.write_text("[1, 2]")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(missing)  # the json file itself, not its folder
    assert str(info.value) == f"{missing}: field 'config.json': top level must be a JSON object"
    missing.write_text("{")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(tmp_path)
    assert info.value.field == "config.json" and str(info.value).startswith(f"{missing}: field 'config.json': not valid JSON (")


def test_field_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_CONFIG, "rms_norm_eps": 0}))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(tmp_path)
    assert (info.value.field, info.value.source) == ("rms_norm_eps", str(path))
    assert str(info.value) == f"{path}: field 'rms_norm_eps': must be > 0, got 0"
    path.write_text(json.dumps(TINY_CONFIG))
    assert ModelConfig.from_pretrained(path) == ModelConfig.from_dict(TINY_CONFIG)


# ---- field readers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, text", [
    ({"hidden_size": True}, "hidden_size: must be an integer, got True"),
    ({"hidden_size": "64"}, "hidden_size: must be an integer, got '64'"),
    ({"hidden_size": 0}, "hidden_size: must be >= 1, got 0"),
    ({"hidden_size": None}, "hidden_size: missing (required)"),
    ({"bos_token_id": -1}, "bos_token_id: must be >= 0, got -1"),
    ({"rms_norm_eps": 0}, "rms_norm_eps: must be > 0, got 0"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps: must be > 0, got -1e-06"),
    ({"rms_norm_eps": True}, "rms_norm_eps: must be a finite number, got True"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps: must be a finite number, got '1e-5'"),
    ({"routed_scaling_factor": math.inf}, "routed_scaling_factor: must be a finite number, got inf"),
    ({"rope_theta": math.nan}, "rope_theta: must be a finite number, got nan"),
    ({"attention_bias": 1}, "attention_bias: must be true or false, got 1"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings: must be true or false, got 'false'"),
])
def test_reader_errors(overrides, text):
    assert message(**overrides) == text


def test_reader_defaults_and_nulls():
    cfg = parse(bos_token_id=None, pad_token_id=None, attention_bias=None, rms_norm_eps=None, routed_scaling_factor=2)
    assert (cfg.bos_token_id, cfg.pad_token_id, cfg.attention_bias, cfg.rms_norm_eps) == (None, None, False, 1e-5)
    assert cfg.routed_scaling_factor == 2.0 and isinstance(cfg.routed_scaling_factor, float)
    raw = dict(TINY_CONFIG)
    for key in ("bos_token_id", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps"):
        del raw[key]
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.bos_token_id, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (1, 131072, False)
    cfg = parse(attention_bias=True, router_bias=True, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0)
    assert (cfg.attention_bias, cfg.router_bias, cfg.tie_word_embeddings, cfg.pad_token_id, cfg.bos_token_id) == (
        True, True, True, 0, 0)


# ---- eos ids and dtype ------------------------------------------------------------------------------------------

def test_eos_ids_default_and_vocabulary_range():
    raw = dict(TINY_CONFIG)
    del raw["eos_token_id"]
    assert ModelConfig.from_dict(raw).eos_token_ids == (2,)
    assert parse(eos_token_id=0).eos_token_ids == (0,)
    assert parse(eos_token_id=[127, 0]).eos_token_ids == (127, 0)
    for bad in (128, -1, [], [True], [2, None], None):
        assert message(eos_token_id=bad) == (
            f"eos_token_id: must be an int or a non-empty list of ints in [0, vocab_size), got {bad!r}")


@pytest.mark.parametrize("raw, dtype", [
    ({}, None),
    ({"torch_dtype": "bfloat16"}, "bfloat16"),
    ({"torch_dtype": "torch.float16"}, "float16"),
    ({"dtype": "float32"}, "float32"),  # transformers 5
    ({"torch_dtype": "bfloat16", "dtype": "float32"}, "bfloat16"),
    ({"torch_dtype": None}, None),
])
def test_dtype(raw, dtype):
    assert parse(**raw).torch_dtype == dtype


@pytest.mark.parametrize("bad, shown", [
    ("int8", "'int8'"), ("torch.int8", "'int8'"), ("Torch.bfloat16", "'Torch.bfloat16'"), ("float", "'float'"), (16, "16"),
])
def test_bad_dtype(bad, shown):
    assert message(torch_dtype=bad) == f"torch_dtype: must be one of ('bfloat16', 'float16', 'float32'), got {shown}"


# ---- RoPE and YaRN ----------------------------------------------------------------------------------------------

def test_yarn_mscale():
    assert yarn_get_mscale(1.0) == 1.0 and yarn_get_mscale(0.5, 3.0) == 1.0  # no scaling: no correction
    assert yarn_get_mscale(40.0) == pytest.approx(1.0 + 0.1 * math.log(40.0))
    assert yarn_get_mscale(1.5) == pytest.approx(1.0 + 0.1 * math.log(1.5))
    assert yarn_get_mscale(40.0, 0.707) == pytest.approx(1.0 + 0.0707 * math.log(40.0))


def test_softmax_scale_without_mscale_all_dim_is_plain():
    plain = (8 + 4) ** -0.5
    assert parse().softmax_scale == pytest.approx(plain)
    yarn = {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0}
    assert parse(rope_scaling=yarn).softmax_scale == pytest.approx(plain)
    assert parse(rope_scaling={**yarn, "mscale_all_dim": 0.5}).softmax_scale == pytest.approx(
        plain * (1.0 + 0.05 * math.log(4.0)) ** 2)


def test_yarn_fields_are_read():
    scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096.0, "beta_fast": 32,
               "beta_slow": 1, "mscale": 0.5, "mscale_all_dim": 0.25, "attention_factor": 1.5, "truncate": False}
    assert parse(rope_scaling=scaling).rope_scaling == RopeScaling(
        rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
        mscale=0.5, mscale_all_dim=0.25, attention_factor=1.5, truncate=False)
    cfg = parse(rope_scaling={"rope_type": "deepseek_yarn", "factor": 2.0})
    assert cfg.rope_scaling == RopeScaling(rope_type="yarn", factor=2.0)
    assert isinstance(cfg.rope_scaling.original_max_position_embeddings, type(None))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "default"}, {"type": "default"}, {}])
def test_default_rope_has_no_scaling(scaling):
    assert parse(rope_scaling=scaling).rope_scaling is None


@pytest.mark.parametrize("scaling, text", [
    ("yarn", "rope_scaling: must be an object or null, got 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0}, "rope_scaling.rope_type: only 'default' and 'yarn' are supported, got 'linear'"),
    ({"rope_type": "yarn"}, "rope_scaling.factor: missing (required for YaRN)"),
    ({"rope_type": "yarn", "factor": 0}, "rope_scaling.factor: must be a positive number, got 0"),
    ({"rope_type": "yarn", "factor": True}, "rope_scaling.factor: must be a positive number, got True"),
    ({"rope_type": "yarn", "factor": "4"}, "rope_scaling.factor: must be a positive number, got '4'"),
    ({"rope_type": "yarn", "factor": 4, "beta_fast": -1}, "rope_scaling.beta_fast: must be a positive number, got -1"),
    ({"rope_type": "yarn", "factor": 4, "truncate": "no"}, "rope_scaling.truncate: must be true or false, got 'no'"),
])
def test_bad_rope_scaling(scaling, text):
    assert message(rope_scaling=scaling) == text


def test_transformers5_rope_parameters_layout():
    raw = {k: v for k, v in TINY_CONFIG.items() if k != "rope_theta"}
    cfg = ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8}})
    assert (cfg.rope_theta, cfg.rope_scaling) == (5e5, RopeScaling(rope_type="yarn", factor=8.0))
    cfg = ModelConfig.from_dict({**raw, "rope_theta": None, "rope_parameters": {"rope_theta": 5e5}})
    assert (cfg.rope_theta, cfg.rope_scaling) == (5e5, None)
    cfg = ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "default"}})
    assert cfg.rope_theta == 1e7  # no theta anywhere: the default
    both = {**raw, "rope_theta": 5e5, "rope_parameters": {"rope_theta": 5e5}}
    assert ModelConfig.from_dict(both).rope_theta == 5e5  # agreeing values are fine
    # rope_scaling (transformers 4) wins over rope_parameters for the scaling; errors name where they come from
    cfg = ModelConfig.from_dict({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 2},
                                 "rope_parameters": {"rope_type": "yarn", "factor": 8}})
    assert cfg.rope_scaling.factor == 2.0
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "yarn"}})
    assert info.value.field == "rope_parameters.factor"


@pytest.mark.parametrize("params, text", [
    ([1], "rope_parameters: must be an object, got [1]"),
    ({"rope_theta": 0}, "rope_parameters.rope_theta: must be a positive number, got 0"),
    ({"rope_theta": True}, "rope_parameters.rope_theta: must be a positive number, got True"),
    ({"rope_theta": "1e7"}, "rope_parameters.rope_theta: must be a positive number, got '1e7'"),
    ({"rope_theta": 5e5}, "rope_theta: 10000000.0 disagrees with rope_parameters.rope_theta 500000.0"),
])
def test_bad_rope_parameters(params, text):
    assert message(rope_parameters=params) == text


# ---- FP8 quantization -------------------------------------------------------------------------------------------

def test_quantization_defaults_and_skip_lists():
    assert parse().quantization is None and parse(quantization_config=None).quantization is None
    q = parse(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}).quantization
    assert q == QuantConfig() and (q.fmt, q.activation_scheme, q.skipped, q.checkpoint_quantized) == (
        "e4m3", "dynamic", (), True)
    q = parse(quantization_config={**FP8, "modules_to_not_convert": [".lm_head."], "ignored_layers": ["a.b"],
                                   "disable_quant_module": ["mtp"]},
              disable_quant_module=["model.layers.1"]).quantization
    assert q.skipped == ("lm_head", "a.b", "mtp", "model.layers.1")
    assert parse(quantization_config=FP8, disable_quant_module=None).quantization.skipped == ()


@pytest.mark.parametrize("edit, text", [
    ({"quant_method": "awq"}, "quantization_config.quant_method: unsupported quantization method 'awq' (only 'fp8')"),
    ({"quant_method": None}, "quantization_config.quant_method: unsupported quantization method None (only 'fp8')"),
    ({"fmt": "e5m2"}, "quantization_config.fmt: only 'e4m3' is supported, got 'e5m2'"),
    ({"activation_scheme": "static"}, "quantization_config.activation_scheme: only 'dynamic' is supported, got 'static'"),
    ({"weight_block_size": [64, 64]},
     "quantization_config.weight_block_size: only [128, 128] block scales are supported, got [64, 64]"),
    ({"weight_block_size": None},
     "quantization_config.weight_block_size: only [128, 128] block scales are supported, got None"),
])
def test_unsupported_quantization(edit, text):
    assert message(quantization_config={**FP8, **edit}) == text


@pytest.mark.parametrize("key", ["modules_to_not_convert", "ignored_layers", "disable_quant_module"])
@pytest.mark.parametrize("bad", ["lm_head", [3], [""], ["."], ["ok", None]])
def test_bad_skip_lists_name_their_key(key, bad):
    assert message(quantization_config={**FP8, key: bad}) == (
        f"quantization_config.{key}: must be a list of module names, got {bad!r}")


def test_bad_top_level_skip_list():
    assert message(quantization_config=FP8, disable_quant_module="mtp") == (
        "disable_quant_module: must be a list of module names, got 'mtp'")
    assert message(quantization_config="fp8") == "quantization_config: must be an object or null, got 'fp8'"


def test_quantizes_follows_the_skip_list_by_whole_name_parts():
    cfg = parse(quantization_config={**FP8, "modules_to_not_convert": ["self_attn", "model.layers.1"]})
    assert quantizes(cfg, "model.layers.0.mlps.0.gate_proj")
    assert not quantizes(cfg, "model.layers.0.self_attn.0.q_a_proj")
    assert not quantizes(cfg, "model.layers.1.mlp.experts")
    assert quantizes(cfg, "model.layers.10.mlp.experts")
    assert not quantizes(parse(), "model.layers.0.mlps.0.gate_proj")  # no quantization at all
    assert QuantConfig().quantizes("lm_head") and not QuantConfig(skipped=("lm_head",)).quantizes("lm_head")


# ---- structure --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, text", [
    ({"model_type": "llama"}, "model_type: expected 'longcat_flash', got 'llama'"),
    ({"num_key_value_heads": 2}, "num_key_value_heads: MLA needs num_key_value_heads == num_attention_heads (4), got 2"),
    ({"head_dim": 8}, "head_dim: must equal qk_rope_head_dim (4), got 8"),
    ({"qk_rope_head_dim": 5, "head_dim": 5}, "qk_rope_head_dim: must be even (RoPE rotates pairs), got 5"),
    ({"qk_head_dim": 13}, "qk_head_dim: must equal qk_nope_head_dim + qk_rope_head_dim, got 13"),
    ({"q_lora_rank": None}, "q_lora_rank: null is not supported (transformers' LongCat forward always uses the q LoRA)"),
    ({"moe_topk": 10}, "moe_topk: 10 exceeds n_routed_experts + zero_expert_num"),
    ({"hidden_act": "gelu"}, "hidden_act: only 'silu' is supported, got 'gelu'"),
    ({"zero_expert_type": "zero"}, "zero_expert_type: only 'identity' is supported, got 'zero'"),
    ({"norm_topk_prob": True}, "norm_topk_prob: renormalised top-k weights are not part of LongCat-Flash (must be false)"),
    ({"num_layers": None}, "num_layers: missing (and no num_hidden_layers to fall back on)"),
])
def test_structural_errors(overrides, text):
    assert message(**overrides) == text


def test_missing_q_lora_rank_is_a_missing_required_field():
    raw = {k: v for k, v in TINY_CONFIG.items() if k != "q_lora_rank"}
    with pytest.raises(ConfigError, match=r"field 'q_lora_rank': missing \(required\)$"):
        ModelConfig.from_dict(raw)


def test_structural_values_that_are_accepted():
    assert parse(model_type="longcat_flash").num_layers == 2
    assert parse(model_type=None, hidden_act="silu", zero_expert_type="identity", norm_topk_prob=False).moe_topk == 3
    assert parse(zero_expert_type=None).zero_expert_num == 3
    assert parse(moe_topk=9).moe_topk == 9  # 6 routed + 3 zero experts: every expert chosen
    assert parse(moe_topk=5).moe_topk == 5  # more than the routed experts alone
    assert parse(num_layers=None, num_hidden_layers=3).num_layers == 3
    cfg = parse()
    assert (cfg.max_position_embeddings, cfg.router_bias, cfg.pad_token_id) == (256, False, None)
    assert parse(rope_parameters={"rope_theta": 0.5}, rope_theta=None).rope_theta == 0.5  # any positive theta


def test_config_error_from_a_dict():
    err = ConfigError("hidden_size", "missing (required)")
    assert (err.field, err.source, str(err)) == ("hidden_size", "<dict>", "<dict>: field 'hidden_size': missing (required)")


def test_skip_list_names_keep_their_characters_but_the_surrounding_dots():
    q = parse(quantization_config={**FP8, "modules_to_not_convert": ["..mlp.X.", "Xproj", "X"]}).quantization
    assert q.skipped == ("mlp.X", "Xproj", "X")

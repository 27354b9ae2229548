"""ops/fp8.py (the layers' FP8 dispatch) on CPU and the quantization-config matching rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcat_service.config import ConfigError, ModelConfig, QuantConfig
from longcat_service.ops import fp8
from longcat_service.ops.fp8_reference import block_dequant, block_quant
from tests.tiny_config import TINY_CONFIG


def test_parts_dequantize_each_part_with_its_own_scales():
    gate, up = torch.randn(200, 150), torch.randn(200, 150) * 50  # very different magnitudes per part
    (g8, gs), (u8, us) = block_quant(gate), block_quant(up)
    w8, scale = torch.cat([g8, u8]), torch.cat([gs, us])  # [400, 150], scale [2 + 2, 2]
    got = fp8.dequant(w8, scale, torch.float32, parts=(200, 200))
    want = torch.cat([block_dequant(g8, gs, dtype=torch.float32), block_dequant(u8, us, dtype=torch.float32)])
    assert torch.equal(got, want)
    assert not fp8.standard_layout((200, 200)) and fp8.standard_layout((256, 200)) and fp8.standard_layout((200,))
    x = torch.randn(3, 150)
    torch.testing.assert_close(fp8.fp8_linear(x, w8, scale, (200, 200)), F.linear(x, want), rtol=0, atol=0)


def test_chunked_expert_dequant_equals_the_reference(monkeypatch):
    w8, scale = block_quant(torch.randn(7, 200, 150))
    monkeypatch.setattr(fp8, "DEQUANT_CHUNK_ELEMENTS", 2 * 200 * 150)  # 2 experts per chunk, last chunk of 1
    assert torch.equal(fp8.dequant(w8, scale, torch.bfloat16), block_dequant(w8, scale, dtype=torch.bfloat16))


def test_fp8_linear_on_cpu_is_the_weight_only_reference():
    w8, scale = block_quant(torch.randn(130, 260))
    x = torch.randn(2, 5, 260, dtype=torch.bfloat16)
    want = F.linear(x, block_dequant(w8, scale, dtype=torch.bfloat16))
    assert torch.equal(fp8.fp8_linear(x, w8, scale), want)


@pytest.mark.parametrize(("skipped", "prefix", "quantized"), [
    ((), "model.layers.0.self_attn.0.q_a_proj", True),
    (("self_attn",), "model.layers.0.self_attn.1.o_proj", False),
    (("self_attn",), "model.layers.0.mlps.0.gate_proj", True),
    (("mlps",), "model.layers.3.mlps.1.down_proj", False),
    (("mtp",), "model.mtp.layers.0.self_attn.q_a_proj", False),
    (("model.layers.1",), "model.layers.10.mlp.experts", True),  # whole name parts: layers.1 is not layers.10
    (("model.layers.1",), "model.layers.1.mlp.experts", False),
    (("o_proj",), "model.layers.2.self_attn.0.o_proj", False),
    (("q_a",), "model.layers.2.self_attn.0.q_a_proj", True),
])
def test_skip_lists_match_whole_dotted_name_parts(skipped, prefix, quantized):
    assert QuantConfig(skipped=skipped).quantizes(prefix) is quantized


def test_quantization_config_is_parsed():
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
         "ignored_layers": ["lm_head"], "modules_to_not_convert": ["model.layers.0.mlp"]}
    c = ModelConfig.from_dict({**TINY_CONFIG, "quantization_config": q, "disable_quant_module": ["mtp"]})
    assert c.quantization == QuantConfig(skipped=("model.layers.0.mlp", "lm_head", "mtp"))
    assert c.quantization.checkpoint_quantized
    assert ModelConfig.from_dict(TINY_CONFIG).quantization is None
    with pytest.raises(ConfigError, match=r"field 'quantization_config': must be an object"):
        ModelConfig.from_dict({**TINY_CONFIG, "quantization_config": "fp8"})
    with pytest.raises(ConfigError, match=r"field 'disable_quant_module'"):
        ModelConfig.from_dict({**TINY_CONFIG, "quantization_config": q, "disable_quant_module": [3]})

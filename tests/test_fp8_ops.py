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


@pytest.mark.parametrize("parts", [None, (200, 200)])
def test_w8a8_reference_is_within_the_activation_quantization_error(parts):
    """Prefill rows in w8a8 mode: each x_j is rounded to e4m3 in its 128-group with scale s = amax/448, so
    |q(x_j) - x_j| <= max(2^-4 |x_j|, 2^-10 s) (half an ulp: 3 mantissa bits; subnormal spacing 2^-9 s), and
    |y_i - sum_j x_j W_ij| <= sum_j max(2^-4 |x_j|, 2^-10 s_g(j)) |W_ij| (+ fp32 summation slack)."""
    gen = torch.Generator().manual_seed(1)
    w8, scale = block_quant(torch.randn(400, 300, generator=gen))
    w = fp8.dequant(w8, scale, torch.float32, parts)
    x = torch.randn(20, 300, generator=gen) * torch.logspace(-3, 1, 300)  # groups with wide dynamic range
    got = fp8.fp8_linear(x, w8, scale, parts, w8a8_reference=True)
    exact = x @ w.t()
    s = F.pad(x.abs(), (0, 84)).view(20, 3, 128).amax(-1) / 448
    per_elem = torch.maximum(x.abs() * 2.0**-4, s.repeat_interleave(128, -1)[:, :300] * 2.0**-10)
    bound = per_elem @ w.abs().t() + 1e-5 * (x.abs() @ w.abs().t())
    assert bool(((got - exact).abs() <= bound).all())
    assert (got - exact).abs().max() > 1e-3 * exact.abs().max()  # the activations really were quantized
    if parts is None:  # and it is h15k's spec of the prefill kernels
        from longcat_service.ops.fp8_reference import w8a8_linear_ref

        assert torch.equal(got, w8a8_linear_ref(x, w8, scale))
    # decode-sized batches stay weight-only, as on the GPU
    rows = fp8.DECODE_ROWS
    assert torch.equal(fp8.fp8_linear(x[:rows], w8, scale, parts, w8a8_reference=True), F.linear(x[:rows], w))


def test_w8a8_expert_reference_quantizes_both_expert_matmuls():
    from longcat_service.ops.reference import expert_ffn, moe_align

    gen = torch.Generator().manual_seed(2)
    e, h, inter, t, k = 3, 160, 96, 12, 2
    w13_8, w13_s = block_quant(torch.randn(e, 2 * inter, h, generator=gen) * 0.1)
    w2_8, w2_s = block_quant(torch.randn(e, h, inter, generator=gen) * 0.1)
    hidden = torch.randn(t, h, generator=gen)
    ids = torch.randint(0, e, (t, k), generator=gen)
    ids[:, 1] = (ids[:, 0] + 1) % e
    offsets, sorted_slots, _, _, _ = moe_align(ids.int(), e)
    got = fp8.expert_ffn_w8a8_ref(hidden, w13_8, w13_s, w2_8, w2_s, offsets, sorted_slots, k)
    w13, w2 = block_dequant(w13_8, w13_s, dtype=torch.float32), block_dequant(w2_8, w2_s, dtype=torch.float32)
    want = torch.zeros_like(got)
    off = offsets.tolist()
    for x in range(e):  # spelled out: quantize, gate_up, SwiGLU, quantize, down
        rows = slice(off[x], off[x + 1])
        xin = hidden[sorted_slots[rows].long() // k]
        gu = fp8.quant_dequant(xin) @ w13[x].t()
        want[rows] = fp8.quant_dequant(F.silu(gu[:, :inter]) * gu[:, inter:]) @ w2[x].t()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weight_only = expert_ffn(hidden, w13, w2, offsets, sorted_slots, k)
    assert 0 < (got - weight_only).abs().max() < 0.1 * weight_only.abs().max()


def test_fp8_layers_quantize_float_weights_and_add_their_bias():
    from longcat_service.layers.fp8_linear import (
        Fp8ColumnParallelLinear,
        Fp8MergedColumnParallelLinear,
        Fp8ReplicatedLinear,
        Fp8RowParallelLinear,
    )
    from longcat_service.layers.weight_utils import WeightLoadError

    gen = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(200, 160, generator=gen), torch.randn(200, generator=gen), torch.randn(4, 160, generator=gen)
    w_q = block_dequant(*block_quant(w), dtype=torch.float32)
    for cls in (Fp8ReplicatedLinear, Fp8ColumnParallelLinear, Fp8RowParallelLinear):
        layer = cls(160, 200, torch.float32, bias=True)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.shape == (2, 2)
        assert torch.equal(layer(x), F.linear(x, w_q, b)), cls.__name__
    merged = Fp8MergedColumnParallelLinear(160, [200, 56], torch.float32)
    merged.weight.weight_loader(merged.weight, w, 0)
    merged.weight.weight_loader(merged.weight, w[:56], 1)
    assert merged.parts == (200, 56) and merged.weight_scale_inv.shape == (2 + 1, 2)
    want = torch.cat([w_q, block_dequant(*block_quant(w[:56]), dtype=torch.float32)])
    assert torch.equal(merged(x), F.linear(x, want))
    with pytest.raises(WeightLoadError, match="shard_id 2 out of range for 2 parts"):
        merged.weight.weight_loader(merged.weight, w, 2)
    with pytest.raises(WeightLoadError, match=r"has shape \[200, 160\], expected \[56, 160\]"):
        merged.weight.weight_loader(merged.weight, w, 1)

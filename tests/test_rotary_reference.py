"""layers/rotary.py against transformers 4.57, its spec: the inverse frequencies and attention factor of default RoPE
and YaRN (modeling_rope_utils), LongCat's rotary embedding (cos/sin per position) and its interleaved-pair rotation
(apply_rotary_pos_emb_interleave), over a grid of RoPE dims, thetas and YaRN settings. CPU only, fp32."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers import LongcatFlashConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.longcat_flash.modeling_longcat_flash import (
    LongcatFlashRotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)

from longcat_service.config import ModelConfig, RopeScaling
from longcat_service.layers.rotary import RotaryEmbedding, apply_rope, rope_inv_freq
from tests.tiny_config import TINY_CONFIG

YARN_SETTINGS = [
    {"factor": 4.0, "original_max_position_embeddings": 64},
    {"factor": 40.0},  # original length falls back to max_position_embeddings
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 8.0, "original_max_position_embeddings": 512, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"factor": 8.0, "original_max_position_embeddings": 512, "mscale": 1.0},  # mscale alone: the plain factor
    {"factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 16.0, "beta_slow": 2.0},
    {"factor": 4.0, "original_max_position_embeddings": 2048, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 0.8},
    {"factor": 0.5, "original_max_position_embeddings": 64},  # factor <= 1: no attention correction
    {"factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 4.0, "beta_slow": 4.0,
     "truncate": False},  # a zero-width ramp
    {"factor": 4.0, "original_max_position_embeddings": 10**9},  # the ramp's end clamped to the last dim
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 2.0},
]


def hf_inv_freq(dim, theta, max_pos, scaling: dict | None):
    config = SimpleNamespace(rope_theta=theta, head_dim=dim, hidden_size=dim, num_attention_heads=1,
                             max_position_embeddings=max_pos, partial_rotary_factor=1.0,
                             rope_scaling=None if scaling is None else {"rope_type": "yarn", **scaling})
    return ROPE_INIT_FUNCTIONS["default" if scaling is None else "yarn"](config, torch.device("cpu"))


def ours_inv_freq(dim, theta, max_pos, scaling: dict | None):
    rs = None
    if scaling is not None:
        rs = RopeScaling(rope_type="yarn", **{k: v for k, v in scaling.items()})
    return rope_inv_freq(dim, theta, rs, max_pos)


@pytest.mark.parametrize("dim, theta", list(itertools.product([4, 6, 64], [1e4, 1e7])))
@pytest.mark.parametrize("scaling", [None] + YARN_SETTINGS)
def test_inv_freq_and_attention_factor_match_transformers(dim, theta, scaling):
    ref_freq, ref_factor = hf_inv_freq(dim, theta, 8192, scaling)
    freq, factor = ours_inv_freq(dim, theta, 8192, scaling)
    assert freq.dtype == torch.float32 and freq.shape == (dim // 2,) and freq.device.type == "cpu"
    torch.testing.assert_close(freq, ref_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("dim", [6, 8, 64])
def test_yarn_ramp_clamped_inside_the_rotated_dims_matches_transformers(dim):
    """A small theta puts the ramp's start inside the dim/2 rotated pairs and its end past the last dim (clamped)."""
    scaling = {"factor": 4.0, "original_max_position_embeddings": 700}
    ref_freq, ref_factor = hf_inv_freq(dim, 10.0, 8192, scaling)
    freq, factor = ours_inv_freq(dim, 10.0, 8192, scaling)
    torch.testing.assert_close(freq, ref_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("scaling", [None] + YARN_SETTINGS[:4] + YARN_SETTINGS[7:8] + YARN_SETTINGS[-2:])
@pytest.mark.parametrize("dim", [4, 8])
def test_cos_sin_match_transformers_rotary_embedding(scaling, dim):
    raw = {**TINY_CONFIG, "qk_rope_head_dim": dim, "head_dim": dim, "max_position_embeddings": 4096,
           "rope_scaling": None if scaling is None else {"rope_type": "yarn", **scaling}}
    hf = LongcatFlashRotaryEmbedding(LongcatFlashConfig(**raw))
    positions = torch.tensor([0, 1, 2, 7, 100, 4095])
    ref_cos, ref_sin = hf(torch.zeros(1, dtype=torch.float32), positions[None, :])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = RotaryEmbedding(ModelConfig.from_dict(raw)).compute_cos_sin(positions, dtype)
        assert cos.dtype == sin.dtype == dtype and cos.shape == (6, dim // 2)
        # transformers repeats the dim/2 frequencies: [freqs | freqs]
        torch.testing.assert_close(cos, ref_cos[0, :, : dim // 2].to(dtype), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin[0, :, : dim // 2].to(dtype), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ref_cos[0, :, dim // 2 :].to(dtype), cos, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_cos_sin_in_the_asked_dtype_on_every_call(dtype):
    rot = RotaryEmbedding(ModelConfig.from_dict(TINY_CONFIG))
    first = rot.cos_sin(torch.tensor([3, 5]), dtype)
    again = rot.cos_sin(torch.tensor([5, 3]), dtype)
    assert first[0].dtype == first[1].dtype == dtype
    assert torch.equal(first[0].flip(0), again[0]) and torch.equal(first[1].flip(0), again[1])


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dim", [4, 8])
def test_apply_rope_matches_transformers_interleaved_rotation(heads, dim):
    g = torch.Generator().manual_seed(dim * 10 + heads)
    n = 7
    raw = {**TINY_CONFIG, "qk_rope_head_dim": dim, "head_dim": dim}
    rot = RotaryEmbedding(ModelConfig.from_dict(raw))
    positions = torch.tensor([0, 1, 5, 9, 30, 31, 200])
    cos, sin = rot.compute_cos_sin(positions, torch.float32)
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # [1, n, dim]
    q = torch.randn(1, heads, n, dim, generator=g)
    ref, _ = apply_rotary_pos_emb_interleave(q, q.clone(), hf_cos, hf_sin)
    x = q[0].transpose(0, 1).contiguous()  # token-major [n, heads, dim]
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    out2 = apply_rope(x[:, 0], cos, sin)  # [n, dim]: no head axis
    torch.testing.assert_close(out2, ref[0, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scaling", [None, YARN_SETTINGS[0]])
def test_tables_are_built_on_the_cpu_whatever_the_default_device(scaling):
    """Models are built under a device context (meta, cuda); RoPE's inverse frequencies are real CPU numbers."""
    raw = {**TINY_CONFIG, "rope_scaling": None if scaling is None else {"rope_type": "yarn", **scaling}}
    want = RotaryEmbedding(ModelConfig.from_dict(raw)).inv_freq
    with torch.device("meta"):
        rot = RotaryEmbedding(ModelConfig.from_dict(raw))
    assert rot.inv_freq.device.type == "cpu" and torch.equal(rot.inv_freq, want)

"""Random ("dummy") weights that do not depend on the tensor-parallel size.

Each checkpoint key's FULL tensor is drawn from a generator seeded by (seed, key) and handed to the parameter's
own weight_loader, which keeps this rank's slice, exactly as a real checkpoint is loaded. So every rank of a TP
group holds slices of one model (replicated tensors such as the router are equal on all ranks, and TP=N logits
match TP=1), and a model can be written to safetensors and reloaded bit-identically (benchmarks/bench_tp.py).
"""

from __future__ import annotations

import zlib

import torch

from longcat_service.config import ModelConfig

DUMMY_STD = 0.02  # transformers' initializer_range: keeps activations finite through many layers
DUMMY_BIAS_STD = 0.01


def hf_shape(key: str, c: ModelConfig) -> tuple[int, ...]:
    """Full (unsharded) shape of a transformers LongCat-Flash checkpoint key."""
    h, nh = c.hidden_size, c.num_attention_heads
    name = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else key.rsplit(".", 1)[-1]
    rows = {
        "q_a_proj": (c.q_lora_rank, h), "q_a_layernorm": (c.q_lora_rank,),
        "q_b_proj": (nh * c.qk_head_dim, c.q_lora_rank),
        "kv_a_proj_with_mqa": (c.kv_lora_rank + c.qk_rope_head_dim, h), "kv_a_layernorm": (c.kv_lora_rank,),
        "kv_b_proj": (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), "o_proj": (h, nh * c.v_head_dim),
        "classifier": (c.num_router_experts, h), "e_score_correction_bias": (c.num_router_experts,),
        "embed_tokens": (c.vocab_size, h), "lm_head": (c.vocab_size, h), "norm": (h,),
        "eh_proj": (h, 2 * h), "m": (h,), "input_layernorm": (h,), "post_attention_layernorm": (h,),
    }  # fmt: skip
    if ".experts." in key:
        inter = c.expert_ffn_hidden_size
    elif ".mlps." in key or ".transformer_layer.mlp." in key:  # the MTP block's dense MLP too
        inter = c.ffn_hidden_size
    else:
        inter = None
    if inter is not None and name in ("gate_proj", "up_proj", "down_proj"):
        shape = (h, inter) if name == "down_proj" else (inter, h)
    elif "layernorm." in key and name.isdigit():  # input_layernorm.0.weight / post_attention_layernorm.1.weight
        shape = (h,)
    elif name in rows:
        shape = rows[name]
    else:
        raise KeyError(f"hf_shape: unknown checkpoint key {key}")
    if key.endswith(".bias") and name != "e_score_correction_bias":
        shape = shape[:1]
    return shape


def dummy_tensor(key: str, c: ModelConfig, seed: int, device, bias_std: float = DUMMY_BIAS_STD) -> torch.Tensor:
    """The full fp32 tensor of `key`: norms 1, biases N(0, bias_std), everything else N(0, DUMMY_STD)."""
    shape = hf_shape(key, c)
    if key.endswith(("norm.weight", "norm.m.weight")) or "layernorm" in key:
        return torch.ones(shape, device=device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62))
    is_bias = key.endswith(("e_score_correction_bias", ".bias"))
    std = bias_std if is_bias else DUMMY_STD
    if std == 0.0:
        return torch.zeros(shape, device=device)
    return torch.randn(shape, generator=gen, device=device) * std


@torch.no_grad()
def init_dummy(model, seed: int, bias_std: float = DUMMY_BIAS_STD) -> None:
    """Fill every checkpoint-backed parameter of `model` (this rank's slices) with its key's dummy tensor.
    Block-FP8 weights are quantized from their fp32 dummy tensor by their loader (which also writes the scale)."""
    for key, target in model.checkpoint_targets().items():
        if target.param is not None and not key.endswith(".weight_scale_inv"):
            target.param.weight_loader(target.param, dummy_tensor(key, model.config, seed, model.device, bias_std),
                                       *target.args)

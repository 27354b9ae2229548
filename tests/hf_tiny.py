"""Tiny random transformers-4.57 LongCat-Flash checkpoints (the numerical reference; imported by tests only).

Weights follow spec §7: random norm weights (1 + 0.2 N(0,1)), N(0, 0.08) matrices and a non-zero
e_score_correction_bias, so that wiring, norm and router mistakes show up in the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

from tests.tiny_config import TINY_CONFIG

# spec §7 reference config
BASE = TINY_CONFIG

TINY_CONFIGS: dict[str, dict] = {
    "base": BASE,
    # no identity experts and a single routed choice per token
    "nozero_top1": {**BASE, "zero_expert_num": 0, "moe_topk": 1, "n_routed_experts": 4, "rope_theta": 1e4},
    # sizes that are not powers of two, 3 layers, attention biases, an eos list, small rope theta
    "odd": {
        **BASE, "vocab_size": 97, "hidden_size": 72, "num_layers": 3, "num_attention_heads": 5,
        "q_lora_rank": 24, "kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 6, "head_dim": 6,
        "v_head_dim": 10, "ffn_hidden_size": 40, "expert_ffn_hidden_size": 12, "n_routed_experts": 7,
        "zero_expert_num": 2, "moe_topk": 4, "routed_scaling_factor": 2.5, "rope_theta": 1e4,
        "rms_norm_eps": 1e-6, "attention_bias": True, "eos_token_id": [2, 5],
    },
}  # fmt: skip


def build_hf_model(name: str, seed: int = 0, **overrides) -> LongcatFlashForCausalLM:
    cfg = LongcatFlashConfig(**{**TINY_CONFIGS[name], **overrides})
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight") else 0.08 * torch.randn_like(p))
        for layer in model.model.layers:
            bias = layer.mlp.router.e_score_correction_bias
            bias.copy_(0.05 * torch.randn_like(bias))
    model.config._attn_implementation = "eager"  # softmax in fp32 then cast, like our attention
    return model


def save_hf_model(model: LongcatFlashForCausalLM, out_dir: Path, max_shard_size: str | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32) -> LongcatFlashForCausalLM:
    return LongcatFlashForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()

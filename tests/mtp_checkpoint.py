"""Tiny LongCat-Flash checkpoints with an MTP layer, written without transformers (GPU machines may carry a
transformers that cannot save the per-expert layout): every key of our model's checkpoint targets, with
tests/hf_tiny.py's initialisation (norm weights 1 + 0.2 N(0,1), matrices 0.08 N(0,1), router correction bias
0.05 N(0,1)), plus model.mtp.*.

- "random": random MTP weights (drafts are nearly never accepted).
- "exact": a target whose attention o_proj, dense down_proj and expert down_proj are zero and which has no
  zero (identity) experts, so every layer adds nothing: its final hidden state is norm(embed(tok)), a function
  of the current token only. The MTP block with eh_proj = [I | 0], zero o_proj / down_proj and norm weights
  enorm = 1, mtp.norm = the target's final norm weight then returns norm(rmsnorm(embed(tok_{t+1}))): the
  target's hidden state at the next position (RMSNorm is scale-invariant, up to its eps), so its draft is the
  target's own next token (acceptance ~1).
- "partial": "exact" with an own model.mtp.embed_tokens whose odd-id rows carry added noise: the draft after an
  odd token comes from a related but different distribution, so acceptance varies from step to step and from
  sequence to sequence in one batch.
- "noisy": the same noise on every row: every draft distribution overlaps the target's without equalling it, so
  sampled requests see accepts and rejections at every position (statistical tests of the residual draw).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from longcat_service.config import ModelConfig
from longcat_service.model.dummy_weights import hf_shape
from longcat_service.model.longcat_flash import LongcatFlashForCausalLM
from tests.tiny_config import TINY_CONFIG

MTP_MODES = ("random", "exact", "partial", "noisy")
# tests/hf_tiny.py's "base" and "nozero_top1" (no identity experts, one routed choice per token)
BASE_CONFIGS = {
    "base": TINY_CONFIG,
    "nozero_top1": {**TINY_CONFIG, "zero_expert_num": 0, "moe_topk": 1, "n_routed_experts": 4, "rope_theta": 1e4},
}


def target_tensors(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every checkpoint key of the model without MTP -> a random fp32 tensor, initialised as tests/hf_tiny.py."""
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in model.checkpoint_targets():
        shape = hf_shape(key, config)
        if key.endswith("norm.weight"):
            out[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith("e_score_correction_bias"):
            out[key] = 0.05 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.08 * torch.randn(shape, generator=gen)
    return out


def mtp_keys(config: ModelConfig) -> list[str]:
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(config)
        model.enable_mtp()
    return [k for k in model.checkpoint_targets() if k.startswith("model.mtp.")]


def write_mtp_checkpoint(out_dir: Path, mode: str = "random", seed: int = 0, with_embed: bool = False,
                         lm_head_scale: float = 1.0) -> Path:
    """A tiny checkpoint directory (config.json + model.safetensors) holding model.mtp.* too. lm_head_scale:
    sharper next-token distributions (statistical tests)."""
    if mode not in MTP_MODES:
        raise ValueError(mode)
    raw = BASE_CONFIGS["base" if mode == "random" else "nozero_top1"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "longcat_flash",
                                                     "architectures": ["LongcatFlashForCausalLM"], **raw}))
    path = out_dir / "model.safetensors"
    config = ModelConfig.from_pretrained(out_dir / "config.json")
    tensors = target_tensors(config, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h = config.hidden_size
    for key in mtp_keys(config):
        shape = hf_shape(key, config)
        if key.endswith("norm.weight") or key.endswith("norm.m.weight"):
            tensors[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            tensors[key] = 0.08 * torch.randn(shape, generator=gen)
    if mode in ("exact", "partial", "noisy"):
        for key in list(tensors):
            if key.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[key] = torch.zeros_like(tensors[key])
        tensors["model.mtp.layers.0.eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        tensors["model.mtp.layers.0.enorm.m.weight"] = torch.ones(h)
        tensors["model.mtp.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * lm_head_scale
    if with_embed or mode in ("partial", "noisy"):
        tensors["model.mtp.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    if mode in ("partial", "noisy"):
        embed = tensors["model.mtp.embed_tokens.weight"]
        rows = slice(1, None, 2) if mode == "partial" else slice(None)
        embed[rows] += 0.08 * torch.randn(embed[rows].shape, generator=gen)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return out_dir

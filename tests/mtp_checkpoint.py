"""Tiny LongCat-Flash checkpoints with an MTP layer (model.mtp.* added to tests/hf_tiny.py's safetensors).

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

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longcat_service.config import ModelConfig
from longcat_service.model.dummy_weights import hf_shape
from longcat_service.model.longcat_flash import LongcatFlashForCausalLM
from tests.hf_tiny import build_hf_model, save_hf_model

MTP_MODES = ("random", "exact", "partial", "noisy")


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
    name = "base" if mode == "random" else "nozero_top1"
    hf = build_hf_model(name, seed=seed)
    save_hf_model(hf, out_dir)
    path = out_dir / "model.safetensors"
    tensors = load_file(str(path))
    config = ModelConfig.from_pretrained(out_dir / "config.json")
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

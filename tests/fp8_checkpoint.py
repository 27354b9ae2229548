"""Tiny block-FP8 LongCat-Flash checkpoints written by the tests, with their dequantized twin.

`write_pair(root, config)` writes three checkpoints from one set of random full tensors:
- "fp8": every weight the FP8 model quantizes as e4m3 + `weight_scale_inv` (block_quant), config with
  `quantization_config`;
- "dequant": the same weights dequantized to fp32 (block_dequant), no quantization_config: the reference model;
- "bf16": the original (unquantized) weights in bf16, for quantize-at-load.
Rows are scaled by random factors so that the 128 x 128 blocks get different scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from longcat_service.config import ModelConfig
from longcat_service.model.dummy_weights import dummy_tensor
from longcat_service.model.longcat_flash import LongcatFlashForCausalLM
from longcat_service.ops.fp8_reference import block_dequant, block_quant
from tests.tiny_config import TINY_CONFIG

FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

# TP=1: sizes that are and are not whole 128-blocks (hidden 160: partial K blocks everywhere; q_lora 128: the fused
# q_a + kv_a weight keeps the block layout; ffn 200 / experts 96: gate + up parts with partial blocks).
ODD = dict(TINY_CONFIG, hidden_size=160, q_lora_rank=128, kv_lora_rank=64, num_attention_heads=2,
           qk_nope_head_dim=32, qk_rope_head_dim=16, head_dim=16, v_head_dim=32, ffn_hidden_size=200,
           expert_ffn_hidden_size=96)
# TP=2: every sharded dimension is whole 128-blocks per rank (q_b 4*128, kv_b 4*128, o_proj in 4*64, ffn and
# experts 256); replicated ones are not (hidden 160, q_lora 96).
ALIGNED = dict(TINY_CONFIG, hidden_size=160, q_lora_rank=96, kv_lora_rank=64, num_attention_heads=4,
               qk_nope_head_dim=64, qk_rope_head_dim=64, head_dim=64, v_head_dim=64, ffn_hidden_size=256,
               expert_ffn_hidden_size=256)
# TP=8, the single-node FP8 recipe's size: 2 heads per rank, so q_b, kv_b and o_proj shards are whole 128-blocks
# (2 x 128 rows, 2 x 64 columns) as the real model's are at TP8 (8 heads per rank); ffn and experts 128 per rank.
ALIGNED_TP8 = dict(ALIGNED, num_attention_heads=16, ffn_hidden_size=1024, expert_ffn_hidden_size=1024)


def meta_model(raw: dict) -> LongcatFlashForCausalLM:
    with torch.device("meta"):
        return LongcatFlashForCausalLM(ModelConfig.from_dict(raw), torch.float32)


def full_tensors(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every checkpoint key of the unquantized model -> a random fp32 tensor (norms 1)."""
    config = ModelConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(seed + 7)
    out = {}
    for key in meta_model(raw).checkpoint_targets():
        t = dummy_tensor(key, config, seed, "cpu")
        if t.dim() == 2 and "norm" not in key:
            t = t * (0.25 + 4 * torch.rand(t.shape[0], 1, generator=gen))
        out[key] = t
    return out


def quantized_keys(raw: dict, quant: dict = FP8_QUANT) -> list[str]:
    """Weight keys that the FP8 model of `raw` with `quant` as quantization_config quantizes."""
    targets = meta_model({**raw, "quantization_config": quant}).checkpoint_targets()
    return [k.removesuffix("_scale_inv") for k in targets if k.endswith(".weight_scale_inv")]


def save(path: Path, raw: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "longcat_flash", **raw}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def write_pair(root: Path, raw: dict, seed: int = 0, quant: dict | None = None) -> dict[str, Path]:
    quant = quant or FP8_QUANT
    full = full_tensors(raw, seed)
    fp8, deq = dict(full), dict(full)
    for key in quantized_keys(raw, quant):
        w8, scale = block_quant(full[key])
        fp8[key], fp8[key + "_scale_inv"] = w8, scale
        deq[key] = block_dequant(w8, scale, dtype=torch.float32)
    return {
        "fp8": save(root / "fp8", {**raw, "quantization_config": quant}, fp8),
        "dequant": save(root / "dequant", raw, deq),
        "bf16": save(root / "bf16", raw, {k: v.to(torch.bfloat16) for k, v in full.items()}),
    }

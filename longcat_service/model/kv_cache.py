"""Allocation of the paged latent KV cache: one tensor per attention sublayer (sublayer j of layer i at 2i+j)."""

from __future__ import annotations

import torch

from longcat_service.config import ModelConfig


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    num_extra_layers: int = 0,
) -> list[torch.Tensor]:
    """2*num_layers (+ num_extra_layers: the MTP block's cache, last) zeroed tensors
    [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"allocate_kv_caches: num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
    shape = (num_blocks, block_size, config.kv_cache_entry_width)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_attention_sublayers + num_extra_layers)]


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all sublayers (for sizing the cache from a memory budget)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return config.num_attention_sublayers * block_size * config.kv_cache_entry_width * itemsize

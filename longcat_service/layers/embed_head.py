"""Vocab-parallel embedding and LM head: rank r holds vocab rows [r*V', (r+1)*V') with V' = ceil(V/tp),
zero-padded past the vocabulary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_service.distributed.parallel_state import all_gather, all_reduce, get_tp_rank, get_tp_size
from longcat_service.layers.weight_utils import check_shape, make_param, read_narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = make_param(self.rows_per_rank, hidden_size, dtype=dtype, loader=self._load_rows)

    @torch.no_grad()
    def _load_rows(self, param: torch.Tensor, loaded: Any) -> None:
        check_shape(loaded, (self.vocab_size, self.hidden_size))
        rows = max(self.vocab_end - self.vocab_start, 0)
        param.zero_()
        if rows:
            param[:rows].copy_(read_narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits in the model dtype (as transformers), gathered across ranks, then returned as fp32."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = all_gather(logits, dim=-1)[..., : self.vocab_size]
        return logits.float()

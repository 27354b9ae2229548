"""Tokens routed to each expert, summed over the MoE layers: the input of a static expert placement
(distributed/eplb.py). Opt-in (EngineArgs.collect_expert_load): each MoE layer then counts its routing on the
device; the host copy is refreshed at most once per REFRESH_S, since reading it waits for the device."""

from __future__ import annotations

import time

import torch

REFRESH_S = 1.0


class ExpertLoadCounter:
    def __init__(self, model: torch.nn.Module):
        from longcat_service.layers.moe import LongcatMoE

        self.layers = [m for m in model.modules() if isinstance(m, LongcatMoE)]
        for layer in self.layers:
            layer.enable_load_counting()
        self._snapshot: tuple[int, ...] | None = None
        self._taken_at = float("-inf")

    def snapshot(self) -> tuple[int, ...] | None:
        """Routed slots per real expert since start (identity slots left out); None before any MoE layer exists."""
        if not self.layers:
            return None
        now = time.monotonic()
        if now - self._taken_at >= REFRESH_S:
            total = torch.stack([layer.expert_load for layer in self.layers]).sum(0)
            self._snapshot = tuple(total[:-1].tolist())
            self._taken_at = now
        return self._snapshot

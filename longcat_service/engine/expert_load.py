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

    def save(self) -> list[torch.Tensor]:
        """The per-layer counts now (device copies, stream-ordered): restore() takes a step's counting back."""
        return [layer.expert_load.clone() for layer in self.layers]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for layer, counts in zip(self.layers, saved, strict=True):
            layer.expert_load.copy_(counts)

    def totals(self) -> tuple[int, ...] | None:
        """Routed slots per real expert now (waits for the device; snapshot() is the rate-limited form)."""
        if not self.layers:
            return None
        return tuple(torch.stack([layer.expert_load for layer in self.layers]).sum(0)[:-1].tolist())

    def snapshot(self) -> tuple[int, ...] | None:
        """Routed slots per real expert since start (identity slots left out); None before any MoE layer exists."""
        if not self.layers:
            return None
        now = time.monotonic()
        if now - self._taken_at >= REFRESH_S:
            self._snapshot = self.totals()
            self._taken_at = now
        return self._snapshot

"""Fake (meta) kernels of the torch.ops.longcat ops: output shapes depend only on T, k and E (dense_gemv: M, N), so
torch.compile can trace the ops and CUDA graphs can capture them."""

from __future__ import annotations

import torch


def register_fake_kernels() -> None:
    @torch.library.register_fake("longcat::router_topk")
    def _router_topk(logits, correction_bias, top_k, routed_scaling_factor, num_experts):
        num_tokens = logits.shape[0]
        return (
            logits.new_empty((num_tokens, top_k), dtype=torch.int32),
            logits.new_empty((num_tokens, top_k), dtype=torch.float32),
            logits.new_empty((num_tokens,), dtype=torch.float32),
        )

    @torch.library.register_fake("longcat::moe_align")
    def _moe_align(topk_ids, num_experts):
        num_slots = topk_ids.numel()
        new = topk_ids.new_empty
        return (
            new((num_experts + 1,), dtype=torch.int32),
            new((num_slots,), dtype=torch.int32),
            new((num_slots,), dtype=torch.int32),
            new((num_experts,), dtype=torch.int32),
            new((1,), dtype=torch.int32),
        )

    @torch.library.register_fake("longcat::expert_ffn")
    def _expert_ffn(hidden, w13, w2, expert_offsets, sorted_slots, top_k, active_experts=None, num_active=None):
        return hidden.new_empty((sorted_slots.shape[0], hidden.shape[-1]))

    @torch.library.register_fake("longcat::combine")
    def _combine(expert_out, slot_rows, topk_weights, hidden, zero_weight, add_identity):
        return hidden.new_empty((topk_weights.shape[0], hidden.shape[-1]), dtype=torch.float32)

    @torch.library.register_fake("longcat::dense_gemv")
    def _dense_gemv(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))

    if not hasattr(torch.ops.longcat, "dense_gemv_fp8"):  # an extension built before the FP8 ops
        return

    @torch.library.register_fake("longcat::dense_gemv_fp8")
    def _dense_gemv_fp8(x, w8, scale):
        return x.new_empty((x.shape[0], w8.shape[0]))

    @torch.library.register_fake("longcat::expert_ffn_fp8")
    def _expert_ffn_fp8(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k,
                        active_experts=None, num_active=None):
        return hidden.new_empty((sorted_slots.shape[0], hidden.shape[-1]))

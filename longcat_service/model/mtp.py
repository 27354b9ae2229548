"""LongCat-Flash's multi-token-prediction (MTP) block (spec §5.3), the draft model of speculative decoding.

At position t it reads the next token tok_{t+1} and the target's final-normed hidden state h_t, runs one
standard pre-norm layer (one MLA attention over its own paged latent cache, one dense SwiGLU MLP) at rotary
position t, and returns h' = norm(Layer(eh_proj(cat[enorm(embed(tok_{t+1})), hnorm(h_t)]))); the target's
lm_head turns h' into the logits of tok_{t+2}. Running it again on (its own draft token, h') drafts further.

Its cache is one extra cache tensor in the same block pool as the target's (same block tables). The entry of
MTP position t is stored at the slot of position t + 1: it is a function of tokens 0..t+1 only, so it belongs to
the block holding token t+1 and a prefix-cache hit on that block reuses a valid entry. The MTP attention of
position t therefore reads the slots of positions 1..t+1 (position 0's slot never holds an MTP entry).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from longcat_service.config import ModelConfig, quantizes
from longcat_service.layers.embed_head import VocabParallelEmbedding
from longcat_service.layers.fp8_linear import linear_class
from longcat_service.layers.layernorm import RMSNorm
from longcat_service.layers.linear import ReplicatedLinear
from longcat_service.layers.mla_attention import MLAAttention
from longcat_service.layers.mlp import DenseMLP
from longcat_service.layers.paged_attention import AttentionPlan

MTP_LAYER = "model.mtp.layers.0"
MTP_EMBED_KEY = "model.mtp.embed_tokens.weight"


class LongcatMTPLayer(nn.Module):
    """One pre-norm decoder layer: MLA attention then a dense MLP (no shortcut MoE)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, prefix: str = MTP_LAYER):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype)
        self.self_attn = MLAAttention(config, dtype, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype)
        self.mlp = DenseMLP(hidden, config.ffn_hidden_size, dtype, config.quantization,
                            f"{prefix}.transformer_layer.mlp")

    def forward(self, residual, cos, sin, plan: AttentionPlan, kv_cache: torch.Tensor):
        """residual [N, H] (updated in place: the caller hands it over) -> (residual, the MLP output still to be
        added to it: the final norm's fused add does that)."""
        x = self.self_attn(self.input_layernorm(residual), cos, sin, plan, kv_cache)
        return residual, self.mlp(self.post_attention_layernorm.add_norm(residual, x))


class LongcatMTP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps, dtype)
        self.hnorm = RMSNorm(hidden, eps, dtype)
        eh_cls = linear_class(ReplicatedLinear, quantizes(config, f"{MTP_LAYER}.eh_proj"))
        self.eh_proj = eh_cls(2 * hidden, hidden, dtype)
        self.layer = LongcatMTPLayer(config, dtype)
        self.norm = RMSNorm(hidden, eps, dtype)
        # a checkpoint's own model.mtp.embed_tokens, kept only when it differs from the target's (loader)
        self.embed_tokens: VocabParallelEmbedding | None = None

    def forward(self, embed: VocabParallelEmbedding, next_ids: torch.Tensor, hidden: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan, kv_cache: torch.Tensor) -> torch.Tensor:
        """next_ids [N] (tok_{t+1}), hidden [N, H] (h_t) -> h' [N, H]. `embed`: the target's embedding, used when
        the checkpoint has no MTP embedding of its own."""
        table = self.embed_tokens if self.embed_tokens is not None else embed
        e = self.enorm(table(next_ids))
        x = self.eh_proj(torch.cat((e, self.hnorm(hidden.to(e.dtype))), dim=-1))
        residual, mlp_out = self.layer(x, cos, sin, plan, kv_cache)  # x: eh_proj's new tensor
        return self.norm.add_norm(residual, mlp_out)

    def checkpoint_targets(self) -> dict[str, nn.Parameter]:
        """model.mtp.* checkpoint key -> parameter (with its loader args), the embedding excluded."""
        p = f"{MTP_LAYER}."
        layer = self.layer
        t: dict[str, tuple] = {
            p + "eh_proj.weight": (self.eh_proj.weight, ()),
            p + "enorm.m.weight": (self.enorm.weight, ()),
            p + "hnorm.m.weight": (self.hnorm.weight, ()),
            p + "input_layernorm.weight": (layer.input_layernorm.weight, ()),
            p + "post_attention_layernorm.weight": (layer.post_attention_layernorm.weight, ()),
            "model.mtp.norm.weight": (self.norm.weight, ()),
        }
        attn = layer.self_attn
        for name in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
                     "o_proj"):
            module = getattr(attn, name)
            t[f"{p}self_attn.{name}.weight"] = (module.weight, ())
            if getattr(module, "bias", None) is not None:
                t[f"{p}self_attn.{name}.bias"] = (module.bias, ())
        mlp = layer.mlp
        q = f"{p}transformer_layer.mlp."
        t[q + "gate_proj.weight"] = (mlp.gate_up_proj.weight, (0,))
        t[q + "up_proj.weight"] = (mlp.gate_up_proj.weight, (1,))
        t[q + "down_proj.weight"] = (mlp.down_proj.weight, ())
        return t

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        self.layer.self_attn.process_weights_after_loading()


def mtp_context_slots(block_table: list[int], num_positions: int, block_size: int) -> list[int]:
    """Slots of the MTP entries of MTP positions 0..num_positions-1 (stored at positions 1..num_positions)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(1, num_positions + 1)]


def build_mtp_plan(block_tables: list[list[int]], starts: list[int], ends: list[int], block_size: int,
                   device: torch.device) -> AttentionPlan:
    """The attention plan of an MTP forward over MTP positions [starts[i], ends[i]) of each sequence: each query
    writes the slot of its position + 1 and attends over the slots of positions 1..its position + 1."""
    from longcat_service.layers.host_to_device import to_device
    from longcat_service.layers.paged_attention import PrefillSegment

    slot_mapping: list[int] = []
    decode_rows, decode_ctx, prefills = [], [], []
    row = 0
    for table, s, e in zip(block_tables, starts, ends, strict=True):
        ctx = mtp_context_slots(table, e, block_size)
        slot_mapping.extend(ctx[s:e])
        if e - s == 1:
            decode_rows.append(row)
            decode_ctx.append(ctx)
        else:
            prefills.append((row, row + e - s, ctx))
        row += e - s
    mapping = to_device(slot_mapping, torch.long, device)  # pinned, non-blocking (host_to_device.py)
    decode_tokens = decode_slots = decode_valid = None
    if decode_rows:
        width = max(len(c) for c in decode_ctx)
        decode_slots = to_device([c + [0] * (width - len(c)) for c in decode_ctx], torch.long, device)
        lens = to_device([len(c) for c in decode_ctx], torch.long, device)
        decode_valid = torch.arange(width, device=device)[None, :] < lens[:, None]
        if len(decode_rows) != len(block_tables):
            decode_tokens = to_device(decode_rows, torch.long, device)
    segments = [PrefillSegment(a, b, to_device(ctx, torch.long, device)) for a, b, ctx in prefills]
    return AttentionPlan(row, decode_tokens, decode_slots, decode_valid, segments, mapping)

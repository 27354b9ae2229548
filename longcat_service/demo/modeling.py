"""LongCat-Flash in plain PyTorch for training (full sequences, no KV cache), plus its MTP layer.

The math is transformers 4.57's (spec §2-§4): ScMoE layer wiring, MLA with the q/kv LoRA scales and interleaved
RoPE, a softmax router over routed + zero (identity) experts whose correction bias only steers the top-k choice,
routed_scaling_factor on every selected weight. The MTP layer follows spec §5.3:
`h' = norm(Layer(eh_proj(cat[enorm(embed(tok_{t+1})), hnorm(h_t)])))` then the shared lm_head, where h_t is the
main model's final-normed hidden state (what the serving model's forward returns).

Experts are stored stacked ([E, ...]) for speed and computed densely (every expert on every token, weighted by a
gate that is zero where the expert was not selected): identical outputs, and at this size cheaper than gathering.
`hf_state_dict()` writes the HF per-expert key layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions[:, None].float() * inv
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs in, de-interleaved halves out (HF's layout; q and k alike, so dot products agree)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


class MLA(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        self.nh, self.dn, self.dr, self.dv = nh, cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        self.r_kv = cfg["kv_lora_rank"]
        self.q_a_proj = _linear(h, cfg["q_lora_rank"])
        self.q_a_layernorm = RMSNorm(cfg["q_lora_rank"], 1e-6)
        self.q_b_proj = _linear(cfg["q_lora_rank"], nh * (self.dn + self.dr))
        self.kv_a_proj_with_mqa = _linear(h, self.r_kv + self.dr)
        self.kv_a_layernorm = RMSNorm(self.r_kv, 1e-6)
        self.kv_b_proj = _linear(self.r_kv, nh * (self.dn + self.dv))
        self.o_proj = _linear(nh * self.dv, h)
        self.q_scale = math.sqrt(h / cfg["q_lora_rank"])  # HF applies both scales unconditionally (spec §8.4)
        self.kv_scale = math.sqrt(h / self.r_kv)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, s, self.nh, -1).transpose(1, 2) * self.q_scale
        q_nope, q_rope = q.split([self.dn, self.dr], -1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.r_kv, self.dr], -1)
        c = self.kv_a_layernorm(c) * self.kv_scale
        k_nope, v = self.kv_b_proj(c).view(b, s, self.nh, -1).transpose(1, 2).split([self.dn, self.dv], -1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(b, 1, s, self.dr), cos, sin).expand(b, self.nh, s, self.dr)
        q = torch.cat([q_nope, q_rope], -1)
        k = torch.cat([k_nope, k_rope], -1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=(self.dn + self.dr) ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.nh * self.dv))


class MLP(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(h, inter), _linear(h, inter), _linear(inter, h)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Router (fp32 classifier + e_score_correction_bias) over n_routed SwiGLU experts and zero_expert_num identities."""

    def __init__(self, cfg: dict):
        super().__init__()
        h, inter, e = cfg["hidden_size"], cfg["expert_ffn_hidden_size"], cfg["n_routed_experts"]
        self.n_routed, self.k, self.rsf = e, cfg["moe_topk"], cfg["routed_scaling_factor"]
        self.n_all = e + cfg["zero_expert_num"]
        self.classifier = nn.Parameter(torch.empty(self.n_all, h))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_all))
        self.w_gate = nn.Parameter(torch.empty(e, inter, h))
        self.w_up = nn.Parameter(torch.empty(e, inter, h))
        self.w_down = nn.Parameter(torch.empty(e, h, inter))
        self.last_load: torch.Tensor | None = None  # share of top-k slots per expert in the last training forward

    def forward(self, x):
        shape = x.shape
        t = x.reshape(-1, shape[-1])
        with torch.autocast(t.device.type, enabled=False):  # the router is fp32, also under bf16 autocast
            probs = (t.float() @ self.classifier.float().t()).softmax(-1)
        idx = (probs + self.e_score_correction_bias).topk(self.k, -1).indices  # the bias only picks experts
        gates = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx) * self.rsf)  # [T, n_all]
        if self.training:
            self.last_load = torch.zeros(self.n_all, device=t.device).index_add_(
                0, idx.reshape(-1), torch.ones(idx.numel(), device=t.device)
            ) / idx.numel()
        hidden = F.silu(torch.einsum("th,eih->tei", t, self.w_gate)) * torch.einsum("th,eih->tei", t, self.w_up)
        routed = torch.einsum("tei,ehi->teh", hidden, self.w_down)
        out = torch.einsum("te,teh->th", gates[:, : self.n_routed].to(routed.dtype), routed).float()
        out = out + gates[:, self.n_routed :].sum(-1, keepdim=True) * t.float()  # zero experts: identity on the input
        return out.to(x.dtype).view(shape)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Loss-free balancing: raise the bias of under-used experts, lower it for over-used ones."""
        if self.last_load is not None:
            self.e_score_correction_bias += rate * torch.sign(1.0 / self.n_all - self.last_load)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, dropout: float = 0.0):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = nn.ModuleList([RMSNorm(h, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(h, eps) for _ in range(2)])
        self.self_attn = nn.ModuleList([MLA(cfg) for _ in range(2)])
        self.mlps = nn.ModuleList([MLP(h, cfg["ffn_hidden_size"]) for _ in range(2)])
        self.mlp = MoE(cfg)
        self.drop = nn.Dropout(dropout)

    def forward(self, h, cos, sin):
        d = self.drop  # training-only regularisation of each residual branch (identity in eval and at inference)
        h = h + d(self.self_attn[0](self.input_layernorm[0](h), cos, sin))
        n0 = self.post_attention_layernorm[0](h)
        moe_out = d(self.mlp(n0))  # shortcut MoE: joins the residual at the end
        h = h + d(self.mlps[0](n0))
        h = h + d(self.self_attn[1](self.input_layernorm[1](h), cos, sin))
        return h + d(self.mlps[1](self.post_attention_layernorm[1](h))) + moe_out


class MTPLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.enorm, self.hnorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.eh_proj = _linear(2 * h, h)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.self_attn = MLA(cfg)
        self.mlp = MLP(h, cfg["ffn_hidden_size"])
        self.norm = RMSNorm(h, eps)

    def forward(self, next_embeds, hidden, cos, sin):
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], -1))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return self.norm(x)


class TrainableLongcatFlash(nn.Module):
    def __init__(self, cfg: dict, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        h = cfg["hidden_size"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], h)
        self.layers = nn.ModuleList([DecoderLayer(cfg, dropout) for _ in range(cfg["num_layers"])])
        self.norm = RMSNorm(h, cfg["rms_norm_eps"])
        self.lm_head = _linear(h, cfg["vocab_size"])
        self.mtp = MTPLayer(cfg)

    def init_weights(self, generator: torch.Generator) -> None:
        std = self.cfg["initializer_range"]
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() < 2:
                    continue  # norm weights stay 1
                p.normal_(0.0, std, generator=generator)
                if name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                    p.mul_(1.0 / math.sqrt(4 * self.cfg["num_layers"]))  # residual-branch outputs start small

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, S] -> (final-normed hidden [B, S, H], MTP hidden [B, S-1, H] for positions 0..S-2)."""
        s = ids.shape[1]
        cos, sin = rope_cos_sin(torch.arange(s, device=ids.device), self.cfg["qk_rope_head_dim"], self.cfg["rope_theta"])
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        hidden = self.norm(h)
        # MTP at position t sees tok_{t+1} and h_t, and predicts tok_{t+2}; its attention runs over its own sequence
        mtp_hidden = self.mtp(self.embed_tokens(ids[:, 1:]), hidden[:, :-1], cos[: s - 1], sin[: s - 1])
        return hidden, mtp_hidden

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers]

    def hf_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The transformers 4.57 key layout (per-expert keys) plus model.mtp.* (spec §5.3)."""
        out: dict[str, torch.Tensor] = {}

        def put(key: str, t: torch.Tensor) -> None:
            out[key] = t.detach().to("cpu", dtype).contiguous()

        def put_attn(prefix: str, attn: MLA) -> None:
            for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_layernorm", "kv_a_layernorm"):
                put(f"{prefix}{name}.weight", getattr(attn, name).weight)

        def put_mlp(prefix: str, mlp: MLP) -> None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                put(f"{prefix}{name}.weight", getattr(mlp, name).weight)

        put("model.embed_tokens.weight", self.embed_tokens.weight)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for j in range(2):
                put(f"{p}input_layernorm.{j}.weight", layer.input_layernorm[j].weight)
                put(f"{p}post_attention_layernorm.{j}.weight", layer.post_attention_layernorm[j].weight)
                put_attn(f"{p}self_attn.{j}.", layer.self_attn[j])
                put_mlp(f"{p}mlps.{j}.", layer.mlps[j])
            moe = layer.mlp
            put(f"{p}mlp.router.classifier.weight", moe.classifier)
            put(f"{p}mlp.router.e_score_correction_bias", moe.e_score_correction_bias)
            for e in range(moe.n_routed):
                put(f"{p}mlp.experts.{e}.gate_proj.weight", moe.w_gate[e])
                put(f"{p}mlp.experts.{e}.up_proj.weight", moe.w_up[e])
                put(f"{p}mlp.experts.{e}.down_proj.weight", moe.w_down[e])
        put("model.norm.weight", self.norm.weight)
        put("lm_head.weight", self.lm_head.weight)
        m, q = self.mtp, "model.mtp.layers.0."
        put("model.mtp.embed_tokens.weight", self.embed_tokens.weight)  # trained shared; a copy, as vLLM expects one
        put(f"{q}eh_proj.weight", m.eh_proj.weight)
        put(f"{q}enorm.m.weight", m.enorm.weight)
        put(f"{q}hnorm.m.weight", m.hnorm.weight)
        put(f"{q}input_layernorm.weight", m.input_layernorm.weight)
        put(f"{q}post_attention_layernorm.weight", m.post_attention_layernorm.weight)
        put_attn(f"{q}self_attn.", m.self_attn)
        put_mlp(f"{q}transformer_layer.mlp.", m.mlp)
        put("model.mtp.norm.weight", m.norm.weight)
        return out

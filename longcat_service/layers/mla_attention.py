"""LongCat-Flash MLA attention (projections, LoRA scales, RoPE) over the paged latent KV cache.

Heads are split across tensor-parallel ranks: q_b_proj and kv_b_proj are column-parallel on heads, o_proj
is row-parallel; q_a_proj / kv_a_proj_with_mqa and the latent cache are replicated.

Three forward paths: the decode-only CUDA batch (layers/fast_decode.py); batches with prefill segments whose
prefill attention is the Triton kernel (the default on CUDA, see paged_attention.prefill_attention_backend),
`_forward_triton_prefill`; and the eager layers below, the CPU reference (also with LONGCAT_DISABLE_TRITON=1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from longcat_service.config import ModelConfig, quantizes
from longcat_service.distributed.parallel_state import get_tp_size
from longcat_service.layers.fp8_linear import Fp8Linear, linear_class
from longcat_service.layers.layernorm import RMSNorm
from longcat_service.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, linear
from longcat_service.layers.paged_attention import (
    AttentionPlan,
    decode_attention,
    prefill_attention,
    prefill_attention_backend,
    prefill_attention_triton,
    write_kv_cache,
)
from longcat_service.layers.rotary import apply_rope
from longcat_service.layers.weight_utils import divide
from longcat_service.ops.fp8 import BLOCK, dequant, fp8_linear

# transformers builds q_a_layernorm / kv_a_layernorm without eps, i.e. the class default (spec §2.1).
LORA_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    """prefix: the checkpoint prefix (model.layers.<i>.self_attn.<j>), which decides which projections are
    block-FP8 under config.quantization. An FP8 kv_b_proj is dequantized once loaded (process_weights_after_loading):
    the absorbed latent path reads it per token, in the model dtype."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, prefix: str = "self_attn"):
        super().__init__()
        c = config

        def lin(cls, name: str):
            return linear_class(cls, quantizes(c, f"{prefix}.{name}"))

        self.num_heads = divide(c.num_attention_heads, get_tp_size(), "num_attention_heads")
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.qk_head_dim = c.qk_head_dim
        self.scale = c.softmax_scale
        self.q_scale, self.kv_scale = c.mla_q_scale, c.mla_kv_scale
        bias = c.attention_bias
        self.dtype = dtype
        self.q_a_proj = lin(ReplicatedLinear, "q_a_proj")(c.hidden_size, c.q_lora_rank, dtype, bias=bias)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, LORA_NORM_EPS, dtype)
        self.q_b_proj = lin(ColumnParallelLinear, "q_b_proj")(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim,
                                                              dtype)
        self.kv_a_proj_with_mqa = lin(ReplicatedLinear, "kv_a_proj_with_mqa")(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, dtype, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LORA_NORM_EPS, dtype)
        self.kv_b_proj = lin(ColumnParallelLinear, "kv_b_proj")(
            c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), dtype)
        self.o_proj = lin(RowParallelLinear, "o_proj")(c.num_attention_heads * c.v_head_dim, c.hidden_size, dtype,
                                                       bias=bias)
        self.fused_a_weight: torch.Tensor | None = None  # [q_a | kv_a] rows, see fuse_a_projections
        self.fused_a_scale: torch.Tensor | None = None  # its block scales when both are FP8

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """An FP8 kv_b_proj becomes a model-dtype ColumnParallelLinear holding its dequantized weight."""
        fp8 = self.kv_b_proj
        if not isinstance(fp8, Fp8Linear):
            return
        with torch.device(fp8.weight.device):
            dense = ColumnParallelLinear(fp8.input_size, fp8.output_size, self.dtype)
        dense.weight.copy_(dequant(fp8.weight, fp8.weight_scale_inv, self.dtype))
        self.kv_b_proj = dense

    @torch.no_grad()
    def fuse_a_projections(self) -> None:
        """q_a_proj and kv_a_proj_with_mqa read the same input: store their weights as one [q_a; kv_a] matrix so
        a decode step does one GEMV instead of two (the parameters become views into it, so loading weights
        into them later still works). Not with biases (LongCat-Flash has none)."""
        if self.fused_a_weight is not None or self.q_a_proj.bias is not None:
            return
        q_a, kv_a = self.q_a_proj, self.kv_a_proj_with_mqa
        fp8 = isinstance(q_a, Fp8Linear)
        if fp8 != isinstance(kv_a, Fp8Linear) or (fp8 and q_a.output_size % BLOCK):
            return  # mixed formats, or block rows that would straddle the two (not the kernels' layout)
        fused = torch.cat([q_a.weight, kv_a.weight], dim=0)
        if fp8 and fused.shape[0] % BLOCK:  # zero rows up to whole blocks: the shape torch's blockwise scaled-mm
            pad = torch.zeros(BLOCK - fused.shape[0] % BLOCK, fused.shape[1], dtype=torch.uint8, device=fused.device)
            fused = torch.cat([fused.view(torch.uint8), pad]).view(fused.dtype)  # takes (LongCat: 2112 -> 2176)
        rows = q_a.weight.shape[0]
        q_a.weight.data = fused[:rows]
        kv_a.weight.data = fused[rows : rows + kv_a.weight.shape[0]]
        self.fused_a_weight = fused
        if fp8:
            scale = torch.cat([q_a.weight_scale_inv, kv_a.weight_scale_inv], dim=0)
            block_rows = q_a.weight_scale_inv.shape[0]
            q_a.weight_scale_inv.data = scale[:block_rows]
            kv_a.weight_scale_inv.data = scale[block_rows:]
            self.fused_a_scale = scale

    def a_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_a_proj(x), kv_a_proj_with_mqa(x)), as one GEMM when fused (row-strided views, unit last stride)."""
        if self.fused_a_weight is None:
            return self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
        if self.fused_a_scale is not None:
            out = fp8_linear(x, self.fused_a_weight, self.fused_a_scale, None, self.q_a_proj.w8a8_reference)
        else:
            out = linear(x, self.fused_a_weight)
        q_rows, kv_rows = self.q_a_proj.output_size, self.kv_a_proj_with_mqa.output_size
        return out[..., :q_rows], out[..., q_rows : q_rows + kv_rows]  # (without the FP8 padding rows)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [N, H] -> [N, H]; writes the N new tokens' cache entries first, then attends."""
        if getattr(plan, "fast_decode", False):  # decode-only CUDA batch: Triton path (longcat_service/kernels)
            from longcat_service.layers.fast_decode import mla_decode_forward

            return mla_decode_forward(self, x, cos, sin, plan, kv_cache)
        if plan.prefills and prefill_attention_backend(x) == "triton":
            return self._forward_triton_prefill(x, cos, sin, plan, kv_cache)
        n = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(n, self.num_heads, self.qk_head_dim)
        q = q * self.q_scale  # the q LoRA scale covers both the nope and the rope part, in the model dtype
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent) * self.kv_scale  # scales k_nope and v, not the rope key
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)
        write_kv_cache(kv_cache, plan.slot_mapping, latent, k_rope)

        out = x.new_empty(n, self.num_heads, self.v_head_dim)
        dims = (self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.scale)
        w_kv_b = self.kv_b_proj.weight
        if plan.decode_slots is not None:
            rows = plan.decode_tokens
            qn, qr = (q_nope, q_rope) if rows is None else (q_nope[rows], q_rope[rows])
            dec = decode_attention(qn, qr, kv_cache, plan.decode_slots, plan.decode_valid, w_kv_b, *dims)
            if rows is None:
                out = dec
            else:
                out[rows] = dec
        q_full = torch.cat((q_nope, q_rope), dim=-1) if plan.prefills else None
        for seg in plan.prefills:
            out[seg.token_start : seg.token_end] = prefill_attention(
                q_full[seg.token_start : seg.token_end], kv_cache, seg, w_kv_b, *dims
            )
        return self.o_proj(out.reshape(n, self.num_heads * self.v_head_dim))

    def _forward_triton_prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """forward() for a batch with prefill segments on the Triton prefill kernel (decode rows of a mixed batch
        keep the eager absorbed decode). mla_prep does q * q_scale, both RoPEs, the kv norm * kv_scale and the
        cache write in one kernel, rounding where the eager code rounds (the q scale in the model dtype before
        RoPE, as transformers), and returns q as one contiguous [N, h, dn+dr] tensor: the kernel reads its nope
        and rope parts in place, so neither q nor K is ever concatenated."""
        from longcat_service.kernels.mla_prep import mla_prep

        n = x.shape[0]
        dn, dr = self.qk_nope_head_dim, self.qk_rope_head_dim
        q_a, kv_a = self.a_projections(x)
        q = self.q_b_proj(self.q_a_layernorm(q_a)).view(n, self.num_heads, self.qk_head_dim)
        q = mla_prep(q, kv_a, cos, sin, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, self.q_scale,
                     self.kv_scale, plan.slot_mapping, kv_cache, dr)

        out = x.new_empty(n, self.num_heads, self.v_head_dim)
        dims = (self.num_heads, dn, self.v_head_dim, self.scale)
        w_kv_b = self.kv_b_proj.weight
        if plan.decode_slots is not None:  # a mixed batch (plan.decode_tokens is set: some rows prefill)
            qd = q[plan.decode_tokens]
            out[plan.decode_tokens] = decode_attention(qd[..., :dn], qd[..., dn:], kv_cache, plan.decode_slots,
                                                       plan.decode_valid, w_kv_b, *dims)
        for seg in plan.prefills:  # the kernel writes each segment's rows of `out` in place
            rows = slice(seg.token_start, seg.token_end)
            prefill_attention_triton(q[rows], kv_cache, seg, w_kv_b, *dims, out=out[rows])
        return self.o_proj(out.reshape(n, self.num_heads * self.v_head_dim))

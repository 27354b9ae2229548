"""LongcatFlashForCausalLM over a paged latent KV cache (the layer wiring of transformers 4.57, spec §2).

Parameter names mirror the HF checkpoint where the layout is the same; `checkpoint_targets()` maps every
expected checkpoint key to the parameter (and loader arguments) that receives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from longcat_service.config import ModelConfig
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from longcat_service.layers.fast_decode import build_decode_plan, use_fast_decode
from longcat_service.layers.layernorm import RMSNorm
from longcat_service.layers.mla_attention import MLAAttention
from longcat_service.layers.mlp import DenseMLP
from longcat_service.layers.moe import LongcatMoE
from longcat_service.layers.paged_attention import AttentionPlan, build_attention_plan
from longcat_service.layers.rotary import RotaryEmbedding
from longcat_service.layers.side_stream import ShortcutMoEStream
from longcat_service.model.mtp import LongcatMTP


class LongcatDecoderLayer(nn.Module):
    """Two attention + two dense-MLP sublayers; the MoE reads post_attention_layernorm[0]'s output (the
    same input as MLP 0) and its output joins the residual only at the very end (shortcut MoE)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, prefix: str = "model.layers.0"):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = nn.ModuleList([RMSNorm(hidden, eps, dtype) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(hidden, eps, dtype) for _ in range(2)])
        self.self_attn = nn.ModuleList([MLAAttention(config, dtype, f"{prefix}.self_attn.{j}") for j in range(2)])
        self.mlps = nn.ModuleList([DenseMLP(hidden, config.ffn_hidden_size, dtype, config.quantization,
                                            f"{prefix}.mlps.{j}") for j in range(2)])
        self.mlp = LongcatMoE(config, dtype, f"{prefix}.mlp")

    def forward(self, residual: torch.Tensor, pending: tuple[torch.Tensor, ...], cos, sin, plan: AttentionPlan,
                kv_caches: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """residual [N, H]: the residual stream, updated in place (the caller hands it over). pending: what is
        still to be added to it before this layer's first norm (the previous layer's last dense-MLP and MoE
        outputs; () for the first layer). Every residual add runs inside the next norm's fused kernel
        (RMSNorm.add_norm), in the eager order: h + mlps[1](..) + moe_out. Returns (residual, this layer's pending
        addends), for the next layer or the final norm."""
        x = self.self_attn[0](self.input_layernorm[0].add_norm(residual, *pending), cos, sin, plan, kv_caches[0])
        if self.mlp.router.reads_fp32(residual):  # the norm writes the fp32 router's input beside n0: no cast kernel
            n0, n0_f32 = self.post_attention_layernorm[0].add_norm_fp32(residual, x)
        else:
            n0, n0_f32 = self.post_attention_layernorm[0].add_norm(residual, x), None
        with ShortcutMoEStream(n0, n0_f32) as branch:  # maybe on a side stream while the dense path runs
            moe_out = branch.output(self.mlp(n0, x_f32=n0_f32, fp32_out=True))  # the fused add casts it
        x = self.mlps[0](n0)
        x = self.self_attn[1](self.input_layernorm[1].add_norm(residual, x), cos, sin, plan, kv_caches[1])
        x = self.mlps[1](self.post_attention_layernorm[1].add_norm(residual, x))
        branch.join()
        return residual, (x, moe_out)


class LongcatFlashModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList([LongcatDecoderLayer(config, dtype, f"model.layers.{i}")
                                     for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: param.weight_loader(param, loaded, *args). param None = read nothing."""

    param: nn.Parameter | None
    args: tuple = ()


class LongcatFlashForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = LongcatFlashModel(config, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        self.mtp_weight_names: list[str] = []  # filled by the loader: model.mtp.* keys set aside (MTP not built)
        self.mtp: LongcatMTP | None = None  # the MTP draft block, built by enable_mtp (speculative decoding)

    def enable_mtp(self) -> None:
        """Build the MTP block (its weights then come from the checkpoint's model.mtp.* keys)."""
        if self.mtp is None:
            self.mtp = LongcatMTP(self.config, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Flat batch of new tokens [N] -> final-normed hidden states [N, H] (model dtype)."""
        if len(kv_caches) != self.config.num_attention_sublayers:
            raise ValueError(f"kv_caches: expected {self.config.num_attention_sublayers} tensors, got {len(kv_caches)}")
        if input_ids.shape != positions.shape or input_ids.dim() != 1:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must be equal 1-D")
        if use_fast_decode(attn_metadata, input_ids):  # device-only metadata: CUDA-graph capturable
            plan = build_decode_plan(attn_metadata)
        else:
            plan = build_attention_plan(attn_metadata)
        if plan.num_tokens != input_ids.shape[0]:
            raise ValueError(f"attention metadata covers {plan.num_tokens} tokens, input_ids has {input_ids.shape[0]}")
        residual = self.model.embed_tokens(input_ids)  # a new tensor: the layers add into it in place
        cos, sin = self.rotary.cos_sin(positions, self.dtype)  # shared by all attention sublayers
        pending: tuple[torch.Tensor, ...] = ()
        for i, layer in enumerate(self.model.layers):
            residual, pending = layer(residual, pending, cos, sin, plan, (kv_caches[2 * i], kv_caches[2 * i + 1]))
        return self.model.norm.add_norm(residual, *pending)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H] -> fp32 [M, vocab] (the projection runs in the model dtype, as transformers does)."""
        return self.lm_head(hidden)

    def mtp_forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    plan: AttentionPlan, kv_cache: torch.Tensor) -> torch.Tensor:
        """The MTP block at `positions` (mtp.py): next_ids [N] = tok_{t+1}, hidden [N, H] = h_t -> h' [N, H]."""
        if self.mtp is None:
            raise RuntimeError("mtp_forward: the model was loaded without its MTP block")
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        return self.mtp(self.model.embed_tokens, next_ids, hidden, cos, sin, plan, kv_cache)

    def checkpoint_targets(self) -> dict[str, WeightTarget]:
        """Every HF checkpoint key this model expects -> its target (model.mtp.* only with the MTP block built;
        model.mtp.embed_tokens never: the loader handles it)."""
        c = self.config
        t: dict[str, WeightTarget] = {"model.embed_tokens.weight": WeightTarget(self.model.embed_tokens.weight)}
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}."
            for j in range(2):
                t[f"{p}input_layernorm.{j}.weight"] = WeightTarget(layer.input_layernorm[j].weight)
                t[f"{p}post_attention_layernorm.{j}.weight"] = WeightTarget(layer.post_attention_layernorm[j].weight)
                attn = layer.self_attn[j]
                for name in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
                    module = getattr(attn, name)
                    t[f"{p}self_attn.{j}.{name}.weight"] = WeightTarget(module.weight)
                    if getattr(module, "bias", None) is not None:
                        t[f"{p}self_attn.{j}.{name}.bias"] = WeightTarget(module.bias)
                mlp = layer.mlps[j]
                t[f"{p}mlps.{j}.gate_proj.weight"] = WeightTarget(mlp.gate_up_proj.weight, (0,))
                t[f"{p}mlps.{j}.up_proj.weight"] = WeightTarget(mlp.gate_up_proj.weight, (1,))
                t[f"{p}mlps.{j}.down_proj.weight"] = WeightTarget(mlp.down_proj.weight)
            moe = layer.mlp
            t[f"{p}mlp.router.classifier.weight"] = WeightTarget(moe.router.classifier.weight)
            t[f"{p}mlp.router.e_score_correction_bias"] = WeightTarget(moe.router.e_score_correction_bias)
            if c.router_bias:
                t[f"{p}mlp.router.classifier.bias"] = WeightTarget(None)  # transformers never applies it
            for e in range(c.n_routed_experts):
                q = f"{p}mlp.experts.{e}."
                t[q + "gate_proj.weight"] = WeightTarget(moe.experts.w13, (e, "gate"))
                t[q + "up_proj.weight"] = WeightTarget(moe.experts.w13, (e, "up"))
                t[q + "down_proj.weight"] = WeightTarget(moe.experts.w2, (e, "down"))
        t["model.norm.weight"] = WeightTarget(self.model.norm.weight)
        if not c.tie_word_embeddings:
            t["lm_head.weight"] = WeightTarget(self.lm_head.weight)
        if self.mtp is not None:
            for key, (param, args) in self.mtp.checkpoint_targets().items():
                t[key] = WeightTarget(param, args)
        if c.quantization is not None and c.quantization.checkpoint_quantized:
            for key, target in list(t.items()):  # block-FP8 weights carry their scale (layers/fp8_linear.py)
                scale = getattr(target.param, "fp8_scale", None)
                if scale is not None and key.endswith(".weight"):
                    t[key.removesuffix(".weight") + ".weight_scale_inv"] = WeightTarget(scale, target.args)
        return t

    def use_w8a8_reference(self, enabled: bool = True) -> None:
        """Where the FP8 reference path runs (CPU), compute prefill-sized batches as the GPU's w8a8 kernels do
        (activations quantized per token-group) instead of weight-only (ops/fp8.py). For tests of the GPU numerics."""
        for module in self.modules():
            if hasattr(module, "w8a8_reference"):
                module.w8a8_reference = enabled

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """Once every tensor is in: FP8 kv_b_proj dequantized to the model dtype (MLAAttention)."""
        for layer in self.model.layers:
            for attn in layer.self_attn:
                attn.process_weights_after_loading()
        if self.mtp is not None:
            self.mtp.process_weights_after_loading()

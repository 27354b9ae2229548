"""Interleaved-pair RoPE on the MLA rope dims, computed like transformers' LongCat rotary embedding.

Pairs (x[2i], x[2i+1]) rotate by pos * inv_freq[i]; the output is written de-interleaved
([rotated evens | rotated odds]), the layout transformers produces and caches (spec §3). Dot products
are layout-independent, so queries and keys only need to agree.
"""

from __future__ import annotations

import math

import torch

from longcat_service.config import ModelConfig, RopeScaling


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [dim/2] on CPU, attention_factor) as transformers 4.57 computes them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if scaling is None:
        return 1.0 / (theta**exponents), 1.0
    return _yarn_inv_freq(dim, theta, scaling, max_position_embeddings)


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = s.factor
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.beta_fast or 32
    beta_slow = s.beta_slow or 1
    orig_max = s.original_max_position_embeddings or max_pos

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Not an nn.Module: holds no parameters, so model construction on any device never touches it.

    On CUDA, cos/sin come from a [max_position_embeddings, dim] table ([cos | sin] per position, built once per
    device and dtype with the same fp32 math, so bit-identical to computing them per step): one gather per step
    instead of six elementwise kernels on a decode step's critical path. The engine caps max_model_len at
    max_position_embeddings, so every position it schedules is in the table."""

    def __init__(self, config: ModelConfig):
        self.inv_freq, self.attention_factor = rope_inv_freq(
            config.qk_rope_head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        self.max_positions = config.max_position_embeddings
        self._per_device: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, dim/2] in dtype (unit last stride; on CUDA, views of one gathered [N, dim] tensor)."""
        table = self._table(positions.device, dtype) if positions.is_cuda else None
        if table is None:
            if not positions.is_cuda and positions.numel() and int(positions.max()) >= self.max_positions:
                # CUDA's table gather would assert on the device: fail here too, so CPU tests catch such callers
                raise IndexError(f"rotary position {int(positions.max())} is past max_position_embeddings "
                                 f"({self.max_positions})")
            return self.compute_cos_sin(positions, dtype)
        both = table.index_select(0, positions)
        half = both.shape[-1] // 2
        return both[:, :half], both[:, half:]

    def compute_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, dim/2] in dtype: computed in fp32, then cast, like transformers."""
        inv_freq = self._per_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._per_device.setdefault(positions.device, self.inv_freq.to(positions.device))
        freqs = positions.float()[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        table = self._tables.get((device, dtype))
        if table is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None  # never allocate inside a graph capture (the warm-up run before it builds the table)
            cos, sin = self.compute_cos_sin(torch.arange(self.max_positions, device=device), dtype)
            table = self._tables.setdefault((device, dtype), torch.cat((cos, sin), dim=-1))
        return table


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, ..., dim] (token-major; cos/sin [N, dim/2]) -> rotated, de-interleaved, same shape and dtype."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((x_even * c - x_odd * s, x_odd * c + x_even * s), dim=-1)

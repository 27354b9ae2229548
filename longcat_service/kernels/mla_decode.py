"""Weight-absorbed MLA decode attention over the paged latent cache (flash-decoding split-K, Triton).

One query token per sequence. With q_nope already multiplied by W_UK, every head scores the shared cache
entries [latent | rope key] directly, and the output stays in the latent space (the caller applies W_UV):

    o_latent[b, h] = softmax_t(scale * (q_latent[b, h] . latent_t + q_rope[b, h] . rope_t)) @ latent

This is multi-query attention: all heads of a row read the same cache entries. From MQA_MIN_ROWS rows, stage 1
(_mla_decode_mqa_triton) runs one program per (block of up to 64 heads, split, row): the heads are the M side of its tensor-core dots, so
each cache tile is loaded once for all of them. The row is cut into `num_splits` even chunks of whole stage-1
steps (stage1_tile; so small batches still fill the GPU); stage 1 writes each chunk's normalised partial output and
log-sum-exp, stage 2 merges them (and may apply W_UV). With one split and no W_UV, stage 1 writes the output
itself. Splits past a row's end (a short row fills only the first few) do no work and are skipped by the merge.
Sequence lengths are read from device memory and every grid size depends only on B, the head count and the
dtype (see launch_config), so a launch can be captured in a CUDA graph and replayed with new lengths. Rows with
seq_len 0 (batch padding) produce zeros.
Tiles, pipeline depths and merges are the fastest of those timed side by side on the H200 (2026-12-04,
benchmarks/bench_mla_decode.py): see the comments at BLOCK_N here and at STAGE1_STAGES and the merges of both kernel
files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_service import envs
from longcat_service.kernels import interpreter_mode, next_pow2

MAX_BLOCK_H = 64  # heads per stage-1 program; fewer heads per rank (TP) pad up to tl.dot's 16 rows
# A 64-head program fills an SM on its own (147 KB shared memory, 237 registers x 8 warps on sm_90a), so one wave
# of programs is one per H200 SM.
TARGET_PROGRAMS = 132
MAX_SPLITS = 32
# Why stage 1 took 53 us at batch 64 / ~500 tokens against a ~9 us KV byte floor (H200 profile, 2026-12-03; the
# TTGIR/PTX compiled offline for sm_90a): 64 rows x 2 splits = 128 programs, one wave of one program per SM, each
# walking ~8 tiles of 32 tokens one after another, so the time is 8 x the latency of one step plus the prologue
# (q: 72 KB) and the epilogue (a 128 KB fp32 partial). At 2 stages one step is two dependent memory round trips:
# the tile's page indices are a synchronous load issued after the previous tile's dots, then its cache rows are a
# cp.async waited for at the top of the next step (nothing computes meanwhile); then the dots, where the scores'
# dot is 72 m64n16k16 wgmmas issued by both warpgroups (Triton puts a chained dot's 8 warps all on M = 64 heads,
# so the second warpgroup repeats the first's scores), and the P @ latent dot 2 m64n256k16 per warpgroup. Batch 64
# at 4096 tokens showed the same ~4 us per step (255 us for 64 steps). More splits only shorten each program, not
# the per-SM chain (same steps per SM, more prologues and partials). What helps is more tiles in flight per SM:
# 5 stages make the page indices and the cache rows asynchronous, with two cache tiles in flight while one is
# computed (3 x 36 KB buffers, 185 KB shared memory, 246 registers); BLOCK_N 64 at 3 stages halves the steps
# (222 KB, 255 registers, no spills). Timed on the H200 (2026-12-04, `python benchmarks/bench_mla_decode.py
# --batches 1,16,64 --contexts 256,1024`, 64 heads, us per call), tiles 32,2 / 32,5 / 64,3 (32,5 without the
# early merge, which saved 0-0.8 us elsewhere): batch 16 at 256 tokens 16.2 / 18.2 / 17.2, at 1024 27.1 / 29.0 /
# 25.8; batch 64 at 256 31.6 / 31.4 / 29.4, at 1024 79.6 / 73.5 / 67.0; 32,3 between 32,2 and 32,5 everywhere. So
# 16-bit inputs take 64,3, the fastest where these kernels run (from MQA_MIN_ROWS rows) but for batch 16 at 256
# tokens (1 us behind). fp32 keeps 32,2: its 64-token or 5-stage tiles would not fit in shared memory.
BLOCK_N, STAGE1_STAGES = 64, 3  # cache tokens per step, software-pipeline stages (16-bit inputs)
FP32_BLOCK_N, FP32_STAGES = 32, 2
UV_BLOCK_D = 32  # W_UV columns per program of the W_UV merge stage (a [32, 512] tile: 32 KB of bf16)
# Rows from which the MQA-form kernels run; below, the 16-head ones (_mla_decode_triton). H200, 2026-12-03,
# `python benchmarks/bench_mla_decode.py` (64 heads, W_UV path as in production, us): batch 1 old 13.4 / new 19.3
# (context 512), 25.1 / 29.9 (4096); batch 16 26.7 / 23.9, 178.7 / 82.7; batch 64 77.7 / 54.6, 453.7 / 261.0.
MQA_MIN_ROWS = 16


def use_mqa_kernels(batch: int) -> bool:
    forced = envs.LONGCAT_MLA_DECODE_KERNEL
    if forced != "auto":
        return forced == "new"
    return batch >= MQA_MIN_ROWS


@dataclass(frozen=True)
class LaunchConfig:
    """Both launches of one mla_decode call: grids and kernel keyword arguments (constexprs, warps, stages). A
    function of the batch, the shapes, and the dtype only, never of the sequence lengths (which
    the kernels read from device memory), so a captured CUDA graph replays correctly with other lengths."""

    num_splits: int
    grid1: tuple[int, int, int]  # (head blocks, splits, batch)
    grid2: tuple[int, ...]  # (heads, batch) or, with W_UV, (heads, batch, dv blocks); () when stage 1 writes out
    stage1: dict
    stage2: dict


def block_heads(heads: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Heads per stage-1 program. fp32 (the tests' tight checks, the tiny CPU-twin models) takes 16 as the old
    kernels did: 64 fp32 heads x 576 would need ~230 KB of shared memory and spill registers (sm_90a)."""
    return min(MAX_BLOCK_H if dtype.itemsize <= 2 else 16, next_pow2(heads))


def choose_num_splits(batch: int, heads: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """As many splits as keep the stage-1 grid within one wave of TARGET_PROGRAMS. A function of the batch and the
    heads only (not of the block table's width either: eager decode would then build a kernel variant for each
    new width), so one CUDA-graph bucket always uses the same grid; splits past a row's end cost an early exit."""
    programs = batch * -(-heads // block_heads(heads, dtype))
    return max(1, min(MAX_SPLITS, TARGET_PROGRAMS // programs))


def stage1_tile(dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(BLOCK_N, num_stages) of stage 1 (and the split granularity of both stages) for this input dtype."""
    return (BLOCK_N, STAGE1_STAGES) if dtype.itemsize <= 2 else (FP32_BLOCK_N, FP32_STAGES)


def launch_config(batch: int, heads: int, rank: int, rope: int, dtype: torch.dtype, dv: int | None = None,
                  num_splits: int | None = None, first_pos: int = 0) -> LaunchConfig:
    if num_splits is None:
        num_splits = choose_num_splits(batch, heads, dtype)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    interp = interpreter_mode()
    rank_pad = next_pow2(rank)
    block_h = block_heads(heads, dtype)
    block_n, stages = stage1_tile(dtype)
    direct = num_splits == 1 and dv is None
    stage1 = dict(
        RANK=rank, ROPE=rope, RANK_PAD=rank_pad, ROPE_PAD=next_pow2(rope), NUM_SPLITS=num_splits, BLOCK_H=block_h,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=interp,  # the CPU interpreter has no bf16 matmul: compute in fp32 there
        USE_WHILE=interp, FIRST_POS=first_pos, DIRECT_OUT=direct,
        num_warps=8 if block_h >= 32 else 4,  # 32 heads on 4 warps spill registers, on 8 they do not (sm_90a)
        num_stages=stages,
    )
    grid1 = (-(-heads // block_h), num_splits, batch)
    if direct:
        return LaunchConfig(num_splits, grid1, (), stage1, {})
    splits_pad = next_pow2(num_splits, minimum=2)
    stage2 = dict(RANK=rank, RANK_PAD=rank_pad, NUM_SPLITS=num_splits, SPLITS_PAD=splits_pad, BLOCK_N=block_n,
                  num_warps=8 if splits_pad >= 16 else 4)
    if dv is None:
        return LaunchConfig(num_splits, grid1, (heads, batch), stage1, stage2)
    block_d = min(UV_BLOCK_D, next_pow2(dv))
    stage2.update(BLOCK_D=block_d, DV=dv)
    return LaunchConfig(num_splits, grid1, (heads, batch, -(-dv // block_d)), stage1, stage2)


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    first_pos: int = 0,
) -> torch.Tensor:
    """Pure-PyTorch spec: fp32 scores and softmax, output in q_latent's dtype. Reads seq_lens on the host.
    first_pos: each row attends to positions first_pos..seq_len-1 (the MTP cache holds nothing at position 0)."""
    rank = q_latent.shape[-1]
    block_size = kv_cache.shape[1]
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    out = torch.zeros_like(q_latent)
    for b, length in enumerate(seq_lens.tolist()):
        if length <= first_pos:
            continue
        pos = torch.arange(first_pos, length, device=kv_cache.device)
        slots = block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        entries = flat[slots].float()  # [L, rank + rope]
        q = torch.cat((q_latent[b], q_rope[b]), dim=-1).float()  # [h, rank + rope]
        probs = torch.softmax((q @ entries.t()) * scale, dim=-1)
        out[b] = (probs @ entries[:, :rank]).to(out.dtype)
    return out


def _check_inputs(q_latent, q_rope, kv_cache, block_tables, seq_lens) -> None:
    if q_latent.dim() != 3 or q_rope.dim() != 3 or q_latent.shape[:2] != q_rope.shape[:2]:
        raise ValueError(f"q_latent {tuple(q_latent.shape)} and q_rope {tuple(q_rope.shape)} must be [B, heads, *]")
    rank, rope = q_latent.shape[-1], q_rope.shape[-1]
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != rank + rope:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} must be [num_blocks, block_size, {rank}+{rope}]")
    batch = q_latent.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be [{batch}, max_blocks]")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} must be [{batch}]")
    if q_latent.dtype != kv_cache.dtype or q_rope.dtype != kv_cache.dtype:
        raise ValueError(f"q_latent/q_rope/kv_cache dtypes differ: {q_latent.dtype}, {q_rope.dtype}, {kv_cache.dtype}")
    if q_latent.stride(-1) != 1 or q_rope.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("q_latent and q_rope need a unit last stride and kv_cache must be contiguous")
    for name, t in (("q_rope", q_rope), ("kv_cache", kv_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != q_latent.device:
            raise ValueError(f"{name} is on {t.device}, q_latent on {q_latent.device}")


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    w_uv: torch.Tensor | None = None,
    first_pos: int = 0,
) -> torch.Tensor:
    """q_latent [B, h, r], q_rope [B, h, dr], kv_cache [nb, bs, r+dr], block_tables [B, mb] int,
    seq_lens [B] int (device) -> o_latent [B, h, r] in the input dtype; with w_uv [h, dv, r] (unit last stride)
    the merge stage also applies it and returns [B, h, dv] (see mla_decode_uv_reference). first_pos 1: positions
    1..seq_len-1 only (the MTP block's cache, model/mtp.py; seq_len >= 2 or 0)."""
    if first_pos not in (0, 1):
        raise ValueError(f"first_pos must be 0 or 1, got {first_pos}")
    _check_inputs(q_latent, q_rope, kv_cache, block_tables, seq_lens)
    if w_uv is not None:
        heads, rank = q_latent.shape[1], q_latent.shape[2]
        if w_uv.dim() != 3 or w_uv.shape[0] != heads or w_uv.shape[2] != rank or w_uv.stride(-1) != 1:
            raise ValueError(f"w_uv {tuple(w_uv.shape)} must be [{heads}, dv, {rank}] with a unit last stride")
        if w_uv.dtype != q_latent.dtype or w_uv.device != q_latent.device:
            raise ValueError(f"w_uv is {w_uv.dtype} on {w_uv.device}, q_latent {q_latent.dtype} on {q_latent.device}")
    batch, heads, rank = q_latent.shape
    dv = None if w_uv is None else w_uv.shape[1]
    if not use_mqa_kernels(batch):
        from longcat_service.kernels import _mla_decode_triton as old

        cfg = LaunchConfig(*old.launch_config(batch, heads, rank, q_rope.shape[-1], q_latent.dtype, dv=dv,
                                              num_splits=num_splits, first_pos=first_pos))
        return old.launch(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, cfg, w_uv=w_uv)
    from longcat_service.kernels._mla_decode_mqa_triton import launch

    cfg = launch_config(batch, heads, rank, q_rope.shape[-1], q_latent.dtype, dv=dv, num_splits=num_splits,
                        first_pos=first_pos)
    return launch(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, cfg, w_uv=w_uv)


def mla_decode_uv_reference(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, w_uv,
                            first_pos: int = 0) -> torch.Tensor:
    """mla_decode with w_uv: the unfused path's o_latent (model dtype), then the per-head W_UV product."""
    o_latent = mla_decode_reference(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, first_pos)
    return torch.bmm(o_latent.transpose(0, 1).float(), w_uv.float().transpose(1, 2)).transpose(0, 1).to(o_latent.dtype)

"""MLA decode split-K bookkeeping: the merge folds only the splits that hold tokens, and the
launch configuration (grids, constexprs) of a batch never depends on its sequence lengths (CUDA-graph replay).

Small head counts and ranks so that Triton's CPU interpreter (TRITON_INTERPRET=1, tests/conftest.py) is quick;
the real shapes run on the GPU in tests/test_gpu_twins.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.sm90_aot import assert_fits_shared_memory, compile_for_sm90

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.kernels import _mla_decode_mqa_triton as tri  # noqa: E402
from longcat_service.kernels import mla_decode as md  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
BF16_TOL = 2e-3 if ON_GPU else 3 * 2**-7  # as tests/test_kernels.py: the interpreter truncates to bf16
BN = md.stage1_tile(torch.float32)[0]  # the tests' fp32 step (32 tokens); 16-bit inputs step md.BLOCK_N (64)
HEADS, RANK, ROPE, DV, PAGE = 4, 16, 8, 12, 8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_len(seq_len: int, num_splits: int, block_n: int = BN) -> int:
    """Python mirror of the kernels' _split_len (for the expected split counts only)."""
    return max(_cdiv(_cdiv(seq_len, num_splits), block_n) * block_n, block_n)


def _active(seq_len: int, num_splits: int, block_n: int = BN) -> int:
    return _cdiv(seq_len, _split_len(seq_len, num_splits, block_n))


@pytest.fixture(autouse=True)
def _mqa_kernels(monkeypatch):
    """These tests are about the MQA-form kernels, which mla_decode runs from MQA_MIN_ROWS rows: force them."""
    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", "new")


def _case(seed, lens, dtype, heads=HEADS, rank=RANK, rope=ROPE, dv=DV, lens_dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    max_blocks = max(-(-max(lens) // PAGE), 1)
    num_blocks = batch * max_blocks + 3
    cache = torch.randn(num_blocks, PAGE, rank + rope, generator=gen).to(dtype).to(DEVICE)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    q_lat = torch.randn(batch, heads, rank, generator=gen).to(dtype).to(DEVICE)
    q_rope = torch.randn(batch, heads, rope, generator=gen).to(dtype).to(DEVICE)
    w_kv_b = (torch.randn(heads, 3 + dv, rank, generator=gen) * 0.3).to(dtype).to(DEVICE)
    seq = torch.tensor(lens, dtype=lens_dtype, device=DEVICE)
    return (q_lat, q_rope, cache, tables.int().to(DEVICE), seq), w_kv_b[:, 3:, :]  # W_UV strided like kv_b_proj


def _edge_lens(num_splits: int, block_n: int = BN) -> list[int]:
    """0, 1, one block -1/0/+1, a row that exactly fills all num_splits one-block splits (or, where that would
    exceed 1024 tokens, as many as fit in 1024) and one token more, a long row: within one batch, so rows fill
    different numbers of splits."""
    shortest = _split_len(1, num_splits, block_n)
    full = min(num_splits, max(1024 // shortest, 1)) * shortest
    return [0, 1, block_n - 1, block_n, block_n + 1, full, full + 1, 700]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_active_splits_match_reference(dtype):
    tol = 1e-5 if dtype == torch.float32 else 2 * BF16_TOL
    bn = md.stage1_tile(dtype)[0]
    for num_splits in (1, 3, 32):
        lens = _edge_lens(num_splits, bn)
        if num_splits == 32:  # 32 stage-1 programs a row: fewer rows (1, bn - 1, bn: covered at 1 and 3 splits)
            lens = [n for n in lens if n not in (1, bn - 1, bn)]
        full = lens[-3]
        assert full == _active(full, num_splits, bn) * _split_len(full, num_splits, bn)  # exactly filled
        if num_splits > 1:  # rows fill different numbers of splits
            assert len({_active(n, num_splits, bn) for n in lens}) > 2
        args, w_uv = _case(num_splits * 10, lens, dtype)
        ref = md.mla_decode_reference(*args, scale=0.37)
        out = md.mla_decode(*args, scale=0.37, num_splits=num_splits)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert _rel(out, ref) < tol, (num_splits, lens)
        assert lens[0] == 0 and (out[0] == 0).all()  # seq_len 0
        ref_uv = md.mla_decode_uv_reference(*args, scale=0.37, w_uv=w_uv)
        out_uv = md.mla_decode(*args, scale=0.37, num_splits=num_splits, w_uv=w_uv)
        assert out_uv.shape == ref_uv.shape and _rel(out_uv, ref_uv) < tol, (num_splits, lens)
        assert (out_uv[0] == 0).all()


@pytest.mark.parametrize("num_splits,lens", [
    (32, [512, 0, 33, 700]),  # 512 tokens fill 16 of 32 splits
    (3, [512, 700, 32]),
    (3, [192, 193, 31]),  # exactly 3 x 64; one token more
])
def test_only_active_splits_are_written_and_merged(num_splits, lens):
    """Stage 1 writes the partials of the splits that hold tokens and no others; the merge reads only those
    (the unwritten ones stay NaN here, and the output is finite and matches the reference). int32 and int64
    seq_lens (CUDA-graph replays pass int64)."""
    lens_dtype = torch.int64 if num_splits == 3 else torch.int32
    args, w_uv = _case(len(lens) + num_splits, lens, torch.float32, lens_dtype=lens_dtype)
    batch = len(lens)
    for dv in (None, DV):
        cfg = md.launch_config(batch, HEADS, RANK, ROPE, torch.float32, dv=dv, num_splits=num_splits)
        part_out = torch.full((batch, HEADS, num_splits, RANK), float("nan"), device=DEVICE)
        part_lse = torch.full((batch, HEADS, num_splits), float("nan"), device=DEVICE)
        out = tri.launch(*args, 0.37, cfg, w_uv=None if dv is None else w_uv, parts=(part_out, part_lse))
        ref = (md.mla_decode_reference(*args, scale=0.37) if dv is None
               else md.mla_decode_uv_reference(*args, scale=0.37, w_uv=w_uv))
        assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5
        written = torch.isfinite(part_lse)  # [B, h, splits]
        assert torch.equal(written, torch.isfinite(part_out).all(-1))
        for b, n in enumerate(lens):
            expect = _active(n, num_splits)
            assert written[b].sum(-1).tolist() == [expect] * HEADS, (n, expect)
            assert written[b, :, :expect].all()  # the first `expect` splits


class _Recorder:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, then launches it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append((self.kernel.fn.__name__, tuple(grid), dict(kwargs)))
            return self.kernel[grid](*args, **kwargs)

        return run


def test_launch_configuration_does_not_depend_on_seq_lens(monkeypatch):
    """What a CUDA graph captures (grids, constexprs, warps) must be the same whatever the batch's lengths:
    empty rows, short rows filling one split, long rows filling all of them."""
    log: list = []
    for name in ("stage1", "stage2", "stage2_uv"):
        monkeypatch.setattr(tri, name, _Recorder(getattr(tri, name), log))
    args, w_uv = _case(3, [300, 300], torch.float32)
    q_lat, q_rope, cache, tables, _ = args
    batch = q_lat.shape[0]
    for uv in (None, w_uv):
        seen = []
        for lens in ([0, 0], [1, 33], [129, 300]):
            log.clear()
            seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
            md.mla_decode(q_lat, q_rope, cache, tables, seq, 0.37, w_uv=uv)
            assert [entry[0] for entry in log] == ["stage1", "stage2" if uv is None else "stage2_uv"]
            seen.append(list(log))
        assert all(s == seen[0] for s in seen[1:]), seen
        cfg = md.launch_config(batch, HEADS, RANK, ROPE, torch.float32, dv=None if uv is None else DV)
        assert seen[0] == [("stage1", cfg.grid1, cfg.stage1), (seen[0][1][0], cfg.grid2, cfg.stage2)]
        assert cfg.grid1 == (1, md.choose_num_splits(batch, HEADS), batch)


def test_one_split_without_w_uv_writes_the_output_in_stage_1(monkeypatch):
    """num_splits 1 (large batches) and no W_UV: stage 1 writes the final output itself (no merge launch), zeros
    for a padded row, equal to the reference; with W_UV the merge stage still runs."""
    log: list = []
    for name in ("stage1", "stage2", "stage2_uv"):
        monkeypatch.setattr(tri, name, _Recorder(getattr(tri, name), log))
    args, w_uv = _case(5, [0, 1, 700, BN + 1], torch.float32)
    out = md.mla_decode(*args, scale=0.37, num_splits=1)
    assert [entry[0] for entry in log] == ["stage1"] and log[0][2]["DIRECT_OUT"]
    assert _rel(out, md.mla_decode_reference(*args, scale=0.37)) < 1e-5 and (out[0] == 0).all()
    log.clear()
    out_uv = md.mla_decode(*args, scale=0.37, num_splits=1, w_uv=w_uv)
    assert [entry[0] for entry in log] == ["stage1", "stage2_uv"] and not log[0][2]["DIRECT_OUT"]
    assert _rel(out_uv, md.mla_decode_uv_reference(*args, scale=0.37, w_uv=w_uv)) < 1e-5


@pytest.mark.parametrize("batch,heads,block_h,splits", [
    (1, 64, 64, md.MAX_SPLITS),  # one row: as many splits as allowed
    (16, 64, 64, 8),  # 128 programs: one wave of 132 SMs
    (64, 64, 64, 2),
    (67, 64, 64, 1),  # past one wave: one split, stage 1 writes the output
    (256, 64, 64, 1),
    (4, 8, 16, md.MAX_SPLITS),  # TP8: 8 heads a rank, padded to 16 rows
    (16, 16, 16, 8),
    (16, 128, 64, 4),  # 128 heads: two head blocks
    (16, 20, 32, 8),
])
def test_split_count_and_head_block_follow_the_batch(batch, heads, block_h, splits):
    """The batch and head count only (a CUDA-graph bucket always gets the same grid): one wave of up to 64-head
    programs."""
    cfg = md.launch_config(batch, heads, 512, 64, torch.bfloat16)
    assert cfg.stage1["BLOCK_H"] == block_h and cfg.num_splits == splits
    assert cfg.grid1 == (_cdiv(heads, block_h), splits, batch)
    assert cfg.stage1["DIRECT_OUT"] == (splits == 1) and (cfg.grid2 == ()) == (splits == 1)
    assert md.launch_config(batch, heads, 512, 64, torch.bfloat16, dv=128).stage1["DIRECT_OUT"] is False


def test_fp32_keeps_16_head_programs():
    """fp32 at the real widths would not fit 64 heads in shared memory: 16-head programs, 4x the split count."""
    assert md.block_heads(64, torch.float32) == 16 and md.block_heads(64, torch.bfloat16) == 64
    cfg = md.launch_config(16, 64, 512, 64, torch.float32)
    assert cfg.grid1 == (4, 2, 16) and cfg.stage1["num_warps"] == 4


def test_kernel_choice_by_rows(monkeypatch):
    from longcat_service.kernels import mla_decode as md

    monkeypatch.delenv("LONGCAT_MLA_DECODE_KERNEL", raising=False)
    assert [md.use_mqa_kernels(b) for b in (1, md.MQA_MIN_ROWS - 1, md.MQA_MIN_ROWS, 64)] == [False, False, True, True]
    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", "new")
    assert md.use_mqa_kernels(1)
    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", "old")
    assert not md.use_mqa_kernels(64)


def test_stage1_tile_by_dtype():
    """16-bit inputs step 64 cache tokens at 3 pipeline stages (the fastest MQA tile on the H200), fp32 32 at 2 (its
    larger tiles would not fit in shared memory); the 16-head kernels 32 at 2 stages for every dtype."""
    from longcat_service.kernels import _mla_decode_triton as old

    for dtype, tile in ((torch.bfloat16, (64, 3)), (torch.float16, (64, 3)), (torch.float32, (32, 2))):
        assert md.stage1_tile(dtype) == tile
        cfg = md.launch_config(16, 64, 512, 64, dtype, dv=128)
        assert (cfg.stage1["BLOCK_N"], cfg.stage1["num_stages"]) == tile and cfg.stage2["BLOCK_N"] == tile[0]
        stage1 = old.launch_config(1, 64, 512, 64, dtype)[3]
        assert (stage1["BLOCK_N"], stage1["num_stages"]) == (32, 2)


@pytest.mark.parametrize("lens,num_splits", [
    ([1], None),  # batch 1, one token: the default split count (32) far past the row's blocks
    ([0, 1, 63, 64, 65, 200, 7], None),  # odd batch: empty, one token, one tile -1/0/+1, not a multiple
    ([129, 5, 300], 7),  # splits > a short row's tiles; uneven split lengths
    ([130, 64], 1),  # one split: stage 1 writes the output (no W_UV) or the merge applies W_UV
])
def test_16bit_stage1_tile_matches_reference(lens, num_splits):
    """The 64-token steps of 16-bit inputs give the reference's output, with and without W_UV, for the lengths that
    cut the rows differently at that step."""
    cfg = md.launch_config(len(lens), HEADS, RANK, ROPE, torch.bfloat16, num_splits=num_splits)
    assert cfg.stage1["BLOCK_N"] == 64
    args, w_uv = _case(len(lens) * 3 + 64, lens, torch.bfloat16)
    ref = md.mla_decode_reference(*args, scale=0.37)
    out = md.mla_decode(*args, scale=0.37, num_splits=num_splits)
    assert torch.isfinite(out).all() and _rel(out, ref) < 2 * BF16_TOL, lens
    assert all((out[b] == 0).all() for b, n in enumerate(lens) if n == 0)
    out_uv = md.mla_decode(*args, scale=0.37, num_splits=num_splits, w_uv=w_uv)
    assert _rel(out_uv, md.mla_decode_uv_reference(*args, scale=0.37, w_uv=w_uv)) < 2 * BF16_TOL, lens


@pytest.mark.parametrize("kernel", ["old", "new"])
def test_split_merge_matches_reference(monkeypatch, kernel):
    """The merge of both kernel families (all active splits' partials in one masked load, issued before their
    log-sum-exps are read; the W_UV tile loaded first): the reference's output with and without W_UV, rows filling
    0, 1, some and all splits, the MTP cache's first_pos 1 (a split whose only token is masked: weight 0)."""
    monkeypatch.setenv("LONGCAT_MLA_DECODE_KERNEL", kernel)
    tol = 1e-5  # fp32 partials either way: fp32 inputs check the merge's math tightly
    for num_splits, first_pos in ((8, 0), (3, 1)):  # 8: more splits than most rows' blocks
        lens = [0, 1 + first_pos, BN - 1, BN + 1, 200, 7]  # first_pos 1: seq_len >= 2 or 0 (mla_decode)
        args, w_uv = _case(11, lens, torch.float32)
        ref = md.mla_decode_reference(*args, scale=0.37, first_pos=first_pos)
        out = md.mla_decode(*args, scale=0.37, num_splits=num_splits, first_pos=first_pos)
        assert torch.isfinite(out).all() and _rel(out, ref) < tol and (out[0] == 0).all()
        ref_uv = md.mla_decode_uv_reference(*args, scale=0.37, w_uv=w_uv, first_pos=first_pos)
        out_uv = md.mla_decode(*args, scale=0.37, num_splits=num_splits, w_uv=w_uv, first_pos=first_pos)
        assert _rel(out_uv, ref_uv) < tol and (out_uv[0] == 0).all()


# ---- the GPU build, compiled offline (catches what the interpreter accepts and Triton's GPU compiler refuses) ------

_AOT = """
import os, re, subprocess, tempfile
import torch, triton
from longcat_service.kernels import mla_decode as md
from longcat_service.kernels import _mla_decode_mqa_triton as mqa, _mla_prep_triton as prep
from longcat_service.kernels._fp8_gemm_triton import _aot
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def usage(ck):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        return subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout

B, H, R, D, bf = 64, 64, 512, 64, torch.bfloat16
cfg = md.launch_config(B, H, R, D, bf)  # the 16-bit tile: md.stage1_tile(bf)
kw = dict(cfg.stage1)
warps, stages = kw.pop("num_warps"), kw.pop("num_stages")
f32 = torch.empty(B, H, cfg.num_splits, R)
values = dict(q_lat_ptr=torch.empty(B, H, R, dtype=bf), q_rope_ptr=torch.empty(B, H, D, dtype=bf),
              cache_ptr=torch.empty(8, 16, R + D, dtype=bf), tables_ptr=torch.empty(B, 8, dtype=torch.int32),
              lens_ptr=torch.empty(B, dtype=torch.int32), part_out_ptr=f32, part_lse_ptr=f32,
              out_ptr=torch.empty(B, H, R, dtype=bf), qk_scale=0.1, num_heads=H, block_size=16,
              s_qlb=H * R, s_qlh=R, s_qrb=H * D, s_qrh=D, s_cb=16 * (R + D), s_ct=R + D, s_tb=8,
              s_pob=H * 2 * R, s_poh=2 * R, s_pos=R, s_plb=H * 2, s_plh=2, s_ob=H * R, s_oh=R)
ck = _aot(mqa.stage1, values, kw, warps, stages, 90)
use = usage(ck)
assert "STACK:0 " in use and "LOCAL:0" in use, ("stage1 spills registers", use)
assert "wgmma.mma_async" in ck.asm["ptx"], "stage1: no wgmma"
print("stage1", ck.metadata.shared, flush=True)
values = dict(q_ptr=torch.empty(1, H, 192, dtype=bf), kva_ptr=torch.empty(1, R + D, dtype=bf),
              cos_ptr=torch.empty(1, 32, dtype=bf), sin_ptr=torch.empty(1, 32, dtype=bf), w_ptr=torch.empty(R, dtype=bf),
              slot_ptr=torch.empty(1, dtype=torch.int64), cache_ptr=torch.empty(8, 16, R + D, dtype=bf),
              wuk_ptr=torch.empty(H, 256, R, dtype=bf), qlat_ptr=torch.empty(1, H, R, dtype=bf),
              qpe_ptr=torch.empty(1, H, D, dtype=bf), eps=1e-6, q_scale=0.5, kv_scale=3.0, heads=H,
              s_qn=H * 192, s_qh=192, s_kn=R + D, s_cn=R + D, s_cos=64, s_sin=64, s_wh=256 * R, s_wd=R, s_ln=H * R,
              s_lh=R, s_pn=H * D, s_ph=D)
consts = dict(N_TOKENS=1, RANK=R, ROPE=D, NOPE=128, RANK_PAD=R, HALF_PAD=32, NOPE_PAD=128, BLOCK_R=prep.ABSORB_BLOCK_R)
ck = _aot(prep._mla_prep_absorb_kernel, values, consts, 4, 3, 90)
assert "STACK:0 " in usage(ck), "prep_absorb spills registers"
print("prep_absorb", ck.metadata.shared, flush=True)
"""


def test_sm90_build_of_the_16bit_tile_and_prep_absorb():
    """The MQA stage 1 at its 16-bit tile (64 tokens, 3 stages; 64 heads, rank 512, bf16) compiles for sm_90 to
    wgmma within an H200 SM's shared memory without register spills; mla_prep_absorb at LongCat shapes compiles
    without spills."""
    lines = compile_for_sm90(_AOT)
    assert [line.split()[0] for line in lines] == ["stage1", "prep_absorb"], lines
    assert_fits_shared_memory(lines)

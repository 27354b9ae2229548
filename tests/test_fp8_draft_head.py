"""LONGCAT_MTP_FP8_DRAFT_HEAD=1 (temporary, until measured on the H200): MTP drafts come from a block-FP8 copy of the
lm_head. Only the drafts may change: outputs equal MTP off, and the copy's logits are the bf16 head's within e4m3
rounding."""

from __future__ import annotations

import pytest
import torch

from longcat_service.ops.fp8_reference import FP8_DTYPE, block_dequant, block_quant
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.spec_rows_twin import EagerSpecRows

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 26))]


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    return write_mtp_checkpoint(tmp_path_factory.mktemp("fp8_draft") / "exact", "exact", seed=1)


def _engine(path, k, monkeypatch, fp8: bool):
    if fp8:
        monkeypatch.setenv("LONGCAT_MTP_FP8_DRAFT_HEAD", "1")
    else:
        monkeypatch.delenv("LONGCAT_MTP_FP8_DRAFT_HEAD", raising=False)
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    return make_engine(model=path, speculative_config=spec)


def test_the_draft_head_is_the_lm_head_quantized_block_by_block(exact, monkeypatch):
    model = _engine(exact, 2, monkeypatch, fp8=True).runner.model
    w8, scale = model.draft_head
    w = model.lm_head.weight
    assert w8.dtype == FP8_DTYPE and w8.shape == w.shape and scale.shape == (-(-w.shape[0] // 128), 1)
    ref8, ref_scale = block_quant(w)  # chunked quantization (whole 128-row blocks) equals one pass
    model.enable_fp8_draft_head(rows_per_chunk=128)
    assert torch.equal(model.draft_head[0].float(), ref8.float()) and torch.equal(model.draft_head[1], ref_scale)
    h = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
    got, bf = model.compute_draft_logits(h), model.compute_logits(h)
    assert got.dtype == torch.float32
    assert torch.allclose(got, h @ block_dequant(ref8, ref_scale, dtype=torch.float32).t(), atol=1e-5)
    assert (got - bf).abs().max() < 0.1 * bf.abs().max()  # e4m3: a few percent
    assert not torch.equal(got, bf)


def test_off_by_default_and_without_mtp(exact, monkeypatch):
    assert _engine(exact, 2, monkeypatch, fp8=False).runner.model.draft_head is None
    assert _engine(exact, None, monkeypatch, fp8=True).runner.model.draft_head is None


@pytest.mark.parametrize("fused", [True, False])
def test_fp8_drafts_leave_the_outputs_unchanged(exact, monkeypatch, fused):
    requests = {f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
                for i, p in enumerate(PROMPTS)}
    requests["s"] = (PROMPTS[0], SamplingParams(temperature=0.9, max_tokens=4, ignore_eos=True, seed=5))  # then greedy
    outs = {}
    for fp8 in (False, True):
        engine = _engine(exact, 3, monkeypatch, fp8)
        twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, 3, (1, 2, 4))
        engine.runner.spec_decoder.fuse_greedy = fused
        model, calls = engine.runner.model, []
        draft_logits = model.compute_draft_logits
        model.compute_draft_logits = lambda h, f=draft_logits, m=model, c=calls: (c.append(m.draft_head is not None),
                                                                                f(h))[1]
        outs[fp8], _ = run_to_completion(engine, requests)
        assert calls and all(c == fp8 for c in calls)  # every draft from the FP8 head exactly when switched on
        assert_all_blocks_free(engine)
        assert twin.calls["greedy" if fused else "verify"] > 0
    off, _ = run_to_completion(_engine(exact, None, monkeypatch, False), requests)
    for rid in requests:
        if rid != "s":
            assert outs[True][rid].outputs[0].token_ids == off[rid].outputs[0].token_ids, rid
    drafts = sum(o.metrics.num_draft_tokens for o in outs[True].values())
    assert sum(o.metrics.num_accepted_tokens for o in outs[True].values()) > 0.8 * drafts  # FP8 drafts still right

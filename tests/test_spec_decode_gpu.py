"""MTP speculative decoding on CUDA (Triton prefill attention for the verify, eager MTP decode): greedy tokens equal
MTP off (fp32, so that the verify path's rounding cannot flip an argmax), every block freed, sampled runs seeded
and batch-independent. The CPU tests (test_spec_decode.py) hold the full matrix."""

from __future__ import annotations

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 40)), [60, 61, 62, 63]]


@pytest.mark.parametrize("mode", ["exact", "partial", "random"])
def test_greedy_equal_mtp_off_on_cuda(tmp_path, mode):
    path = write_mtp_checkpoint(tmp_path / mode, mode, seed=1)
    requests = {f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1))
                for i, p in enumerate(PROMPTS)}
    outs = {}
    for k in (None, 1, 3):
        engine = make_engine(model=path, device="cuda", speculative_config={"method": "mtp",
                                                                            "num_speculative_tokens": k} if k else None)
        outs[k], _ = run_to_completion(engine, requests)
        assert_all_blocks_free(engine)
    for k in (1, 3):
        for rid in requests:
            a, b = outs[None][rid].outputs[0], outs[k][rid].outputs[0]
            assert a.token_ids == b.token_ids, (k, rid)
            assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
    if mode == "exact":
        assert all(o.metrics.spec_acceptance_rate > 0.9 for o in outs[3].values())


def test_seeded_sampling_batch_independent_on_cuda(tmp_path):
    path = write_mtp_checkpoint(tmp_path / "p", "partial", seed=1)
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=20, ignore_eos=True, seed=7)
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    alone, _ = run_to_completion(make_engine(model=path, device="cuda", speculative_config=spec),
                                 {"x": (PROMPTS[0], params)})
    crowd = {"x": (PROMPTS[0], params)}
    crowd.update({f"o{i}": (p, SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True))
                  for i, p in enumerate(PROMPTS)})
    batched, _ = run_to_completion(make_engine(model=path, device="cuda", speculative_config=spec), crowd)
    assert alone["x"].outputs[0].token_ids == batched["x"].outputs[0].token_ids

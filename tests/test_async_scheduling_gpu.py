"""GPU twin of test_engine_async_scheduling: chained decode steps replay the CUDA graphs with their input ids
copied on the device from the previous step's samples; outputs must equal the engine reading every step back."""

from __future__ import annotations

import random

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import PROMPTS, assert_all_blocks_free, make_engine, run_to_completion
from tests.test_engine_async_scheduling import ChainSpy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def requests(stop_ids: dict[str, list[int]] | None = None):
    rng = random.Random(0)
    out = {}
    for i, prompt in enumerate(PROMPTS * 3):
        rid = f"r{i}"
        out[rid] = (prompt + [rng.randrange(3, 500) for _ in range(i)],
                    SamplingParams(temperature=0.0, max_tokens=10 + 2 * i, ignore_eos=True, logprobs=1,
                                   stop_token_ids=(stop_ids or {}).get(rid, []),
                                   repetition_penalty=1.2 if i % 3 == 0 else 1.0,  # counted on the device
                                   frequency_penalty=0.3 if i % 3 == 1 else 0.0))
    return out


@pytest.mark.parametrize("dtype", ["float32"])  # bf16 GEMMs round differently at another batch bucket
def test_chained_graph_decode_equals_synchronous_decode(dtype):
    sync = make_engine(device="cuda", dtype=dtype, async_scheduling=False)
    assert sync.runner.graph_runner is not None
    first, _ = run_to_completion(sync, requests())
    rng = random.Random(1)  # stop on a token each request really produces: stops while a step is chained
    stops = {rid: [o.outputs[0].token_ids[rng.randrange(3, len(o.outputs[0].token_ids))]]
             for rid, o in first.items() if rng.random() < 0.6}
    want, _ = run_to_completion(sync, requests(stops))
    chained_engine = make_engine(device="cuda", dtype=dtype, async_scheduling=True)
    spy = ChainSpy(chained_engine)
    got, _ = run_to_completion(chained_engine, requests(stops))
    assert spy.chained > 10 and spy.adopted > 0 and spy.dropped > 0, vars(spy)
    for rid in want:
        w, g = want[rid].outputs[0], got[rid].outputs[0]
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason), rid
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=2e-2)
    assert_all_blocks_free(chained_engine)

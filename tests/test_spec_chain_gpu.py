"""Chained greedy spec steps on CUDA graphs (async scheduling with MTP: engine/spec_chain.py, spec_chain_rows.py): the
engine's own captured spec graphs, a tiny fp32 model. Tokens equal MTP off and the unchained spec engine for k = 1..3
at acceptance ~0 ("random") and 1 ("exact") and in between ("partial"), with stops and length limits inside accepted
runs; steps really chain; every KV block comes back. The bookkeeping itself is tested on CPU (test_spec_chain.py)."""

from __future__ import annotations

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 40)), [60, 61, 62, 63],
           [90, 3, 3, 8], [44], [120, 121, 122]]


def plain(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(path, k: int | None, requests: dict, chained: bool = True):
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    engine = make_engine(model=path, device="cuda", speculative_config=spec, max_num_seqs=8, async_scheduling=chained)
    if k:
        assert engine.runner.spec_decoder.graphs is not None and engine.runner.spec_decoder.graphs.use_graphs
    final, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    return final, (engine.spec_chain.num_chained if k else 0)


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        x, y = a[rid].outputs[0], b[rid].outputs[0]
        assert x.token_ids == y.token_ids, (what, rid)
        assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason), (what, rid)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["random", "exact", "partial"])
def test_chained_graph_spec_steps_equal_mtp_off(tmp_path, mode, k):
    path = write_mtp_checkpoint(tmp_path / mode, mode, seed=1)
    requests = {f"r{i}": (p, plain(20 + 3 * i)) for i, p in enumerate(PROMPTS)}
    off, _ = _run(path, None, requests)
    on, chained = _run(path, k, requests)
    unchained, none = _run(path, k, requests, chained=False)
    _assert_same(off, on, "chained vs MTP off")
    _assert_same(off, unchained, "unchained vs MTP off")
    assert chained > 2 and none == 0, chained
    if mode == "exact":
        assert all(o.metrics.spec_acceptance_rate == 1.0 for o in on.values())


def test_chained_graph_steps_with_stops_and_length_limits_inside_accepted_runs(tmp_path):
    path = write_mtp_checkpoint(tmp_path / "exact", "exact", seed=1)
    base, _ = _run(path, None, {f"r{i}": (p, plain(30)) for i, p in enumerate(PROMPTS[:4])})
    requests = {}
    for i, p in enumerate(PROMPTS[:4]):
        requests[f"s{i}"] = (p, plain(30, stop_token_ids=[base[f"r{i}"].outputs[0].token_ids[9 + i]]))
        requests[f"m{i}"] = (p, plain(9 + i))
    off, _ = _run(path, None, requests)
    on, chained = _run(path, 3, requests)
    _assert_same(off, on, "chained vs MTP off")
    assert chained > 0

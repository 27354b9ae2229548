"""Spec steps replayed as CUDA graphs (engine/spec_graph_runner.py) on a tiny fp32 model: greedy tokens and logprobs
equal the eager spec step and MTP off, for k = 1..3, batches inside the buckets, between them (padded) and above
the largest (eager fallback); every KV block freed; drafts still accepted where the MTP weights reproduce the
target ("exact"). The host-side rows are tested on CPU (test_spec_graph_rows.py)."""

from __future__ import annotations

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from longcat_service.engine.spec_graph_runner import SpecGraphRunner  # noqa: E402

PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 40)), [60, 61, 62, 63],
           [90, 3, 3, 8], [44], [120, 121, 122]]
BUCKETS = (1, 2, 4)  # 7 sequences: 5..7 run eagerly, 3 is padded to 4


class CountingGraphs(SpecGraphRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sizes: list[int] = []
        self.greedy_sizes: list[int] = []
        self.sampled_sizes: list[int] = []
        self.seeded_rows = 0  # seeded rows of the sampled steps

    def verify(self, batch):
        self.batch_sizes.append(len(batch))
        return super().verify(batch)

    def greedy_step(self, batch, rooms):
        self.greedy_sizes.append(len(batch))
        return super().greedy_step(batch, rooms)

    def chained_greedy_step(self, batch, prev_packed, prev_starts, prev_rooms):
        self.greedy_sizes.append(len(batch))  # the same greedy graph, inputs from the device (async scheduling)
        return super().chained_greedy_step(batch, prev_packed, prev_starts, prev_rooms)

    def sampled_step(self, batch, rooms, options, dists, seeds=None):
        self.sampled_sizes.append(len(batch))
        self.seeded_rows += sum(seeds[0]) if seeds else 0
        return super().sampled_step(batch, rooms, options, dists, seeds)


def _requests(logprobs: int | None = 2):
    return {f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=6 + 5 * i, ignore_eos=True, logprobs=logprobs))
            for i, p in enumerate(PROMPTS)}


def _run(path, k, graphs: str, requests=None, fuse_greedy: bool = True, buckets=BUCKETS, max_num_seqs: int = 8,
         fuse_sampled: bool = True, wave: int | None = None):
    """graphs: "off" (eager spec steps), "on" (CountingGraphs with BUCKETS) or "" (MTP off: decode graphs).
    wave: run the requests that many at a time, each group to completion (its decode steps then hold no prompt)."""
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    engine = make_engine(model=path, device="cuda", speculative_config=spec, max_num_seqs=max_num_seqs)
    runner = engine.runner
    counting = None
    if k:
        assert runner.spec_decoder.graphs is not None  # the engine built its own spec graphs
        if graphs == "off":
            runner.spec_decoder.graphs = None
        else:
            own = runner.spec_decoder.graphs
            counting = runner.spec_decoder.graphs = CountingGraphs(
                runner.model, runner.kv_caches, runner.mtp_kv_cache, runner.block_size, own.max_blocks, k, buckets)
        runner.spec_decoder.fuse_greedy = fuse_greedy
        runner.spec_decoder.fuse_sampled = fuse_sampled
    requests = requests or _requests()
    ids = list(requests)
    final = {}
    for i in range(0, len(ids), wave or len(ids)):
        final |= run_to_completion(engine, {r: requests[r] for r in ids[i : i + (wave or len(ids))]})[0]
    assert_all_blocks_free(engine)
    return final, counting


def _assert_same(a: dict, b: dict, what: str) -> None:
    for rid in a:
        x, y = a[rid].outputs[0], b[rid].outputs[0]
        assert x.token_ids == y.token_ids, (what, rid)
        assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-3, (what, rid)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["exact", "partial"])
def test_graph_spec_steps_equal_eager_spec_steps_and_mtp_off(tmp_path, mode, k):
    path = write_mtp_checkpoint(tmp_path / mode, mode, seed=1)
    off, _ = _run(path, None, "")
    eager, _ = _run(path, k, "off")
    graphs, counting = _run(path, k, "on")
    _assert_same(off, graphs, "graphs vs MTP off")
    _assert_same(eager, graphs, "graphs vs eager spec")
    assert {1, 3, 4} <= set(counting.batch_sizes) and max(counting.batch_sizes) <= 4
    assert ("verify", 4) in counting.graphs and ("mtp", 4) in counting.graphs
    assert (("draft", 1) in counting.graphs) == (k > 1)
    if mode == "exact":  # the MTP graphs drafted right: every draft accepted
        assert all(o.metrics.spec_acceptance_rate > 0.9 for o in graphs.values())


def test_engine_captures_every_spec_bucket_at_start_up(tmp_path, monkeypatch):
    path = write_mtp_checkpoint(tmp_path / "e", "exact", seed=1)
    engine = make_engine(model=path, device="cuda", max_num_seqs=8,
                         speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    graphs = engine.runner.spec_decoder.graphs
    assert graphs.buckets == (1, 2, 4, 8)
    assert set(graphs.graphs) == {(kind, b) for kind in ("verify", "mtp", "draft", "greedy", "sampled")
                                  for b in graphs.buckets}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["exact", "partial"])
def test_device_greedy_steps_equal_mtp_off(tmp_path, mode, k):
    """Plain-greedy requests (no logprobs): decode spec steps run as one captured graph each (engine/spec_greedy.py),
    tokens equal MTP off and the host-verified graph steps, every block freed."""
    path = write_mtp_checkpoint(tmp_path / mode, mode, seed=1)
    requests = _requests(logprobs=None)
    off, _ = _run(path, None, "", requests)
    fused, counting = _run(path, k, "on", requests)
    host, host_counting = _run(path, k, "on", requests, fuse_greedy=False)
    for rid in off:
        assert off[rid].outputs[0].token_ids == fused[rid].outputs[0].token_ids == host[rid].outputs[0].token_ids, rid
    assert {1, 3, 4} <= set(counting.greedy_sizes) and not counting.batch_sizes  # no host-verified graph step
    assert ("greedy", 4) in counting.graphs and not host_counting.greedy_sizes
    if mode == "exact":  # the drafts of the fused graph are right: every one accepted
        assert all(o.metrics.spec_acceptance_rate == 1.0 for o in fused.values())


@pytest.mark.parametrize("k", [1, 3])
def test_device_sampled_steps_top_k_1_equal_greedy(tmp_path, k, monkeypatch):
    """Sampled rows with top_k = 1 (their draw is the argmax) beside greedy rows: decode spec steps run as the
    captured sampled-step graph (engine/spec_sampled.py); every token equals greedy MTP off, every block freed."""
    path = write_mtp_checkpoint(tmp_path / "p", "partial", seed=1)
    greedy = _requests(logprobs=None)
    requests = {rid: (p, SamplingParams(temperature=0.9, top_k=1, max_tokens=sp.max_tokens, ignore_eos=True))
                if i % 2 else (p, sp) for i, (rid, (p, sp)) in enumerate(greedy.items())}
    off, _ = _run(path, None, "", greedy)
    on, counting = _run(path, k, "on", requests)
    for rid in off:
        assert off[rid].outputs[0].token_ids == on[rid].outputs[0].token_ids, rid
    assert {1, 3, 4} & set(counting.sampled_sizes) and ("sampled", 4) in counting.graphs
    assert not counting.batch_sizes  # no host-verified graph step


def test_device_sampled_steps_keep_the_target_distribution(tmp_path, monkeypatch):
    """600 unseeded requests at temperature 1, top_k 6 ("noisy" drafts, k = 2): tokens 2 and 3 against MTP off by a
    chi-square test of homogeneity (p < 1e-3 rejects: false-alarm rate <= 0.2%); the acceptance metrics are filled
    and the tokens in range."""
    from collections import Counter

    from tests.test_spec_decode_stats import chi_square_p_value

    path = write_mtp_checkpoint(tmp_path / "n", "noisy", seed=5, lm_head_scale=4.0)
    requests = {f"r{i}": ([11, 12, 13], SamplingParams(temperature=1.0, top_k=6, max_tokens=3, ignore_eos=True))
                for i in range(600)}
    torch.manual_seed(0)
    off, _ = _run(path, None, "", requests, max_num_seqs=64)
    torch.manual_seed(1)
    on, counting = _run(path, 2, "on", requests, buckets=(1, 2, 4, 8, 16, 32, 64), max_num_seqs=64)
    assert counting.sampled_sizes and max(counting.sampled_sizes) > 8
    for pos in (1, 2):
        p = chi_square_p_value(Counter(off[r].outputs[0].token_ids[pos] for r in requests),
                               Counter(on[r].outputs[0].token_ids[pos] for r in requests))
        assert p > 1e-3, (pos, p)
    drafts = sum(o.metrics.num_draft_tokens for o in on.values())
    accepted = sum(o.metrics.num_accepted_tokens for o in on.values())
    assert drafts > 0 and 0.05 < accepted / drafts < 0.95
    vocab = 128
    assert all(0 <= t < vocab for o in on.values() for t in o.outputs[0].token_ids)


def test_hashed_uniforms_and_inverse_cdf_on_cuda_equal_cpu():
    """The seeded draws' int64 hash (engine/seeded_draws.py) is bit-identical on CUDA and CPU, its largest inputs
    included; the inverse-CDF draw picks the same tokens."""
    from longcat_service.engine.seeded_draws import ACCEPT, DRAFT, TARGET, RowSeeds, inverse_cdf

    gen = torch.Generator().manual_seed(0)
    seeds = [0, 2**32 - 1, 2**64 - 1] + torch.randint(0, 2**62, (500,), generator=gen).tolist()
    positions = torch.cat((torch.tensor([0, 2**30 - 1]), torch.randint(0, 2**20, (200,), generator=gen)))
    positions = positions[None, :].expand(len(seeds), -1)
    for kind in (ACCEPT, TARGET, DRAFT):
        cpu = RowSeeds.build(seeds, "cpu").uniform(positions, kind)
        cuda = RowSeeds.build(seeds, "cuda").uniform(positions.cuda(), kind)
        assert torch.equal(cuda.cpu(), cpu), kind
    probs = torch.softmax(torch.randn(256, 32000, generator=gen) * 3, dim=-1)
    probs[:, ::3] = 0.0
    u = torch.rand(256, dtype=torch.float64, generator=gen)
    tok = inverse_cdf(probs.cuda(), u.cuda()).cpu()
    assert torch.equal(tok, inverse_cdf(probs, u))
    assert (probs.gather(1, tok[:, None]) > 0).all()


def test_device_sampled_steps_seeded(tmp_path):
    """Seeded requests take the captured sampled-step graph (engine/seeded_draws.py: uniforms hashed from seed and
    token position): 800 seeds at temperature 1, top_k 6 keep the target's distribution (tokens 2..4 against MTP off,
    chi-square, p < 1e-3 rejects: false-alarm rate <= 0.3%); a seeded request (n = 2) gives the same tokens alone,
    beside seeded and unseeded requests, in another bucket set, on the host-verified graph path and in a fresh
    engine."""
    from collections import Counter

    from tests.test_spec_decode_stats import chi_square_p_value

    path = write_mtp_checkpoint(tmp_path / "n", "noisy", seed=5, lm_head_scale=4.0)
    requests = {f"r{i}": ([11, 12, 13], SamplingParams(temperature=1.0, top_k=6, max_tokens=4, ignore_eos=True,
                                                       seed=10_000 + i)) for i in range(800)}
    off, _ = _run(path, None, "", requests, max_num_seqs=64)
    # in waves of 64: after each wave's prompt step, its decode steps are pure (the device step takes every one)
    on, counting = _run(path, 2, "on", requests, buckets=(1, 2, 4, 8, 16, 32, 64), max_num_seqs=64, wave=64)
    assert counting.seeded_rows > 800 and not counting.batch_sizes  # on the device, none host-verified
    for pos in (1, 2, 3):
        p = chi_square_p_value(Counter(off[r].outputs[0].token_ids[pos] for r in requests),
                               Counter(on[r].outputs[0].token_ids[pos] for r in requests))
        assert p > 1e-3, (pos, p)
    assert sum(off[r].outputs[0].token_ids != on[r].outputs[0].token_ids for r in requests) > 200

    x = {"x": (PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=1234,
                                          n=2))}
    seeded = {f"s{i}": (p, SamplingParams(temperature=0.8, top_k=20, max_tokens=10 + i, ignore_eos=True, seed=50 + i))
              for i, p in enumerate(PROMPTS[1:5])}
    unseeded = {f"u{i}": (p, SamplingParams(temperature=0.8, max_tokens=12 + i, ignore_eos=True))
                for i, p in enumerate(PROMPTS[1:5])}
    torch.manual_seed(0)
    alone, counting = _run(path, 2, "on", x)
    want = [c.token_ids for c in alone["x"].outputs]
    assert counting.seeded_rows > 0 and want[0] != want[1]
    for name, kw in {"restart": dict(requests=x), "seeded": dict(requests=x | seeded),
                     "unseeded": dict(requests=x | unseeded), "bucket 8": dict(requests=x | seeded, buckets=(8,)),
                     "host path": dict(requests=x | unseeded, fuse_sampled=False)}.items():
        torch.manual_seed(1)
        final, counting = _run(path, 2, "on", **kw)
        assert [c.token_ids for c in final["x"].outputs] == want, name
        assert (counting.seeded_rows > 0) == (name != "host path"), name

"""The device-side greedy spec step (engine/spec_greedy.py, issue 17): the plain-greedy predicate, the step's tensor
logic on hand-made logits, and whole engines whose plain-greedy decode batches take it (through the eager twin of
the spec graphs, tests/spec_rows_twin.py, and once through the production SpecGraphRunner with the Triton kernels
interpreted): tokens equal MTP off, the draft metrics equal the host-verified path, blocks come back free, and a
batch with any other row still takes the host-verified path."""

from __future__ import annotations

import pytest
import torch

from longcat_service.engine.sampler import Sampler, SamplingRow
from longcat_service.engine.spec_greedy import NO_LIMIT, GreedyLayout, draft_room, greedy_spec_step, slot_at
from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.spec_rows_twin import EagerSpecRows, install_uncaptured_spec_graphs, interpreted_triton_only

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread

EOS = 2


# ---- the predicate -----------------------------------------------------------------------------------------------
PLAIN = [
    (dict(temperature=0.0), 0),
    (dict(temperature=1e-6), 0),  # below GREEDY_TEMPERATURE_EPS: greedy
    (dict(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, seed=7), 0),  # nothing that changes an argmax
    (dict(temperature=0.0, min_tokens=3), 3),  # min_tokens reached
    (dict(temperature=0.0, min_tokens=3, ignore_eos=True), 0),  # below min_tokens, but nothing to mask
]
NOT_PLAIN = [
    (dict(temperature=0.5), 0),
    (dict(temperature=0.0, logprobs=0), 0),
    (dict(temperature=0.0, logit_bias={1: 1.0}), 0),
    (dict(temperature=0.0, repetition_penalty=1.1), 0),
    (dict(temperature=0.0, frequency_penalty=0.1), 0),
    (dict(temperature=0.0, presence_penalty=-0.1), 0),
    (dict(temperature=0.0, min_tokens=3), 2),  # EOS still masked
    (dict(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=[5]), 2),  # a stop id still masked
]


@pytest.mark.parametrize(("kw", "outputs"), PLAIN)
def test_plain_greedy_rows_draw_the_raw_argmax(kw, outputs):
    sampler = Sampler(16, EOS, "cpu")
    params = SamplingParams(**kw)
    assert sampler.plain_greedy(params, outputs)
    # what the predicate promises: the sampler's distribution is the point mass at the raw logits' argmax
    gen = torch.Generator().manual_seed(len(str(kw)))
    logits = torch.randn(6, 16, generator=gen)
    logits[:, EOS] = 10.0  # EOS is every row's argmax
    rows = [SamplingRow(params, [1, 3], [4] * outputs)] * 6
    point = torch.zeros(6, 16).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    assert torch.equal(sampler.probabilities(logits, rows), point)
    assert sampler(logits, rows)[0] == [EOS] * 6


@pytest.mark.parametrize(("kw", "outputs"), NOT_PLAIN)
def test_other_rows_are_not_plain_greedy(kw, outputs):
    assert not Sampler(16, EOS, "cpu").plain_greedy(SamplingParams(**kw), outputs)


def test_min_tokens_without_an_eos_id_masks_nothing():
    params = SamplingParams(temperature=0.0, min_tokens=3)
    assert Sampler(16, None, "cpu").plain_greedy(params, 0)
    assert not Sampler(16, None, "cpu").plain_greedy(SamplingParams(temperature=0.0, min_tokens=3,
                                                                     stop_token_ids=[4]), 0)


# ---- the host-side helpers ----------------------------------------------------------------------------------------
def test_draft_room_is_the_tightest_limit_minus_the_tokens_and_one():
    assert draft_room(10, 15, None) == 4  # 15 tokens at most: after emitting c, min(k, 4 - c) drafts
    assert draft_room(10, None, 12) == 1
    assert draft_room(10, 15, 12) == 1
    assert draft_room(10, None, None) == NO_LIMIT - 11


def test_slot_at_reads_the_block_table_on_the_device():
    tables = torch.tensor([[7, 2, 5], [4, 0, 0]], dtype=torch.int32)
    pos = torch.tensor([9, 3])
    assert slot_at(tables, pos, 4).tolist() == [5 * 4 + 1, 4 * 4 + 3]
    assert slot_at(tables[[0, 0, 0]], torch.tensor([0, 4, 11]), 4).tolist() == [28, 8, 23]


def test_layout_unpacks_the_real_tokens_and_drafts():
    layout = GreedyLayout(2)
    assert layout.width == 7
    assert layout.unpack([11, 12, 13, 2, 40, 41, 1]) == ([11, 12], [40])
    assert layout.unpack([0, 0, 0, 0, 0, 0, 0]) == ([], [])


# ---- the step's tensor logic on hand-made logits --------------------------------------------------------------------
V, BS, K = 32, 4, 2


def _step(nonfinite: dict[int, str] | None = None):
    """3 sequences and a padding one (bucket 4), k = 2. The forwards are fakes: the verify 'hidden state' is the
    logits (one-hot rows), and the MTP block returns one_hot((token * 3 + position) % V), so every draft is known."""
    #       seq 0: last 10, drafts 11, 12 at 5..7   seq 1: last 20, draft 21 at 2..3   seq 2: last 30 at 7
    ids = torch.tensor([10, 11, 12, 20, 21, 0, 30, 0, 0, 0, 0, 0])
    positions = torch.tensor([5, 6, 7, 2, 3, 0, 7, 0, 0, 0, 0, 0])
    tables = torch.zeros(12, 3, dtype=torch.int32)
    for rows, table in (((0, 1, 2), [3, 6, 1]), ((3, 4), [4, 9, 0]), ((6,), [2, 5, 8])):
        for r in rows:
            tables[r] = torch.tensor(table, dtype=torch.int32)
    target = [11, 12, 13, 22, 7, 0, 9, 0, 0, 0, 0, 0]  # seq 0 accepts both drafts, seq 1 rejects its draft
    logits = torch.zeros(12, V)
    for r, t in enumerate(target):
        if r in (0, 1, 2, 3, 4, 6):
            logits[r, t] = 1.0
    for r, bad in (nonfinite or {}).items():
        if bad == "-inf row":  # every token masked
            logits[r] = float("-inf")
        else:
            logits[r, 0] = float(bad)
    seq_info = torch.tensor([[2, 1, 0, -1], [4, 100, 1, 0]])  # drafts (-1: padding), draft room
    calls = []

    def mtp(tok, hidden, pos, slots, lens, tabs):
        calls.append(dict(tok=tok.tolist(), pos=pos.tolist(), slots=slots.tolist(), lens=lens.tolist(),
                          tables=tabs.tolist()))
        return torch.nn.functional.one_hot((tok * 3 + pos) % V, V).float()

    out = greedy_spec_step(K, BS, lambda: logits, mtp, lambda h: h.float(), ids, positions, tables, seq_info)
    return out.tolist(), calls


def test_greedy_step_accepts_emits_and_drafts_on_the_device():
    out, calls = _step()
    # emitted (k+1), count, drafts (k), draft count
    assert out[0] == [11, 12, 13, 3, (13 * 3 + 7) % V, (14 * 3 + 0) % V, 1]  # room 4 - 3 emitted: 1 draft
    assert out[1] == [22, 7, 0, 1, (22 * 3 + 2) % V, (4 * 3 + 3) % V, 2]  # draft 1 = 4; pass 2 at position 3
    assert out[2][:4] == [9, 0, 0, 1] and out[2][6] == 0  # room 1 - 1 emitted: no draft
    assert out[3][3] == 0 and out[3][6] == 0  # padding: nothing
    first, second = calls
    # MTP over the flat rows: emitted token j at position start + j, the slot of position + 1, length position + 2
    assert first["tok"][:7] == [11, 12, 13, 22, 7, 0, 9]
    assert first["slots"] == [6 * 4 + 2, 6 * 4 + 3, 1 * 4 + 0, 4 * 4 + 3, -1, -1, 8 * 4 + 0] + [-1] * 5
    assert first["lens"] == [7, 8, 9, 4, 0, 0, 9] + [0] * 5
    # the recursive pass: only seq 1 (2 drafts) at MTP position start + count = 3 (slot of 4 = block 9)
    assert second["tok"] == [(13 * 3 + 7) % V, 4, (9 * 3 + 7) % V, 0]
    assert second["pos"] == [0, 3, 0, 0]
    assert second["slots"] == [-1, 9 * 4 + 0, -1, -1] and second["lens"] == [0, 5, 0, 0]
    assert second["tables"][1] == [4, 9, 0]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf row"])
def test_a_non_finite_stopping_row_emits_nothing(bad):
    out, calls = _step({3: bad})  # seq 1's first verify row (where it stops: its draft is rejected)
    assert out[1][3] == 0 and out[1][6] == 0  # seq 1 failed: no token, no drafts
    assert calls[0]["slots"][3] == -1  # ... and no MTP cache entry
    assert out[0][3] == 3 and out[2][3] == 1  # the other sequences go on


def test_a_single_minus_inf_logit_is_finite():
    out, _ = _step({3: "-inf"})  # one masked token: the row max is still finite
    assert out[1][:4] == [22, 7, 0, 1]


def test_a_non_finite_row_after_accepted_drafts_fails_the_sequence():
    out, _ = _step({1: "nan"})  # seq 0: draft 1 accepted at row 0, row 1 NaN stops it
    assert out[0][3] == 0
    out, _ = _step({2: "inf"})  # the bonus row
    assert out[0][3] == 0


# ---- whole engines ------------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 26)), [60, 61, 62, 63],
           [90, 3, 3, 8], [44], [120, 121, 122]]
TWIN_BUCKETS = (1, 2, 4)  # 7 sequences: the first steps run above the largest bucket (eager), 3 is padded to 4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_greedy")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("random", "exact", "partial")}


def plain(max_tokens: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def plain_requests() -> dict:
    return {f"r{i}": (p, plain(6 + 4 * i)) for i, p in enumerate(PROMPTS)}


def run(path, k: int | None, requests: dict, fused: bool = True, **engine_kw):
    engine = make_engine(model=path, speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None,
                         **engine_kw)
    twin = None
    if k:
        twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, k, TWIN_BUCKETS)
        engine.runner.spec_decoder.fuse_greedy = fused
    final, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    assert engine.runner.spec_decoder is None or engine.runner.spec_decoder.draft_probs == {}
    return final, twin


def assert_same_tokens(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        for x, y in zip(a[rid].outputs, b[rid].outputs, strict=True):
            assert x.token_ids == y.token_ids, rid
            assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason), rid


def draft_metrics(final: dict) -> dict:
    return {rid: (o.metrics.num_draft_tokens, o.metrics.num_accepted_tokens) for rid, o in final.items()}


@pytest.fixture(scope="module")
def off_plain(ckpts):
    return {mode: run(path, None, plain_requests())[0] for mode, path in ckpts.items()}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["random", "exact", "partial"])
def test_greedy_steps_equal_mtp_off_and_the_host_verified_steps(ckpts, off_plain, mode, k):
    fused, twin = run(ckpts[mode], k, plain_requests())
    host, host_twin = run(ckpts[mode], k, plain_requests(), fused=False)
    assert_same_tokens(off_plain[mode], fused)
    assert_same_tokens(off_plain[mode], host)
    # every decode batch that fits a bucket took the device-side step: none was verified on the host
    assert twin.calls["greedy"] > 0 and twin.calls["verify"] == 0 and host_twin.calls["greedy"] == 0
    assert {1, 3, 4} <= set(twin.greedy_sizes) and max(twin.greedy_sizes) <= 4
    # (with async scheduling, at its default, some of them chained to the one before: spec_chain.py)
    assert twin.calls["greedy"] + twin.calls["chained_greedy"] == host_twin.calls["verify"]
    # the acceptance metrics count the same drafts and acceptances as the host-verified path
    assert draft_metrics(fused) == draft_metrics(host)
    drafts = sum(d for d, _ in draft_metrics(fused).values())
    rate = sum(a for _, a in draft_metrics(fused).values()) / drafts
    if mode == "exact":
        assert rate == 1.0 and all(o.metrics.spec_mean_accepted_length > 1 for o in fused.values())
    elif mode == "random":
        assert rate < 0.2
    else:
        assert 0.1 < rate < 0.9


def test_stop_id_and_max_tokens_inside_an_accepted_run(ckpts):
    p = ckpts["exact"]
    base, _ = run(p, None, {f"r{i}": (prompt, plain(30)) for i, prompt in enumerate(PROMPTS[:4])})
    requests = {}
    for i, prompt in enumerate(PROMPTS[:4]):  # a stop on the 6th token, a length limit of 5 (inside a k=3 run)
        requests[f"s{i}"] = (prompt, plain(30, stop_token_ids=[base[f"r{i}"].outputs[0].token_ids[5]]))
        requests[f"m{i}"] = (prompt, plain(5))
    off, _ = run(p, None, requests)
    on, twin = run(p, 3, requests)
    assert twin.calls["greedy"] > 0 and twin.calls["verify"] == 0
    assert_same_tokens(off, on)
    assert all(len(on[f"m{i}"].outputs[0].token_ids) == 5 for i in range(4))
    assert any(on[f"s{i}"].outputs[0].finish_reason == "stop" for i in range(4))


def test_max_model_len_bounds_the_drafts(ckpts):
    """Sequences running into max_model_len: the device-side draft counts stop at the limit (the scheduler's
    blocks end there) and the outputs equal MTP off."""
    requests = {f"r{i}": (p, plain(None)) for i, p in enumerate(PROMPTS[:3])}  # until the context's end
    off, _ = run(ckpts["exact"], None, requests, max_model_len=30)
    on, twin = run(ckpts["exact"], 3, requests, max_model_len=30)
    assert twin.calls["greedy"] > 0
    assert_same_tokens(off, on)
    assert all(len(PROMPTS[i]) + len(on[f"r{i}"].outputs[0].token_ids) == 30 for i in range(3))


def test_a_batch_with_any_other_row_takes_the_host_verified_path(ckpts):
    """A sampled row (seeded), a logprobs row and a min_tokens row beside plain-greedy ones: their batches are
    verified on the host; once the sampled and logprobs rows are done and min_tokens is reached, the device-side
    step takes over. Everything equals the host-verified engine, the greedy rows equal MTP off."""
    p = ckpts["partial"]
    requests = {f"g{i}": (prompt, plain(24)) for i, prompt in enumerate(PROMPTS[:3])}
    requests["sampled"] = (PROMPTS[3], SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=3))
    requests["logprobs"] = (PROMPTS[4], plain(5, logprobs=1))
    requests["min"] = (PROMPTS[5], SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12,
                                                  stop_token_ids=[5, 6, 7]))
    fused, twin = run(p, 2, requests)
    host, _ = run(p, 2, requests, fused=False)
    off, _ = run(p, None, requests)
    assert twin.calls["verify"] > 0 and twin.calls["greedy"] > 0
    assert_same_tokens(host, fused)
    assert_same_tokens({r: off[r] for r in off if r != "sampled"}, {r: fused[r] for r in fused if r != "sampled"})
    for a, b in zip(host["logprobs"].outputs[0].logprobs, fused["logprobs"].outputs[0].logprobs, strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5


def test_non_finite_logits_in_a_greedy_step_fail_the_request(ckpts):
    """As the sampler's rule: a request whose verify logits are not finite fails with an error, its blocks come
    back, and the engine serves the next request as MTP off does."""
    p = ckpts["partial"]
    engine = make_engine(model=p, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    twin = engine.runner.spec_decoder.graphs = EagerSpecRows(engine.runner, 2, TWIN_BUCKETS)
    engine.add_request("bad", [5, 6, 7], plain(10))
    while not engine.states["bad"].group.seqs[0].output_token_ids:
        engine.step()  # the prompt step (eager) gives the first token
    model = engine.runner.model
    compute_logits = model.compute_logits

    def poisoned(h):  # the verify rows of a 1-sequence bucket (k + 1 = 3 rows): NaN
        out = compute_logits(h)
        return torch.full_like(out, float("nan")) if h.shape[0] == 3 else out

    model.compute_logits = poisoned
    def device_steps():  # (with async scheduling a step may be chained to the one before: spec_chain.py)
        return twin.calls["greedy"] + twin.calls["chained_greedy"]

    before = device_steps()  # (with overlap_steps one greedy step may be in flight already)
    final, _ = run_to_completion(engine, {})
    del model.compute_logits  # the class method again
    assert device_steps() > before and twin.calls["verify"] == 0
    assert final["bad"].outputs[0].finish_reason == "error" and "not finite" in final["bad"].error
    assert_all_blocks_free(engine)
    requests = {"ok": (PROMPTS[0], plain(10))}
    off, _ = run(p, None, requests)
    on, _ = run_to_completion(engine, requests)
    assert_same_tokens(off, on)
    assert_all_blocks_free(engine)


@pytest.mark.slow
@interpreted_triton_only
def test_the_production_graph_runner_uncaptured_equals_mtp_off(ckpts, monkeypatch):
    """SpecGraphRunner itself (as on CUDA, minus the capture: its forwards on its static buffers, the Triton decode
    kernels interpreted on CPU) runs the device-side greedy steps of an engine: tokens equal MTP off."""

    p = ckpts["partial"]
    requests = {"a": (PROMPTS[0], plain(5)), "b": (PROMPTS[1], plain(2))}
    off, _ = run(p, None, requests)
    engine = make_engine(model=p, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    graphs = install_uncaptured_spec_graphs(engine, monkeypatch, 2)
    sizes = []
    greedy_step = graphs.greedy_step
    monkeypatch.setattr(graphs, "greedy_step", lambda batch, rooms: (sizes.append(len(batch)), greedy_step(batch,
                                                                                                           rooms))[1])
    on, _ = run_to_completion(engine, requests)
    assert_all_blocks_free(engine)
    assert_same_tokens(off, on)
    assert 2 in sizes and 1 in sizes and not graphs.use_graphs


def test_a_greedy_graph_that_fails_to_capture_disables_only_the_greedy_step(ckpts, monkeypatch):
    from longcat_service.engine.spec_graph_runner import SpecGraphRunner

    engine = make_engine(model=ckpts["exact"], speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    r = engine.runner
    graphs = SpecGraphRunner(r.model, r.kv_caches, r.mtp_kv_cache, r.block_size, 16, 2, (1, 2))
    captured = []

    def capture(kind, b):
        if kind == "greedy":
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append((kind, b))

    monkeypatch.setattr(graphs, "capture", capture)
    graphs.capture_all()
    assert not graphs.greedy_ok
    assert graphs.sampled_ok  # the sampled step's graph is captured (and fails) on its own
    assert sorted(captured) == sorted((kind, b) for kind in ("verify", "mtp", "draft", "sampled") for b in (1, 2))
    monkeypatch.setattr(graphs, "capture", lambda kind, b: (_ for _ in ()).throw(AssertionError("no capture")))
    monkeypatch.setattr(graphs, "use_graphs", False)
    r.spec_decoder.graphs = graphs
    greedy_calls, verify = [], graphs.verify
    monkeypatch.setattr(graphs, "greedy_step", lambda *a: greedy_calls.append(a))
    monkeypatch.setattr(graphs, "verify", lambda batch: (greedy_calls.append("verify"), verify(batch))[1])
    requests = {"a": (PROMPTS[1], plain(2))}
    off, _ = run(ckpts["exact"], None, requests)
    from longcat_service.layers import fast_decode as fast_decode_mod
    from longcat_service.layers import layernorm as layernorm_mod

    monkeypatch.setattr(fast_decode_mod, "fast_path_enabled", lambda t: True)
    monkeypatch.setattr(layernorm_mod, "fast_path_enabled", lambda t: True)
    on, _ = run_to_completion(engine, requests)  # the host-verified graph steps (uncaptured here)
    assert_same_tokens(off, on)
    assert greedy_calls and all(c == "verify" for c in greedy_calls)


def test_capture_all_captures_every_kind_of_every_bucket(ckpts, monkeypatch):
    """Start-up capture covers the sampled step too (its q buffer is allocated), and the decoder fuses both kinds."""
    from longcat_service.engine.spec_graph_runner import SpecGraphRunner

    engine = make_engine(model=ckpts["exact"], speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    r = engine.runner
    graphs = SpecGraphRunner(r.model, r.kv_caches, r.mtp_kv_cache, r.block_size, 16, 2, (1, 2))
    captured = []
    monkeypatch.setattr(graphs, "capture", lambda kind, b: captured.append((kind, b)))
    graphs.capture_all()
    assert graphs.sampled_ok and graphs.draft_dists.shape == (graphs.max_batch, 2, r.config.vocab_size)
    assert sorted(captured) == sorted((kind, b) for kind in ("verify", "mtp", "draft", "greedy", "sampled")
                                      for b in (1, 2))
    assert r.spec_decoder.fuse_greedy and r.spec_decoder.fuse_sampled

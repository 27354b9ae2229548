"""MTP speculative decoding under tensor parallelism on CPU (gloo, two local ranks): the MTP layer is split like a
decoder layer (its attention heads and dense MLP sharded), the workers follow rank 0's verification and drafts
mid-step, and greedy tokens and logprobs equal TP=1 with MTP and MTP off, for k = 1 and 2, with drafts always
accepted ("exact") and sometimes ("partial"), across a prefix-cache hit, with every KV block freed."""

from __future__ import annotations

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import assert_all_blocks_free, make_engine, run_to_completion
from tests.mtp_checkpoint import write_mtp_checkpoint
from tests.tp_harness import run_on_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread

PROMPTS = [[5, 17, 100, 31, 9, 77, 31, 45, 12, 40, 23], [101, 102], list(range(7, 26)), [60, 61, 62, 63]]
SHARED = list(range(20, 38))  # a second wave shares this prefix with the first: a prefix-cache hit
ENGINE = dict(block_size=4, num_kv_blocks=96, max_model_len=64)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)


def waves() -> list[dict]:
    first = {f"r{i}": (p, greedy(14)) for i, p in enumerate(PROMPTS)}
    first["r1"] = (PROMPTS[1] + [7, 9, 11], SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2,
                                                          prompt_logprobs=2))
    first["a"] = (SHARED + [3], greedy(10))
    seeded = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, ignore_eos=True, seed=11, logprobs=1)
    return [first, {"b": (SHARED + [4, 5], greedy(10)), "s": (PROMPTS[0], seeded)}]


def generate(path, k: int | None, tp: int = 1, device: str = "cpu", **engine_kw) -> tuple[dict, dict]:
    """Outputs of both waves and the engine's step facts: cached tokens of "b", preemptions."""
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    engine = make_engine(model=path, speculative_config=spec, tensor_parallel_size=tp, device=device,
                         **{**ENGINE, **engine_kw})
    preempt = engine.scheduler._preempt
    preempted = []
    engine.scheduler._preempt = lambda seq: (preempted.append(seq), preempt(seq))
    try:
        final = {}
        for wave in waves():
            out, _ = run_to_completion(engine, wave)
            final.update(out)
        assert_all_blocks_free(engine)
    finally:
        if tp > 1:
            engine.runner.close()
    graphs = getattr(engine.runner.spec_decoder, "graphs", None)
    return final, {"cached_b": final["b"].num_cached_tokens, "preempted": len(preempted),
                   "spec_graphs": sorted(graphs.graphs) if graphs is not None else []}


def assert_same(ref: dict, got: dict) -> None:
    assert ref.keys() == got.keys()
    for rid in ref:
        if ref[rid].prompt_logprobs:
            for x, y in zip(ref[rid].prompt_logprobs[1:], got[rid].prompt_logprobs[1:], strict=True):
                assert abs(x.logprob - y.logprob) < 1e-4, rid
        a, b = ref[rid].outputs[0], got[rid].outputs[0]
        assert a.token_ids == b.token_ids, rid
        assert len(a.logprobs) == len(b.logprobs)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4, rid


def accepted(final: dict) -> float:
    greedy_ids = [rid for rid in final if rid != "s"]
    drafts = sum(final[r].metrics.num_draft_tokens for r in greedy_ids)
    return sum(final[r].metrics.num_accepted_tokens for r in greedy_ids) / drafts


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_spec")
    return {mode: write_mtp_checkpoint(root / mode, mode, seed=1) for mode in ("exact", "partial")}


@pytest.mark.parametrize(("mode", "k"), [("exact", 1), ("exact", 2), ("partial", 2)])
def test_tp2_with_mtp_equals_tp1_with_mtp_and_mtp_off(ckpts, mode, k):
    off, _ = generate(ckpts[mode], None)
    tp1, facts = generate(ckpts[mode], k)
    tp2, tp2_facts = generate(ckpts[mode], k, tp=2)
    greedy_ids = [rid for rid in off if rid != "s"]
    assert_same({r: off[r] for r in greedy_ids}, {r: tp2[r] for r in greedy_ids})
    assert_same(tp1, tp2)  # the seeded sampled request too: rank 0 samples exactly as at TP=1
    assert tp2_facts["cached_b"] == facts["cached_b"] > 0  # "b" hit the prefix cache under TP too
    rate = accepted(tp2)
    if mode == "exact":
        assert rate == 1.0
    else:  # both the accept and the reject path ran under TP
        assert 0.1 < rate < 0.9


def test_tp2_with_mtp_under_preemption_and_a_small_token_budget(ckpts):
    """A cache small enough to preempt (tables resent), chunked prompts and drafts cut to the token budget."""
    small = dict(num_kv_blocks=16, max_num_batched_tokens=10)
    off, _ = generate(ckpts["partial"], None, **small)
    tp2, facts = generate(ckpts["partial"], 3, tp=2, **small)
    greedy_ids = [rid for rid in off if rid != "s"]
    assert_same({r: off[r] for r in greedy_ids}, {r: tp2[r] for r in greedy_ids})
    assert facts["preempted"] > 0


def _mtp_shard_shapes(path: str) -> dict:
    from longcat_service.model.loader import load_model

    model = load_model(path, dtype="float32", device="cpu", mtp=True)
    layer = model.mtp.layer
    return {"q_b_proj": tuple(layer.self_attn.q_b_proj.weight.shape),
            "o_proj": tuple(layer.self_attn.o_proj.weight.shape),
            "down_proj": tuple(layer.mlp.down_proj.weight.shape),
            "gate_up": tuple(layer.mlp.gate_up_proj.weight.shape)}


def test_mtp_layer_is_split_like_a_decoder_layer(ckpts):
    from longcat_service.model.loader import load_model

    full = load_model(str(ckpts["exact"]), dtype="float32", device="cpu", mtp=True).mtp.layer
    shards = run_on_ranks(2, _mtp_shard_shapes, str(ckpts["exact"]))
    assert shards["q_b_proj"] == (full.self_attn.q_b_proj.weight.shape[0] // 2, full.self_attn.q_b_proj.weight.shape[1])
    assert shards["o_proj"] == (full.self_attn.o_proj.weight.shape[0], full.self_attn.o_proj.weight.shape[1] // 2)
    assert shards["down_proj"] == (full.mlp.down_proj.weight.shape[0], full.mlp.down_proj.weight.shape[1] // 2)
    assert shards["gate_up"] == (full.mlp.gate_up_proj.weight.shape[0] // 2, full.mlp.gate_up_proj.weight.shape[1])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_with_mtp_on_two_gpus_equals_mtp_off(ckpts):
    """The same over NCCL (model collectives) with the gloo step channel carrying rank 0's decisions."""
    off, _ = generate(ckpts["exact"], None, device="cuda")
    tp1, _ = generate(ckpts["exact"], 2, device="cuda")
    tp2, _ = generate(ckpts["exact"], 2, tp=2, device="cuda")
    for ref in (off, tp1):
        for rid in (r for r in ref if r != "s"):
            a, b = ref[rid].outputs[0], tp2[rid].outputs[0]
            assert a.token_ids == b.token_ids, rid
            assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
    assert accepted(tp2) > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("k", [1, 2])
def test_tp2_spec_graphs_on_two_gpus_equal_mtp_off(ckpts, monkeypatch, k):
    """LONGCAT_TP_CUDA_GRAPHS=1: every rank captures the host-verified spec-step graphs (NCCL collectives inside) and
    replays them in lockstep; greedy tokens equal MTP off, drafts all accepted."""
    monkeypatch.setenv("LONGCAT_TP_CUDA_GRAPHS", "1")  # inherited by the spawned rank
    off, _ = generate(ckpts["exact"], None, device="cuda")
    tp2, facts = generate(ckpts["exact"], k, tp=2, device="cuda")
    assert facts["spec_graphs"] and {kind for kind, _ in facts["spec_graphs"]} == (
        {"verify", "mtp", "draft"} if k > 1 else {"verify", "mtp"})
    for rid in (r for r in off if r != "s"):
        a, b = off[rid].outputs[0], tp2[rid].outputs[0]
        assert a.token_ids == b.token_ids, rid
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
    assert accepted(tp2) > 0.9

"""Numeric edges of sampling (issue 14, defects 3 and 7): tiny temperatures sample greedily, non-finite logits fail
their own request only, and stop ids are masked until min_tokens."""

import pytest
import torch

from longcat_service.engine.sampler import NONFINITE_TOKEN, Sampler, SamplingRow
from longcat_service.llm import LLM
from longcat_service.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams, SamplingParamsError

VOCAB = 8


def _rows(params_list):
    return [SamplingRow(p, [], []) for p in params_list]


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-45, 1e-6])
def test_a_temperature_below_the_epsilon_is_greedy_in_the_sampler(temperature):
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1)) * 30
    tokens, _ = Sampler(VOCAB, None, "cpu")(logits, _rows([SamplingParams(temperature=temperature)] * 6))
    assert tokens == logits.argmax(-1).tolist()


def test_a_temperature_just_above_the_epsilon_samples_finite_tokens():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(2)) * 30
    t = GREEDY_TEMPERATURE_EPS * 1.01
    tokens, _ = Sampler(VOCAB, None, "cpu")(logits, _rows([SamplingParams(temperature=t)] * 64))
    # large logits over a tiny temperature: the distribution is one-hot at the argmax, never NaN
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_row_with_non_finite_logits_gets_no_token_and_the_others_do(poison):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    logits[1, 4] = poison
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, logprobs=2), SamplingParams(top_p=0.5)]
    tokens, logprobs = Sampler(VOCAB, None, "cpu", seed=1)(logits, _rows(params))
    assert tokens[1] == NONFINITE_TOKEN and logprobs[1] is None
    assert tokens[0] == int(logits[0].argmax())
    assert 0 <= tokens[2] < VOCAB


def test_a_row_with_every_token_masked_gets_no_token():
    # min_tokens masks the stop ids and EOS (7): here they are the whole vocabulary
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=list(range(VOCAB - 1)))
    tokens, _ = Sampler(VOCAB, VOCAB - 1, "cpu")(torch.randn(1, VOCAB), _rows([params]))
    assert tokens == [NONFINITE_TOKEN]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, num_kv_blocks=128)


def test_offline_temperature_1e_39_equals_greedy(llm):
    greedy = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    tiny = llm.generate("Hello", SamplingParams(temperature=1e-39, max_tokens=6, ignore_eos=True, seed=5))
    assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_nan_logits_fail_that_request_only_and_the_engine_keeps_serving(llm, monkeypatch):
    poisoned = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    healthy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    sampler = llm.engine.runner.sampler
    real_launch = sampler.launch
    calls = []

    def launch_with_nan(logits, rows, pending_tokens=None):
        calls.append(len(rows))
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.params is poisoned and len(row.output_token_ids) + row.num_pending == 2:  # the third token
                logits[i, 3] = float("nan")
        return real_launch(logits, rows, pending_tokens)

    prompts = ["The cat", "Hello world", "A dog"]
    expected = llm.generate(prompts, healthy)
    monkeypatch.setattr(sampler, "launch", launch_with_nan)
    outs = llm.generate(prompts, [healthy, poisoned, healthy])
    assert max(calls) == 3  # the three requests shared steps
    failed = outs[1].outputs[0]
    assert failed.finish_reason == "error" and "not finite" in outs[1].error
    assert len(failed.token_ids) == 2  # the tokens before the NaN; none made up from it
    assert failed.token_ids == expected[1].outputs[0].token_ids[:2]
    for i in (0, 2):
        assert outs[i].outputs[0].finish_reason == "length" and outs[i].error is None
        assert outs[i].outputs[0].token_ids == expected[i].outputs[0].token_ids
    monkeypatch.undo()
    again = llm.generate(prompts, healthy)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_min_tokens_masks_stop_ids_covering_most_of_the_vocabulary(llm):
    first = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0]
    allowed = {first.outputs[0].token_ids[0], 42}
    stop_ids = [i for i in range(llm.engine.vocab_size) if i not in allowed]
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=stop_ids))
    tokens = out[0].outputs[0].token_ids
    # the first 3 tokens are drawn from the unmasked ones only; the 4th may be a stop id and ends the sample
    assert all(t in allowed for t in tokens[:3]), tokens
    assert out[0].outputs[0].finish_reason == "stop" and len(tokens) == 4 and tokens[3] in stop_ids


def test_min_tokens_with_stop_ids_covering_the_whole_vocabulary_is_rejected(llm):
    everything = list(range(llm.engine.vocab_size))
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):
        llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=everything))
    eos = llm.engine.eos_token_id
    all_but_eos = [i for i in everything if i != eos]
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):  # EOS is masked too unless ignore_eos
        llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=all_but_eos))
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, ignore_eos=True,
                                               stop_token_ids=all_but_eos))
    assert out[0].outputs[0].token_ids[:3] == [eos] * 3  # the one token left: EOS, ignored
    # without min_tokens nothing is masked: the first token stops the sample
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=everything))
    assert out[0].outputs[0].finish_reason == "stop" and len(out[0].outputs[0].token_ids) == 1


def test_offline_max_tokens_beyond_the_context_is_a_clear_error(llm):
    with pytest.raises(SamplingParamsError, match=r"max_tokens: .*context length of 256 tokens.*at most 254 fit"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=10**9))
    with pytest.raises(ValueError, match="max_tokens"):  # SamplingParamsError is a ValueError
        llm.generate([[5] * 200], SamplingParams(max_tokens=57))
    assert not llm.engine.has_unfinished_requests()
    fits = llm.generate([[5] * 200], SamplingParams(max_tokens=56, temperature=0.0, ignore_eos=True))
    assert len(fits[0].outputs[0].token_ids) == 56
    # the default max_tokens (16) is not refused near the context's end: the sample ends there
    out = llm.generate([[5] * 250], SamplingParams(temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 6


POISON_SEED = 4242  # requests with this seed get NaN logits from their second output token on


def _poison_seeded_rows(engine) -> None:
    """engine_hook: NaN logits for the rows of requests seeded POISON_SEED (a stand-in for a model fault)."""
    sampler = engine.runner.sampler
    real_launch = sampler.launch

    def launch(logits, rows, pending_tokens=None):
        bad = [i for i, r in enumerate(rows)
               if r.params.seed == POISON_SEED and len(r.output_token_ids) + r.num_pending >= 1]
        if bad:
            logits = logits.clone()
            logits[bad, 0] = float("nan")
        return real_launch(logits, rows, pending_tokens)

    sampler.launch = launch


def test_over_grpc_nan_logits_fail_that_call_with_a_clear_message_and_the_server_keeps_serving():
    import threading

    import grpc

    from longcat_service.client import LongCatClient
    from longcat_service.engine.async_engine import AsyncEngine
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.server.app import ServerConfig
    from longcat_service.server.background import BackgroundServer
    from longcat_service.server.generated import longcat_pb2 as pb
    from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc

    args = EngineArgs(device="cpu", max_model_len=256, num_kv_blocks=64, engine_mode="thread",
                      engine_hook=_poison_seeded_rows)
    with BackgroundServer(lambda: AsyncEngine(args), ServerConfig(port=0)) as srv, \
            grpc.insecure_channel(srv.address) as channel, LongCatClient(srv.address, timeout=60) as client:
        healthy = {}
        neighbour = threading.Thread(target=lambda: healthy.update(
            r=client.generate("a neighbour", max_tokens=24, temperature=0.0, ignore_eos=True)))
        neighbour.start()
        request = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(
            max_tokens=24, temperature=0.0, seed=POISON_SEED, ignore_eos=True))
        responses = []
        with pytest.raises(grpc.RpcError) as err:
            for r in pb_grpc.LongCatStub(channel).Generate(request, timeout=60):
                responses.append(r)
        neighbour.join(60)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        complete = [r.complete for r in responses if r.WhichOneof("response") == "complete"]
        assert len(complete) == 1 and complete[0].finish_reason == pb.FINISH_REASON_ERROR
        assert "not finite" in complete[0].error_message
        assert sum(len(r.chunk.token_ids) for r in responses if r.WhichOneof("response") == "chunk") == 1
        assert healthy["r"].finish_reason == "length" and len(healthy["r"].token_ids) == 24
        assert client.health() == "SERVING"
        again = client.generate("hello", max_tokens=4, temperature=0.0, ignore_eos=True)
        assert again.finish_reason == "length" and len(again.token_ids) == 4


def test_the_kv_blocks_of_a_request_with_non_finite_logits_leave_the_prefix_cache(llm, monkeypatch):
    from longcat_service.engine.sequence import Sequence, SequenceGroup

    bm = llm.engine.block_manager
    prompt = list(range(100, 148))  # three full blocks of 16
    poisoned = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    sampler = llm.engine.runner.sampler
    real_launch = sampler.launch

    def launch_with_nan(logits, rows, pending_tokens=None):
        if any(r.params is poisoned for r in rows):
            logits = logits.clone()
            logits[[i for i, r in enumerate(rows) if r.params is poisoned], 0] = float("nan")
        return real_launch(logits, rows, pending_tokens)

    def cached_blocks() -> list[int]:
        return bm.find_cached_blocks(Sequence(SequenceGroup("probe", prompt, SamplingParams(), 0.0), 0))

    monkeypatch.setattr(sampler, "launch", launch_with_nan)
    out = llm.generate([prompt], poisoned)
    assert out[0].outputs[0].finish_reason == "error"
    assert cached_blocks() == []
    monkeypatch.undo()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert len(cached_blocks()) >= 2  # a healthy run caches them as usual


def test_a_tiny_repetition_penalty_or_huge_logits_still_sample_a_real_token():
    logits = torch.tensor([[3.0e4, -2.0, 1.0, 0.5, 2.0e4, -1.0, 0.0, 7.0]])
    rows = [SamplingRow(SamplingParams(temperature=0.5, repetition_penalty=1e-36), [0, 4], [])]
    tokens, _ = Sampler(VOCAB, None, "cpu", seed=2)(logits, rows)
    assert tokens[0] in (0, 4)  # both overflow past float32 after the penalty: clamped, not NaN
    big = torch.tensor([[1.0, 0.0, -1.0, 2.0, 3.0, 3.0e38, 4.0, 5.0]])
    tokens, _ = Sampler(VOCAB, None, "cpu", seed=2)(big, _rows([SamplingParams(temperature=0.5)]))
    assert tokens == [5]  # 3e38 / 0.5 would be +inf (NaN probabilities); shifted by the row max first it is 0

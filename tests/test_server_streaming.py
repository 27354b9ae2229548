"""The gRPC service on the real engine (demo model, CPU): streamed output equals the offline LLM,
concurrency, cancellation, deadlines, n > 1, stop strings, Abort, Tokenize, GetModelInfo."""

from __future__ import annotations

import asyncio
import time

import pytest

from longcat_service.client import AsyncLongCatClient, DeadlineExceededError, LongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.llm import LLM
from longcat_service.sampling_params import SamplingParams
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from longcat_service.server.servicer import ServerOptions

# float32 so that greedy tokens do not depend on how requests happen to be batched together.
ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_num_seqs=64)
PROMPTS = [f"The number {i} is" for i in range(64)]


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(port=0, options=ServerOptions(max_queued_requests=128))
    with BackgroundServer(lambda: AsyncEngine(EngineArgs(**ENGINE_KWARGS)), config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with LongCatClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE_KWARGS)


def wait_engine_idle(server, timeout_s: float = 15.0):  # bounded polling: returns as soon as idle
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        load = server.engine.load()
        if load.num_running == 0 and load.num_waiting == 0 and load.kv_cache_usage == 0.0:
            return load
        time.sleep(0.02)
    return server.engine.load()


def test_streamed_greedy_tokens_equal_offline_llm(client, llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = llm.generate(PROMPTS[0], params)[0].outputs[0]
    with client.generate_stream(PROMPTS[0], max_tokens=24, temperature=0.0, ignore_eos=True) as stream:
        chunks = list(stream)
    streamed = [t for c in chunks for t in c.token_ids]
    assert streamed == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert sum(1 for c in chunks if c.token_ids) > 1, "tokens must arrive as several chunks, not one"
    final = chunks[-1]
    assert final.finished and final.finish_reason == "length"
    assert final.usage.completion_tokens == 24
    assert final.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0], add_special_tokens=True))


def test_token_id_and_chat_prompts_equal_offline_llm(client, llm):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ids = llm.tokenizer.encode("Hello there", add_special_tokens=True)
    assert client.generate(ids, max_tokens=12, temperature=0.0).token_ids == \
        llm.generate([ids], params)[0].outputs[0].token_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert client.chat(messages, max_tokens=12, temperature=0.0).token_ids == \
        llm.chat(messages, params)[0].outputs[0].token_ids


def test_64_concurrent_streams_all_complete_correctly(server, llm):
    expected = [o.outputs[0].token_ids for o in llm.generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]

    async def run_all():
        async with AsyncLongCatClient(server.address, timeout=120) as aclient:
            async def one(prompt):
                tokens = []
                async with aclient.generate_stream(prompt, max_tokens=8, temperature=0.0, ignore_eos=True) as s:
                    async for chunk in s:
                        tokens += chunk.token_ids
                    return tokens, s.result.finish_reason
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    results = asyncio.run(run_all())
    assert [r[1] for r in results] == ["length"] * 64
    assert [r[0] for r in results] == expected
    assert wait_engine_idle(server).num_running == 0


def test_cancel_mid_stream_frees_kv_blocks(server, client):
    with client.generate_stream(PROMPTS[1], max_tokens=3000, ignore_eos=True, temperature=0.0) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                assert server.engine.load().kv_cache_usage > 0
                break
    load = wait_engine_idle(server)
    assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (0, 0, 0.0)


def test_timeout_ms_delivers_partial_output_then_deadline_exceeded(server, client):
    with pytest.raises(DeadlineExceededError) as err:
        client.generate(PROMPTS[2], max_tokens=3000, ignore_eos=True, timeout_ms=300)
    partial = err.value.partial
    assert 0 < len(partial.token_ids) < 3000
    assert partial.finish_reason == "deadline"  # the server's own completion record arrived before the status
    assert wait_engine_idle(server).num_running == 0


def test_grpc_deadline_is_enforced_by_the_engine(server, client):
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as err:
        client.generate(PROMPTS[3], max_tokens=3000, ignore_eos=True, timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert len(err.value.partial.token_ids) > 0
    assert wait_engine_idle(server).num_running == 0


def test_n_greater_than_one_streams_every_index(client):
    result = client.generate(PROMPTS[4], n=3, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in result.outputs)


def test_stop_string_is_reported_and_trimmed(client):
    full = client.generate(PROMPTS[5], max_tokens=20, temperature=0.0, ignore_eos=True).text
    stop = full[6:9]
    assert stop.strip(), f"pick a non-blank stop string from {full!r}"
    result = client.generate(PROMPTS[5], max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.outputs[0].stop == stop
    assert stop not in result.text and full.startswith(result.text)


def test_logprobs_are_streamed_per_token(client):
    result = client.generate(PROMPTS[6], max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
    lps = result.outputs[0].logprobs
    assert [lp.token_id for lp in lps] == result.token_ids
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[lp.token_id] == pytest.approx(lp.logprob)
        assert lp.logprob == pytest.approx(max(lp.top.values()))  # greedy picks the most likely token


def test_abort_rpc_ends_the_stream_with_abort(server, client):
    with client.generate_stream(PROMPTS[7], max_tokens=3000, ignore_eos=True, request_id="abort-me") as stream:
        next(stream)
        assert client.abort("abort-me", "no-such-request") == ["abort-me"]
        rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert wait_engine_idle(server).num_running == 0


def test_tokenize_and_model_info(server, client, llm):
    assert client.tokenize("Hello world") == llm.tokenizer.encode("Hello world", add_special_tokens=True)
    messages = [{"role": "user", "content": "Hi"}]
    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert client.tokenize(messages=messages) == llm.tokenizer.encode(rendered, add_special_tokens=False)
    info = client.model_info()
    cfg = llm.engine.model_config
    assert info.max_context_length == llm.engine.max_model_len
    assert (info.config.vocab_size, info.config.num_layers, info.config.num_experts, info.config.num_zero_experts,
            info.config.experts_per_token) == (cfg.vocab_size, cfg.num_layers, cfg.n_routed_experts,
                                               cfg.zero_expert_num, cfg.moe_topk)
    assert info.eos_token_id == llm.tokenizer.eos_token_id
    assert dict(info.special_tokens) == llm.tokenizer.special_tokens
    assert info.tensor_parallel_size == 1

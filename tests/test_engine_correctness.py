"""The engine's paged, batched, chunked, cached and preempted execution gives the tokens of a plain forward."""

import pytest
import torch

from longcat_service.sampling_params import SamplingParams
from tests.engine_utils import (
    PROMPTS,
    assert_all_blocks_free,
    greedy,
    make_engine,
    reference_greedy,
    run_to_completion,
)

NUM_TOKENS = 8


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture(scope="module")
def expected(engine):
    model = engine.runner.model
    return [reference_greedy(model, p, NUM_TOKENS) for p in PROMPTS]


def batch(prompts=PROMPTS, **kw):
    return {f"r{i}": (p, greedy(NUM_TOKENS, **kw)) for i, p in enumerate(prompts)}


def tokens(final, n):
    return [final[f"r{i}"].outputs[0].token_ids for i in range(n)]


def test_engine_greedy_equals_full_recompute(engine, expected):
    for i, prompt in enumerate(PROMPTS):
        final, _ = run_to_completion(engine, {"solo": (prompt, greedy(NUM_TOKENS))})
        assert final["solo"].outputs[0].token_ids == expected[i], f"prompt {i}"
    assert_all_blocks_free(engine)


def test_batch_invariance_mixed_lengths(engine, expected):
    final, _ = run_to_completion(engine, batch())
    assert tokens(final, len(PROMPTS)) == expected
    assert all(final[f"r{i}"].outputs[0].finish_reason == "length" for i in range(len(PROMPTS)))


def test_chunked_prefill_small_budget_same_tokens(expected):
    eng = make_engine(max_num_batched_tokens=5, enable_prefix_caching=False)
    final, _ = run_to_completion(eng, batch())
    assert tokens(final, len(PROMPTS)) == expected
    assert_all_blocks_free(eng)


def test_prefix_cache_hit_same_output_and_reports_cached_tokens(expected):
    eng = make_engine()
    long_prompt = PROMPTS[2]  # 19 tokens = 4 full blocks of 4 + 3
    first, _ = run_to_completion(eng, {"a": (long_prompt, greedy(NUM_TOKENS))})
    assert first["a"].num_cached_tokens == 0
    second, _ = run_to_completion(eng, {"b": (long_prompt, greedy(NUM_TOKENS))})
    assert second["b"].num_cached_tokens == 16
    assert second["b"].outputs[0].token_ids == expected[2]
    # a prompt that is exactly 4 full blocks: at most 3 may come from the cache (the last token is recomputed)
    exact = long_prompt[:16]
    run_to_completion(eng, {"c": (exact, greedy(2))})
    third, _ = run_to_completion(eng, {"d": (exact, greedy(2))})
    assert third["d"].num_cached_tokens == 12
    assert third["d"].outputs[0].token_ids == reference_greedy(eng.runner.model, exact, 2)
    assert_all_blocks_free(eng)


def test_preemption_with_tiny_cache_gives_identical_outputs(expected):
    # 12 blocks of 4 = 48 slots; the 5 sequences need 43 + 5 * 8 = 83 at the end
    eng = make_engine(num_kv_blocks=12, max_model_len=48)
    preempted = []
    original = eng.scheduler._preempt

    def counting_preempt(seq):
        preempted.append(seq.request_id)
        original(seq)

    eng.scheduler._preempt = counting_preempt
    final, _ = run_to_completion(eng, batch())
    assert preempted, "the cache was meant to be too small"
    assert tokens(final, len(PROMPTS)) == expected
    assert_all_blocks_free(eng)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_batched_preempted_and_seeded():
    eng = make_engine(device="cuda", num_kv_blocks=12, max_model_len=48)
    model = eng.runner.model
    want = [reference_greedy(model, p, NUM_TOKENS) for p in PROMPTS]
    final, _ = run_to_completion(eng, batch())
    assert tokens(final, len(PROMPTS)) == want
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=5, ignore_eos=True, logprobs=2)
    alone, _ = run_to_completion(eng, {"s": (PROMPTS[0], params)})
    mixed, _ = run_to_completion(eng, {"s": (PROMPTS[0], params), **batch()})
    assert alone["s"].outputs[0].token_ids == mixed["s"].outputs[0].token_ids
    assert_all_blocks_free(eng)


def test_prefill_warm_up_leaves_the_engine_unchanged(expected):
    """ModelRunner.warm_up_prefill (run at start-up on CUDA, to compile the prefill kernels before serving) borrows
    the first KV blocks before the engine owns any: afterwards every block is free and outputs are the same."""
    engine = make_engine(num_kv_blocks=512)  # block_size 4: the warm-up's ~1.7k tokens need ~420 blocks
    free_before = engine.scheduler.block_manager.num_free_blocks
    assert engine.runner.warm_up_prefill()
    assert engine.scheduler.block_manager.num_free_blocks == free_before
    final, _ = run_to_completion(engine, batch())
    assert tokens(final, len(PROMPTS)) == expected
    assert_all_blocks_free(engine)
    assert not make_engine(num_kv_blocks=256).runner.warm_up_prefill()  # too few blocks: skipped, no error

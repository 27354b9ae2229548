"""Tensor parallelism on CPU (gloo): TP=2 and TP=4 logits equal TP=1, greedy generation through LLM(...,
tensor_parallel_size=2) equals tp 1, on tiny checkpoints WITH zero (identity) experts and with sizes that make
sharding uneven (vocab 97 over 2 and 4 ranks)."""

from __future__ import annotations

import shutil

import pytest
import torch

from longcat_service.model.loader import load_model
from tests.engine_utils import full_forward_logits
from tests.hf_tiny import build_hf_model, save_hf_model
from tests.tp_harness import model_logits, run_on_ranks

TOKENS = [5, 9, 17, 33, 4, 70, 96, 3, 12, 44, 61]
# vocab 97: 49+48 rows over 2 ranks, 25+25+25+22 over 4; 4 heads; ffn 40 and experts 12 split 2 and 4 ways;
# 3 identity experts among top-4 so the identity term carries real weight.
UNEVEN = dict(vocab_size=97, ffn_hidden_size=40, expert_ffn_hidden_size=12, moe_topk=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpt")
    base = save_hf_model(build_hf_model("base"), root / "base")
    uneven = save_hf_model(build_hf_model("base", seed=1, **UNEVEN), root / "uneven")
    return {"base": str(base), "uneven": str(uneven)}


@pytest.fixture(scope="module")
def reference_logits(checkpoints):
    return {name: full_forward_logits(load_model(path, dtype="float32", device="cpu"), TOKENS)
            for name, path in checkpoints.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_tp_logits_match_tp1(world, checkpoints, reference_logits):
    names = list(checkpoints)
    results = run_on_ranks(world, model_logits, [checkpoints[n] for n in names], TOKENS)
    for name, (logits, shapes) in zip(names, results, strict=True):
        ref = reference_logits[name]
        got = torch.from_numpy(logits)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5, msg=f"{name} tp={world}")
        assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
        # the ranks really hold shards (heads, intermediate dims and vocab rows divided)
        heads, qk = 4, 12
        inter = 96 if name == "base" else 40
        expert_inter = 16 if name == "base" else 12
        vocab = 128 if name == "base" else 97
        assert shapes["q_b_proj"] == (heads * qk // world, 32)
        assert shapes["o_proj"] == (64, heads * 8 // world)
        assert shapes["mlp_down"] == (64, inter // world)
        assert shapes["w13"] == (6, 2 * expert_inter // world, 64)
        assert shapes["lm_head"] == (-(-vocab // world), 64)


def test_identity_term_added_twice_would_be_caught(checkpoints, reference_logits):
    """Negative control: with every rank adding the zero-expert term the logits move far beyond the tolerance."""
    (logits, _), = run_on_ranks(2, model_logits, [checkpoints["base"]], TOKENS, True)
    assert (torch.from_numpy(logits) - reference_logits["base"]).abs().max() > 1e-2


def test_heads_not_divisible_raise_naming_the_field(tmp_path):
    ckpt = save_hf_model(build_hf_model("base", num_attention_heads=3), tmp_path / "h3")
    with pytest.raises(AssertionError, match=r"num_attention_heads \(3\) is not divisible by the tensor-parallel size"):
        run_on_ranks(2, model_logits, [str(ckpt)], TOKENS)


def _with_demo_tokenizer(path: str) -> str:
    from longcat_service.demo_model import ensure_demo_model

    demo = ensure_demo_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, f"{path}/{name}")
    return path


def test_llm_tp2_greedy_tokens_and_logprobs_equal_tp1(checkpoints):
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    model = _with_demo_tokenizer(checkpoints["uneven"])
    prompts = [[5, 17, 20, 31, 9, 77, 31, 45, 12, 40, 23], [11, 12], list(range(7, 26)), [50, 51, 52, 53]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    # small blocks, chunked prefill and a cache small enough to preempt: block tables change between steps
    kwargs = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=14, max_model_len=48,
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    ref = LLM(model=model, **kwargs).generate(prompts, params)
    llm = LLM(model=model, tensor_parallel_size=2, **kwargs)
    try:
        got = llm.generate(prompts, params)
        again = llm.generate(prompts[:2], params)  # the workers keep following across generate() calls
    finally:
        llm.engine.runner.close()
    closed = llm.generate(prompts[:1], params)[0]  # after close(): a clear error, not a hang
    assert closed.finished and "closed" in closed.error
    for r, g in zip(ref + ref[:2], got + again, strict=True):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        for lr, lg in zip(r.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert lg.logprob == pytest.approx(lr.logprob, abs=1e-4)
        for pr, pg in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True):
            assert pg.logprob == pytest.approx(pr.logprob, abs=1e-4)


def test_a_second_llm_is_refused_while_a_tp_llm_is_open_and_works_after_close(checkpoints):
    """Before close() existed, a dropped TP LLM left its process group behind: the next LLM in the process ran its
    collectives in that group and hung (TP=8 then TP=1) or failed on a worker's broken pipe."""
    from longcat_service.distributed import parallel_state
    from longcat_service.engine.errors import EngineArgsError
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    kwargs = dict(model=checkpoints["base"], dtype="float32", device="cpu")
    with LLM(tensor_parallel_size=2, **kwargs) as llm:
        got = llm.generate([TOKENS], params)[0].outputs[0].token_ids
        with pytest.raises(EngineArgsError, match="still drives a tensor-parallel engine of 2 ranks: close it first"):
            LLM(**kwargs)
        assert llm.generate([TOKENS], params)[0].outputs[0].token_ids == got  # the open one still serves
    assert parallel_state.get_tp_size() == 1
    llm.close()  # twice: harmless
    with LLM(**kwargs) as tp1:
        assert tp1.generate([TOKENS], params)[0].outputs[0].token_ids == got

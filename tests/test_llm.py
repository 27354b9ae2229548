"""Offline LLM API (vLLM convention) on the demo model."""

import pytest

from longcat_service.engine.errors import PromptError
from longcat_service.llm import LLM
from longcat_service.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, num_kv_blocks=128)


def test_default_llm_generate_hello():
    out = LLM().generate("Hello")  # defaults: demo model, default dtype, default cache
    assert len(out) == 1
    assert out[0].finished and len(out[0].outputs[0].token_ids) >= 1
    assert out[0].prompt_token_ids and out[0].outputs[0].finish_reason in ("length", "stop")


def test_string_list_and_token_prompts_in_input_order(llm):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    texts = ["The cat", "Hello world, how", "A"]
    by_text = llm.generate(texts, params)
    assert [o.prompt_token_ids for o in by_text] == [llm.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    by_ids = llm.generate([o.prompt_token_ids for o in by_text], params)
    singles = [llm.generate(t, params)[0] for t in texts]
    for a, b, c in zip(by_text, by_ids, singles, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        assert a.outputs[0].text == llm.tokenizer.decode(a.outputs[0].token_ids)
        assert a.outputs[0].finish_reason == "length"


def test_per_prompt_sampling_params_and_options(llm):
    outs = llm.generate(
        ["one", "two"],
        [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
         SamplingParams(n=2, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=3, max_tokens=3,
                        logprobs=2, repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1,
                        ignore_eos=True)],
    )
    assert len(outs[0].outputs[0].token_ids) == 2
    assert len(outs[1].outputs) == 2
    for comp in outs[1].outputs:
        assert len(comp.token_ids) == 3 and len(comp.logprobs) == 3
        assert all(lp.token_id == t for lp, t in zip(comp.logprobs, comp.token_ids, strict=True))
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_chat(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert out[0].prompt_token_ids == llm.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_prompt_queues_nothing(llm):
    with pytest.raises(PromptError):
        llm.generate([[5, 6], []])
    assert not llm.engine.has_unfinished_requests()


def test_prompts_of_no_known_shape_are_a_clear_type_error(llm):
    for bad in (None, 5, 2.5):
        with pytest.raises(TypeError, match="prompts: expected a string, token ids, a dict or a list of them"):
            llm.generate(bad)
    with pytest.raises(ValueError, match="surrogate"):
        llm.generate(["fine", "a\udfffb"])
    assert not llm.engine.has_unfinished_requests()

"""SamplingParams and EngineArgs from Python: a value of the wrong type is an error naming the field
(SamplingParamsError, EngineArgsError). It was a TypeError from inside, or silently taken: n=2.5, stop_token_ids="abc"
as three ids, ignore_eos="no" or enable_prefix_caching="no" as true. Integers of any integral type (numpy's too) and
tuples still work in SamplingParams."""

from __future__ import annotations

import numpy as np
import pytest

from longcat_service.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize("kwargs,field,message", [
    (dict(max_tokens="5"), "max_tokens", "must be an integer, got '5'"),
    (dict(n=2.5), "n", "must be an integer, got 2.5"),
    (dict(seed=1.5), "seed", "must be an integer, got 1.5"),
    (dict(top_k=2.0), "top_k", "must be an integer, got 2.0"),
    (dict(logprobs=True), "logprobs", "must be an integer, got True"),
    (dict(min_tokens=None), "min_tokens", "must be an integer, got None"),
    (dict(temperature=True), "temperature", "must be a finite number, got True"),
    (dict(temperature="hot"), "temperature", "must be a finite number, got 'hot'"),
    (dict(ignore_eos="no"), "ignore_eos", "must be True or False, got 'no'"),
    (dict(skip_special_tokens=0), "skip_special_tokens", "must be True or False, got 0"),
    (dict(stop=5), "stop", "must be a string or a list of strings, got 5"),
    (dict(stop=["ok", 5]), "stop", "must be a string or a list of strings, got ['ok', 5]"),
    (dict(stop_token_ids="abc"), "stop_token_ids", "must be a list of token ids, got 'abc'"),
    (dict(stop_token_ids=[1, 2.0]), "stop_token_ids", "must be a list of token ids, got [1, 2.0]"),
    (dict(logit_bias=[1, 2]), "logit_bias", "must be a mapping of token id to bias, got [1, 2]"),
    (dict(logit_bias={"a": 1.0}), "logit_bias", "keys must be token ids, got 'a'"),
    (dict(logit_bias={5: "x"}), "logit_bias", "must be a finite number, got 'x'"),
])
def test_a_wrong_type_names_the_field(kwargs, field, message):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value) == f"{field}: {message}"


def test_integral_and_sequence_types_are_taken_as_they_are():
    p = SamplingParams(n=np.int64(2), max_tokens=np.int32(4), seed=np.uint64(7), stop=("a", "b"),
                       stop_token_ids=(np.int64(3), 4), logit_bias={np.int64(5): np.float32(1.5)})
    assert p.n == 2 and p.max_tokens == 4 and p.stop == ["a", "b"] and p.stop_token_ids == [3, 4]
    assert p.logit_bias == {5: 1.5} and SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(max_tokens=None).max_tokens is None


@pytest.mark.parametrize("kwargs,field,message", [
    (dict(gpu_memory_utilization="0.9"), "gpu_memory_utilization", "must be a number, got '0.9'"),  # was a TypeError
    (dict(step_timeout_s=float("nan")), "step_timeout_s", "must be a number, got nan"),
    (dict(enable_prefix_caching="no"), "enable_prefix_caching", "must be True or False, got 'no'"),  # was true
    (dict(async_scheduling=1), "async_scheduling", "must be True or False, got 1"),
    (dict(max_model_len=True), "max_model_len", "must be a positive integer or None, got True"),  # was 1
    (dict(block_size=False), "block_size", "must be a positive integer, got False"),
    (dict(seed="1"), "seed", "must be an integer, got '1'"),
])
def test_engine_args_of_the_wrong_type_name_the_field(kwargs, field, message):
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.errors import EngineArgsError

    with pytest.raises(EngineArgsError) as e:
        EngineArgs(device="cpu", **kwargs)
    assert e.value.field == field and str(e.value) == f"{field}: {message}"

"""A checkpoint directory without tokenizer.json (like the dummy benchmark configs) serves token ids only:
empty text, EOS from config.json, stop strings refused naming `stop`; the server refuses text / messages
prompts and Tokenize naming the field, and GetModelInfo reports token_ids_only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longcat_service.client import InvalidArgumentError, LongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.llm import LLM
from longcat_service.sampling_params import SamplingParams, SamplingParamsError
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from tests.fake_engine import FakeEngine

TINY_CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "longcat-flash-tiny" / "config.json"
EOS = 7  # not the transformers default (2), so a value read from anywhere else would show


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("no-tokenizer")
    shutil.copy(TINY_CONFIG, d / "config.json")
    raw = json.loads((d / "config.json").read_text())
    raw["eos_token_id"] = EOS
    (d / "config.json").write_text(json.dumps(raw))
    return d


@pytest.fixture(scope="module")
def engine_kwargs(model_dir):
    return dict(model=str(model_dir), load_format="dummy", device="cpu", dtype="float32", max_num_seqs=8)


@pytest.fixture(scope="module")
def llm(engine_kwargs):
    return LLM(**engine_kwargs)


@pytest.fixture(scope="module")
def client(engine_kwargs):
    with BackgroundServer(lambda: AsyncEngine(EngineArgs(**engine_kwargs)), ServerConfig(port=0)) as srv:
        with LongCatClient(srv.address, timeout=60) as c:
            yield c


def test_offline_engine_generates_token_ids_with_empty_text(llm):
    assert llm.tokenizer is None
    out = llm.generate([[5, 9, 11, 13]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    comp = out.outputs[0]
    assert len(comp.token_ids) == 6 and comp.finish_reason == "length"
    assert all(0 <= t < 512 for t in comp.token_ids)
    assert comp.text == ""


def test_eos_comes_from_config_json(llm):
    assert llm.engine.eos_token_id == EOS
    # Force the config's EOS: the request must stop there (and not run to max_tokens).
    params = SamplingParams(max_tokens=6, temperature=0.0, logit_bias={EOS: 100.0})
    comp = llm.generate([[5, 9, 11]], params)[0].outputs[0]
    assert comp.finish_reason == "stop" and len(comp.token_ids) <= 1


def test_stop_strings_are_refused_naming_stop(llm):
    with pytest.raises(SamplingParamsError) as err:
        llm.generate([[5, 9]], SamplingParams(max_tokens=2, stop=["\n"]))
    assert err.value.field == "stop" and "tokenizer" in str(err.value)
    # stop_token_ids need no tokenizer
    comp = llm.generate([[5, 9]], SamplingParams(max_tokens=4, temperature=0.0, logit_bias={42: 100.0},
                                                 stop_token_ids=[42]))[0].outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == 42


def test_offline_text_prompt_is_refused(llm):
    with pytest.raises(ValueError, match=r"prompts\[0\].*no tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"messages.*no tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))


def test_server_streams_token_ids_equal_to_offline(client, llm):
    prompt = [3, 14, 15, 92, 65]
    expected = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0]
    with client.generate_stream(prompt, max_tokens=8, temperature=0.0, ignore_eos=True) as stream:
        chunks = list(stream)
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert all(c.text == "" for c in chunks)
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="hello"), "text"),
    (dict(messages=[{"role": "user", "content": "hi"}]), "messages"),
])
def test_server_refuses_text_prompts_naming_the_field(client, kwargs, field):
    with pytest.raises(InvalidArgumentError) as err:
        client.generate(max_tokens=2, **kwargs)
    assert err.value.field == field and "no tokenizer" in err.value.details


def test_server_refuses_stop_strings_naming_stop(client):
    with pytest.raises(InvalidArgumentError) as err:
        client.generate([5, 9], max_tokens=2, stop=["x"])
    assert err.value.field == "sampling.stop" and "tokenizer" in err.value.details


def test_tokenize_is_refused(client):
    with pytest.raises(InvalidArgumentError) as err:
        client.tokenize("hello")
    assert err.value.field == "text" and "no tokenizer" in err.value.details


def test_model_info_says_token_ids_only(client):
    info = client.model_info()
    assert info.token_ids_only is True
    assert info.eos_token_id == EOS and info.bos_token_id == 1
    assert dict(info.special_tokens) == {}
    assert info.config.vocab_size == 512 and info.config.num_layers == 2


def test_model_info_of_a_model_with_tokenizer_is_not_token_ids_only():
    with BackgroundServer(FakeEngine, ServerConfig(port=0)) as srv, LongCatClient(srv.address, timeout=30) as c:
        info = c.model_info()
    assert info.token_ids_only is False and info.eos_token_id == 0

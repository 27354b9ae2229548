"""The MTP block (model/mtp.py): loading model.mtp.*, its paged cache against a no-cache reference built from
transformers' LongCat-Flash modules, refusals, speculative_config validation, FP8 linears."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LongcatFlashConfig
from transformers.models.longcat_flash import modeling_longcat_flash as hf

from longcat_service.config import QuantConfig
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.errors import EngineArgsError
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.layers.fp8_linear import Fp8Linear
from longcat_service.layers.weight_utils import CheckpointError
from longcat_service.model.kv_cache import allocate_kv_caches
from longcat_service.model.loader import load_model
from longcat_service.model.mtp import build_mtp_plan
from tests.mtp_checkpoint import write_mtp_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_mtp_checkpoint(tmp_path_factory.mktemp("mtp_random"), "random", seed=3)


def _reference_mtp(path, tokens: list[int], hidden: torch.Tensor) -> torch.Tensor:
    """h' for MTP positions 0..len(tokens)-2 over the whole sequence at once (no cache), from transformers'
    modules: h' = norm(Layer(eh_proj(cat[enorm(embed(tok_{t+1})), hnorm(h_t)]))), causal attention."""
    cfg = LongcatFlashConfig.from_pretrained(path)
    cfg._attn_implementation = "eager"
    w = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    p = "model.mtp.layers.0."

    def norm(key):
        n = hf.LongcatFlashRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n.weight.data.copy_(w[key])
        return n

    attn = hf.LongcatFlashMLA(cfg, layer_idx=0).eval()
    attn.load_state_dict({k[len(p + "self_attn."):]: v for k, v in w.items() if k.startswith(p + "self_attn.")})
    mlp = hf.LongcatFlashMLP(cfg).eval()
    mlp.load_state_dict({k[len(p + "transformer_layer.mlp."):]: v for k, v in w.items()
                         if k.startswith(p + "transformer_layer.mlp.")})
    rotary = hf.LongcatFlashRotaryEmbedding(cfg)
    n = len(tokens) - 1
    with torch.no_grad():
        e = norm(p + "enorm.m.weight")(w["model.embed_tokens.weight"][torch.tensor(tokens[1:])])
        x = torch.cat([e, norm(p + "hnorm.m.weight")(hidden[:n])], dim=-1) @ w[p + "eh_proj.weight"].T
        x = x[None]
        pos = torch.arange(n)[None]
        cos_sin = rotary(x, pos)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        a = attn(norm(p + "input_layernorm.weight")(x), cos_sin, mask)[0]
        x = x + a
        x = x + mlp(norm(p + "post_attention_layernorm.weight")(x))
        return norm("model.mtp.norm.weight")(x)[0]


def test_mtp_paged_forward_equals_full_sequence_reference(ckpt):
    model = load_model(ckpt, mtp=True, device="cpu")
    tokens = [5, 17, 99, 31, 9, 77, 31, 45, 12, 40, 23, 8, 64, 3]
    n = len(tokens)
    bs = 4
    table = list(range(1, 6))  # block 0 unused: slots are not the positions
    caches = allocate_kv_caches(model.config, 8, bs, torch.float32, "cpu", num_extra_layers=1)
    md = AttentionMetadata.build([n], [n], [table], bs)
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), torch.arange(n), md, caches[:-1])
        expected = _reference_mtp(ckpt, tokens, hidden)
        # MTP positions in pieces, as the engine runs them: a prompt chunk, a shorter one, then single tokens
        got = []
        for a, b in ((0, 6), (6, 9), (9, 10), (10, 11), (11, 13)):
            plan = build_mtp_plan([table], [a], [b], bs, torch.device("cpu"))
            got.append(model.mtp_forward(torch.tensor(tokens[a + 1 : b + 1]), hidden[a:b], torch.arange(a, b), plan,
                                         caches[-1]))
    got = torch.cat(got)
    assert got.shape == expected.shape == (n - 1, model.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and a batch of two sequences (a decode row next to a chunk) gives the same rows
    caches2 = allocate_kv_caches(model.config, 16, bs, torch.float32, "cpu", num_extra_layers=1)
    table2 = list(range(8, 12))
    with torch.no_grad():
        first = build_mtp_plan([table, table2], [0, 0], [12, 5], bs, torch.device("cpu"))
        ids = torch.tensor(tokens[1:13] + tokens[1:6])
        hid = torch.cat([hidden[:12], hidden[:5]])
        model.mtp_forward(ids, hid, torch.cat([torch.arange(12), torch.arange(5)]), first, caches2[-1])
        mixed = build_mtp_plan([table, table2], [12, 5], [13, 8], bs, torch.device("cpu"))
        out = model.mtp_forward(torch.tensor([tokens[13]] + tokens[6:9]), torch.cat([hidden[12:13], hidden[5:8]]),
                                torch.tensor([12, 5, 6, 7]), mixed, caches2[-1])
    torch.testing.assert_close(out[0], expected[12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], expected[5:8], rtol=1e-5, atol=1e-5)


def test_checkpoint_without_mtp_keys_is_refused_naming_them(tmp_path, ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    dropped = ["model.mtp.layers.0.eh_proj.weight", "model.mtp.layers.0.enorm.m.weight", "model.mtp.norm.weight"]
    out = tmp_path / "no_mtp"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(out, mtp=True, device="cpu")
    for key in dropped:
        assert key in str(e.value)
    load_model(out, device="cpu")  # without MTP the same checkpoint loads (its other MTP keys set aside)


def test_mtp_embedding_shared_when_identical_kept_when_different(tmp_path):
    same = load_model(write_mtp_checkpoint(tmp_path / "same", "exact", with_embed=True), mtp=True, device="cpu")
    assert same.mtp.embed_tokens is None
    own = load_model(write_mtp_checkpoint(tmp_path / "own", "partial"), mtp=True, device="cpu")
    assert own.mtp.embed_tokens is not None
    assert not torch.equal(own.mtp.embed_tokens.weight, own.model.embed_tokens.weight)
    assert torch.equal(own.mtp.embed_tokens.weight[::2], own.model.embed_tokens.weight[::2])


def test_dummy_weights_build_the_mtp_block(ckpt):
    from longcat_service.config import ModelConfig

    config = ModelConfig.from_pretrained(ckpt / "config.json")
    model = load_model(config, load_format="dummy", mtp=True, device="cpu")
    assert model.mtp is not None
    assert torch.all(model.mtp.enorm.weight == 1) and model.mtp.eh_proj.weight.abs().sum() > 0


def test_mtp_linears_fp8_unless_disabled(ckpt):
    model = load_model(ckpt, mtp=True, device="cpu", quantization="fp8")
    assert isinstance(model.mtp.eh_proj, Fp8Linear)
    assert isinstance(model.mtp.layer.self_attn.q_b_proj, Fp8Linear)
    assert isinstance(model.mtp.layer.mlp.down_proj, Fp8Linear)
    from longcat_service.config import ModelConfig

    config = ModelConfig.from_pretrained(ckpt / "config.json")
    config = dataclasses.replace(config, quantization=QuantConfig(skipped=("mtp",), checkpoint_quantized=False))
    skipped = load_model(config, load_format="dummy", mtp=True, device="cpu")
    assert not isinstance(skipped.mtp.eh_proj, Fp8Linear)
    assert not isinstance(skipped.mtp.layer.self_attn.q_b_proj, Fp8Linear)
    assert isinstance(skipped.model.layers[0].self_attn[0].q_b_proj, Fp8Linear)


@pytest.mark.parametrize("value, field", [
    ({"method": "eagle", "num_speculative_tokens": 1}, "speculative_config.method"),
    ({"method": "mtp", "num_speculative_tokens": 4}, "speculative_config.num_speculative_tokens"),
    ({"method": "mtp", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "mtp", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
    ({"method": "mtp", "draft_model": "x"}, "speculative_config.draft_model"),
    ("{not json", "speculative_config"),
    ([1], "speculative_config"),
])
def test_speculative_config_errors_name_the_field(value, field):
    with pytest.raises(EngineArgsError) as e:
        EngineArgs(speculative_config=value)
    assert e.value.field == field


def test_speculative_config_accepts_the_vllm_alias_and_json():
    a = EngineArgs(speculative_config={"method": "longcat_flash_mtp", "num_speculative_tokens": 2}).speculative_config
    b = EngineArgs(speculative_config='{"method": "mtp"}').speculative_config
    assert (a.method, a.num_speculative_tokens) == ("mtp", 2)
    assert (b.method, b.num_speculative_tokens) == ("mtp", 1)
    # works with tensor parallelism (tests/test_tp_spec_decode.py)
    assert EngineArgs(speculative_config={"method": "mtp"}, tensor_parallel_size=2).speculative_config == b


def test_serve_flag_and_grpc_usage_carry_speculation(capsys):
    from longcat_service.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from longcat_service.server import convert
    from longcat_service.server.cli import build_parser, engine_args_from

    args = engine_args_from(build_parser().parse_args(
        ["--speculative-config", '{"method": "longcat_flash_mtp", "num_speculative_tokens": 3}']))
    assert (args.speculative_config.method, args.speculative_config.num_speculative_tokens) == ("mtp", 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 9}'])
    assert "speculative_config.num_speculative_tokens" in capsys.readouterr().err

    out = CompletionOutput(index=0, token_ids=[1, 2, 3], text="", logprobs=None, finish_reason="length")
    metrics = RequestMetrics(num_spec_steps=2, num_draft_tokens=4, num_accepted_tokens=3,
                             spec_acceptance_rate=0.75, spec_mean_accepted_length=2.5)
    resp = convert.complete_response("r", RequestOutput("r", [7], [out], True, metrics=metrics), out)
    u = resp.complete.usage
    assert (u.draft_tokens, u.accepted_draft_tokens, u.acceptance_rate, u.mean_accepted_length) == (4, 3, 0.75, 2.5)
    from longcat_service.client.types import chunk_from_proto

    usage = chunk_from_proto(resp).usage  # the client (and longcat-client --json) reads them back
    assert (usage.draft_tokens, usage.accepted_draft_tokens, usage.acceptance_rate) == (4, 3, 0.75)
    assert usage.mean_accepted_length == 2.5


def test_prometheus_speculation_metrics():
    from longcat_service.outputs import RequestMetrics
    from longcat_service.server.metrics import ServerMetrics

    m = ServerMetrics(engine=None, admission=None)
    m.record_speculation(RequestMetrics())  # no drafts: nothing recorded
    m.record_speculation(RequestMetrics(num_spec_steps=2, num_draft_tokens=4, num_accepted_tokens=3,
                                        spec_acceptance_rate=0.75, spec_mean_accepted_length=2.5))
    get = m.registry.get_sample_value
    assert get("longcat_spec_draft_tokens_total") == 4 and get("longcat_spec_accepted_tokens_total") == 3
    assert get("longcat_spec_acceptance_rate_count") == 1 and get("longcat_spec_acceptance_rate_sum") == 0.75
    assert get("longcat_spec_mean_accepted_length_sum") == 2.5


def test_engine_core_process_carries_the_speculation_metrics():
    """Process mode (the server's default) sends every RequestMetrics field to the server process."""
    from longcat_service.engine.engine_core_process import encode_output
    from longcat_service.outputs import CompletionOutput, RequestMetrics, RequestOutput

    m = RequestMetrics(arrival_time=1.0, num_spec_steps=2, num_draft_tokens=4, num_accepted_tokens=3,
                       spec_acceptance_rate=0.75, spec_mean_accepted_length=2.5)
    d = encode_output(RequestOutput("k", [1], [CompletionOutput(index=0, new_token_ids=[7])], metrics=m), set())
    assert RequestMetrics(*d.metrics) == m

"""load_model: sharded / single-file checkpoints, mtp keys set aside, clear errors naming file and key, dummy weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_service.config import ModelConfig
from longcat_service.model.loader import CheckpointError, WeightLoadError, load_model, resolve_dtype
from tests.paged_driver import PagedDriver

KEY = "model.layers.1.self_attn.0.kv_b_proj.weight"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Rewrite a single-file checkpoint's tensors through edit(dict) -> dict."""
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(file), metadata={"format": "pt"})


def _logits(model, tokens=(5, 9, 17, 33, 4, 70)):
    return PagedDriver(model).step({0: list(tokens)})[0]


def test_sharded_checkpoint_loads_like_single_file(tiny_checkpoint):
    sharded = tiny_checkpoint("base", sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = load_model(sharded, dtype=torch.float32, device="cpu")
    b = load_model(tiny_checkpoint("base"), dtype=torch.float32, device="cpu")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.mtp_weight_names == []


def test_stacked_experts_hold_hf_expert_weights(tiny_checkpoint):
    path = tiny_checkpoint("base")
    model = load_model(path, dtype=torch.float32, device="cpu")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        gate = f.get_tensor("model.layers.1.mlp.experts.4.gate_proj.weight")
        up = f.get_tensor("model.layers.1.mlp.experts.4.up_proj.weight")
        down = f.get_tensor("model.layers.1.mlp.experts.4.down_proj.weight")
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.w13[4], torch.cat([gate, up]))
    assert torch.equal(experts.w2[4], down)


def test_mtp_keys_are_set_aside(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    mtp = {"model.mtp.layers.0.eh_proj.weight": torch.randn(64, 128), "model.mtp.norm.weight": torch.ones(64)}
    _rewrite(path, lambda t: {**t, **mtp})
    model = load_model(path, dtype=torch.float32, device="cpu")
    assert model.mtp_weight_names == sorted(mtp)
    reference = load_model(tiny_checkpoint("base"), dtype=torch.float32, device="cpu")
    assert torch.equal(_logits(model), _logits(reference))


def _expect(path, match, cls=CheckpointError, **kwargs):
    with pytest.raises(cls, match=match) as info:
        load_model(path, dtype=torch.float32, device="cpu", **kwargs)
    return info.value


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    _rewrite(path, lambda t: {k: v for k, v in t.items() if k != KEY})
    err = _expect(path, "missing key")
    assert err.key == KEY and KEY in str(err) and "model.safetensors" in str(err)


def test_unexpected_key_is_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    extra = "model.layers.0.mlp.experts.6.gate_proj.weight"  # one expert too many
    _rewrite(path, lambda t: {**t, extra: torch.zeros(16, 64)})
    err = _expect(path, "unexpected key")
    assert err.key == extra and str(path / "model.safetensors") in str(err)


def test_shape_mismatch_is_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    _rewrite(path, lambda t: {**t, KEY: t[KEY][:-1]})
    err = _expect(path, r"shape \[63, 16\], expected \[64, 16\]", cls=WeightLoadError)
    assert err.key == KEY and err.file == str(path / "model.safetensors")


def test_expert_shape_mismatch_is_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    key = "model.layers.0.mlp.experts.2.down_proj.weight"
    _rewrite(path, lambda t: {**t, key: t[key].t().contiguous()})
    err = _expect(path, "expected", cls=WeightLoadError)
    assert err.key == key


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors_file_is_named(tiny_checkpoint, tmp_path, damage):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 16 + data[16:], "empty": b""}[damage])
    err = _expect(path, "corrupt or truncated")
    assert err.file == str(file)


def test_truncated_shard_is_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base", sharded=True), tmp_path / "ckpt")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    err = _expect(path, "corrupt or truncated")
    assert err.file == str(shard)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base", sharded=True), tmp_path / "ckpt")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    err = _expect(path, "listed in model.safetensors.index.json is missing")
    assert err.file == str(shard) and shard.name in str(err)


def test_missing_config_and_missing_weights(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("base"), tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    _expect(path, "no model.safetensors or model.safetensors.index.json")
    (path / "config.json").unlink()
    err = _expect(path, "config.json not found")
    assert err.file == str(path / "config.json")


def test_dummy_weights_for_a_config(tiny_checkpoint, tmp_path):
    cfg = ModelConfig.from_pretrained(tiny_checkpoint("odd"))
    a = load_model(cfg, dtype=torch.float32, device="cpu", load_format="dummy", seed=1)
    b = load_model(cfg, dtype=torch.float32, device="cpu", load_format="dummy", seed=1)
    c = load_model(cfg, dtype=torch.float32, device="cpu", load_format="dummy", seed=2)
    la, lb, lc = _logits(a), _logits(b), _logits(c)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    # only config.json needed on disk
    (tmp_path / "config.json").write_text((tiny_checkpoint("odd") / "config.json").read_text())
    d = load_model(tmp_path, dtype="bf16", device="cpu", load_format="dummy", seed=1)
    assert d.dtype == torch.bfloat16 and torch.isfinite(_logits(d)).all()


def test_dummy_full_width_layer_stays_finite():
    # 560B attention widths (hidden 6144, 64 heads, LoRA ranks 1536/512), one layer, small FFNs and vocab (for
    # CPU speed): the dummy init keeps activations finite at full hidden width
    raw = {
        "vocab_size": 1000, "hidden_size": 6144, "num_layers": 1, "num_attention_heads": 64, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "ffn_hidden_size": 256, "expert_ffn_hidden_size": 128, "n_routed_experts": 8, "zero_expert_num": 4,
        "moe_topk": 12,
    }  # fmt: skip
    model = load_model(ModelConfig.from_dict(raw), dtype=torch.bfloat16, device="cpu", load_format="dummy")
    assert torch.isfinite(_logits(model, tokens=(1, 2, 3))).all()


def test_dtype_resolution():
    cfg = ModelConfig.from_dict({**json.loads(json.dumps(_BASE_RAW)), "torch_dtype": "float16"})
    assert resolve_dtype(None, cfg, torch.device("cpu")) == torch.float32  # CPU: fp32 whatever the checkpoint says
    assert resolve_dtype(None, cfg, torch.device("cuda")) == torch.float16
    cfg = ModelConfig.from_dict(_BASE_RAW)
    assert resolve_dtype(None, cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", cfg, torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cfg, torch.device("cpu"))


def test_bad_load_format():
    with pytest.raises(ValueError, match="load_format"):
        load_model("/nonexistent", load_format="pickle")


_BASE_RAW = {
    "vocab_size": 128, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "q_lora_rank": 32,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "ffn_hidden_size": 96,
    "expert_ffn_hidden_size": 16, "n_routed_experts": 6, "zero_expert_num": 3, "moe_topk": 3,
}  # fmt: skip


def test_dummy_shapes_follow_the_transformers_checkpoint(tiny_checkpoint):
    """dummy_weights.hf_shape must give every key the shape transformers 4.57 saves (the tiny HF model's file)."""
    from longcat_service.model.dummy_weights import hf_shape

    path = tiny_checkpoint("base")
    config = ModelConfig.from_pretrained(path / "config.json")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if ".mtp." not in k and not k.startswith("model.mtp")]
        assert keys
        for k in keys:
            assert hf_shape(k, config) == tuple(f.get_slice(k).get_shape()), k


def test_dummy_weights_are_a_checkpoint_loaded_like_any_other(tiny_checkpoint, tmp_path):
    """load_format="dummy" == writing each key's dummy tensor to safetensors and loading that file: the same
    weight_loaders slice it, which is what makes dummy weights identical at every tensor-parallel size."""
    from longcat_service.model.dummy_weights import dummy_tensor

    src = tiny_checkpoint("base")
    config = ModelConfig.from_pretrained(src / "config.json")
    dummy = load_model(src, dtype=torch.float32, device="cpu", load_format="dummy", seed=7)
    ckpt = tmp_path / "dummy_ckpt"
    ckpt.mkdir()
    shutil.copy(src / "config.json", ckpt / "config.json")
    save_file({k: dummy_tensor(k, config, 7, "cpu").contiguous() for k in dummy.checkpoint_targets()},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(ckpt, dtype=torch.float32, device="cpu")
    for (name, a), (_, b) in zip(dummy.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    other_seed = load_model(src, dtype=torch.float32, device="cpu", load_format="dummy", seed=8)
    assert not torch.equal(other_seed.model.layers[0].mlp.experts.w13, dummy.model.layers[0].mlp.experts.w13)

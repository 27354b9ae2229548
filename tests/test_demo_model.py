import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_service.demo_model import DEMO_CONFIG, ensure_demo_model
from longcat_service.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def test_two_builds_are_byte_identical(demo_dir, tmp_path):
    # built in another process with another hash seed: nothing may depend on set/dict hashing order
    code = f"from longcat_service.demo_model import ensure_demo_model; print(ensure_demo_model({str(tmp_path)!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    other = Path(out.stdout.strip())
    assert other != demo_dir and other.name == demo_dir.name  # the name is the recipe hash
    assert sorted(p.name for p in other.iterdir()) == FILES
    for name in FILES:
        assert (other / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_second_call_reuses_the_directory(demo_dir):
    before = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(demo_dir.parent) == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == before


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGCAT_CACHE_DIR", str(tmp_path / "env-cache"))
    path = ensure_demo_model()
    assert path.parent == tmp_path / "env-cache" and path.name.startswith("demo-")


def test_concurrent_callers_get_one_complete_directory(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_demo_model(tmp_path), range(4)))
    assert len(set(paths)) == 1
    assert sorted(p.name for p in paths[0].iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temporary dirs left behind


def test_weights_layout_dtype_and_init(demo_dir):
    state = load_file(demo_dir / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert state["model.layers.1.mlp.experts.15.down_proj.weight"].shape == (256, 128)
    assert state["model.layers.0.mlp.router.classifier.weight"].shape == (24, 256)  # 16 real + 8 zero experts
    assert "model.layers.0.mlp.experts.16.gate_proj.weight" not in state  # zero experts have no weights
    assert state["model.layers.0.self_attn.1.kv_a_proj_with_mqa.weight"].shape == (64 + 16, 256)
    norm = state["model.layers.0.input_layernorm.0.weight"].float()
    assert (norm - 1).abs().max() < 0.2 and norm.std() > 0.01  # ones plus noise, so tests exercise the weight
    bias = state["model.layers.0.mlp.router.e_score_correction_bias"].float()
    assert 0 < bias.abs().max() < 0.05
    std = state["model.layers.0.mlps.0.up_proj.weight"].float().std()
    assert 0.02 <= std <= 0.05


def test_config_matches_tokenizer(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 * config["num_layers"]
    assert config["head_dim"] == config["qk_rope_head_dim"]
    tok = load_tokenizer(demo_dir)
    assert tok.vocab_size == config["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
    )


def test_transformers_loads_the_demo_model(demo_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.LongcatFlashForCausalLM.from_pretrained(
        str(demo_dir), dtype=torch.bfloat16, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    state = load_file(demo_dir / "model.safetensors")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name

    with torch.no_grad():
        logits = model(torch.tensor([[1, 50, 300, 7, 499]])).logits
    assert logits.shape == (1, 5, 512) and torch.isfinite(logits).all()
    assert logits.float().std() > 0.1  # weights are not degenerate

    # config.json is what transformers itself writes for this model (dtype aside, plus our torch_dtype alias)
    model.save_pretrained(tmp_path, safe_serialization=True)
    resaved = json.loads((tmp_path / "config.json").read_text())
    ours = {k: v for k, v in DEMO_CONFIG.items() if k != "torch_dtype"}
    assert resaved == ours

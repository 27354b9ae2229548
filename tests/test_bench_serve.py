"""The serving benchmark script end to end on CPU (a few requests), and the benchmark configs it points at."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcat_service.config import ModelConfig
from longcat_service.model.longcat_flash import LongcatFlashForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"


def test_bench_serve_cpu_smoke_with_hf_overrides():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--model", str(CONFIGS / "longcat-flash-tiny"),
           "--load-format", "dummy", "--device", "cpu", "--hf-overrides", '{"num_layers": 1, "hidden_size": 64}',
           "--concurrency", "4", "--num-requests", "6", "--prompt-len", "8", "--max-tokens", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "hf_overrides {'num_layers': 1, 'hidden_size': 64}" in out
    rows = [line for line in out.splitlines() if line.startswith("| gRPC serve") or line.startswith("| offline")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "6" and cells[2] == "30"  # every request streamed all 5 tokens (ignore_eos)
    ratio = [line for line in out.splitlines() if line.startswith("service / offline output tokens/s:")]
    assert len(ratio) == 1
    tok_s = {row.split("|")[1].strip().split()[0]: float(row.strip("|").split("|")[4]) for row in rows}
    # the printed ratio is the two rows' output tokens/s divided (rounded to 0.1 tok/s in the table) ...
    expected = tok_s["gRPC"] / tok_s["offline"]
    assert float(ratio[0].split(":")[1]) == pytest.approx(expected, rel=0.05, abs=2e-3)
    # ... and a served stream of the same engine cannot outrun the offline engine many times over, nor crawl
    assert 0.05 < expected < 3.0


def test_real_config_builds_the_560b_model_and_the_2_layer_cut():
    full = ModelConfig.from_pretrained(CONFIGS / "longcat-flash-chat")
    two = ModelConfig.from_pretrained(CONFIGS / "longcat-flash-2l")
    expected = dict(vocab_size=131072, hidden_size=6144, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, ffn_hidden_size=12288,
                    expert_ffn_hidden_size=2048, n_routed_experts=512, zero_expert_num=256, moe_topk=12,
                    routed_scaling_factor=6.0, rope_theta=1e7, rms_norm_eps=1e-5, max_position_embeddings=131072,
                    rope_scaling=None, torch_dtype="bfloat16", eos_token_ids=(2,), bos_token_id=1)
    for name, value in expected.items():
        assert getattr(full, name) == value, name
        assert getattr(two, name) == value, name
    assert (full.num_layers, two.num_layers) == (28, 2)
    raw = json.loads((CONFIGS / "longcat-flash-chat" / "config.json").read_text())
    assert raw["model_type"] == "longcat_flash" and raw["zero_expert_type"] == "identity"
    with torch.device("meta"):  # shapes only: spec section 1.3 counts 560.66B parameters (MTP excluded)
        model = LongcatFlashForCausalLM(full, torch.bfloat16)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 560.66) < 0.01

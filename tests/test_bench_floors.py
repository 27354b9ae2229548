"""The floor arithmetic of benchmarks/bench_decode.py, bench_moe.py and bench_mtp.py, against bytes and FLOPs counted by
hand from a small config (the benchmarks' own tiny config)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_decode import TINY, decode_floor_bytes, param_bytes, prefill_flops
from longcat_service.config import ModelConfig
from longcat_service.model.longcat_flash import LongcatFlashForCausalLM

BF16, FP32 = 2, 4
C = TINY
H, V, F, I_EXP = C["hidden_size"], C["vocab_size"], C["ffn_hidden_size"], C["expert_ffn_hidden_size"]
HEADS, QR, KVR = C["num_attention_heads"], C["q_lora_rank"], C["kv_lora_rank"]
DN, DR, DV = C["qk_nope_head_dim"], C["qk_rope_head_dim"], C["v_head_dim"]
E, Z, L = C["n_routed_experts"], C["zero_expert_num"], C["num_layers"]


def hand_dense_params() -> int:
    """Parameters of the dense matmuls and norms: all but the embedding table, the lm_head and the experts."""
    attention = (H * QR + QR + QR * HEADS * (DN + DR) + H * (KVR + DR) + KVR + KVR * HEADS * (DN + DV)
                 + HEADS * DV * H)
    layer = 2 * attention + 2 * 3 * H * F + 4 * H + (E + Z) * H + (E + Z)
    return L * layer + H


def hand_dense_bytes() -> int:
    """Weights every decode step reads, whatever the routing: all but the experts and the embedding table."""
    attention = (H * QR + QR + QR * HEADS * (DN + DR) + H * (KVR + DR) + KVR + KVR * HEADS * (DN + DV)
                 + HEADS * DV * H) * BF16
    dense_mlp = 3 * H * F * BF16
    layer = 2 * attention + 2 * dense_mlp + 4 * H * BF16 + ((E + Z) * H + (E + Z)) * FP32  # 2 sublayers, router
    return L * layer + H * BF16 + V * H * BF16  # final norm, lm_head


@pytest.fixture(scope="module")
def pb():
    cfg = ModelConfig.from_dict(dict(TINY, model_type="longcat_flash"))
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(cfg, torch.bfloat16)
    return param_bytes(model)


def test_param_bytes_counts_dense_weights_and_one_expert(pb):
    assert pb == {"dense": hand_dense_bytes(), "per_expert": 3 * H * I_EXP * BF16, "dense_params": hand_dense_params()}


def test_decode_floor_bytes(pb):
    experts_hit, kv_tokens = 5, 100
    kv = kv_tokens * (KVR + DR) * BF16 * 2 * L  # one latent + rope entry per token, 2 attention sublayers per layer
    expected = hand_dense_bytes() + experts_hit * 3 * H * I_EXP * BF16 + kv
    assert decode_floor_bytes(pb, experts_hit, kv_tokens, TINY) == expected
    # more context or more experts only add bytes, at their own rate
    assert decode_floor_bytes(pb, experts_hit, kv_tokens + 1, TINY) - expected == (KVR + DR) * BF16 * 2 * L
    assert decode_floor_bytes(pb, experts_hit + 1, kv_tokens, TINY) - expected == 3 * H * I_EXP * BF16


def test_prefill_flops(pb):
    s, expert_rows = 10, 37
    dense_params = hand_dense_params()
    attention = 2 * L * 2 * HEADS * (s * s / 2) * (DN + DR + DV)  # QK^T and PV over the causal half
    expected = 2 * dense_params * s + 2 * 3 * H * I_EXP * expert_rows + attention + 2 * V * H
    assert prefill_flops(pb, TINY, s, expert_rows) == pytest.approx(expected, rel=1e-12)


def test_moe_floor_is_the_slower_of_reading_and_computing():
    from benchmarks.bench_moe import moe_floor

    hidden, inter = 64, 16
    # 4 experts hit, 10 real rows: 4 * 3 * 64 * 16 * 2 bytes = 24576, 2 * 10 * 3 * 64 * 16 = 61440 FLOPs
    weight_bytes, flops, floor_us = moe_floor(4, 10, inter, copy_tbps=1e-6, mm_tflops=1e-6, hidden=hidden)
    assert (weight_bytes, flops) == (24576, 61440)
    assert floor_us == pytest.approx(61440)  # 1 byte/us and 1 FLOP/us: compute-bound
    _, _, floor_us = moe_floor(4, 10, inter, copy_tbps=1e-6, mm_tflops=1.0, hidden=hidden)
    assert floor_us == pytest.approx(24576)  # bandwidth-bound: 24576 bytes at 1 byte/us


def test_non_default_settings_lists_only_what_differs_from_the_device_defaults():
    from benchmarks.bench_decode import non_default_settings
    from longcat_service.engine.engine_args import EngineArgs

    tuned = EngineArgs(model="m", dtype="bfloat16", device="cpu", load_format="dummy", enable_prefix_caching=False,
                       max_num_batched_tokens=16384, num_kv_blocks=100, max_num_seqs=256)
    # the workload (model, dtype, device, load format) and max_num_seqs at its default 256 are not listed
    assert non_default_settings(tuned) == {"enable_prefix_caching": False, "max_num_batched_tokens": 16384,
                                           "num_kv_blocks": 100}
    # a setting given at its default value is not listed
    assert non_default_settings(EngineArgs(device="cpu", max_num_batched_tokens=2048)) == {}


# ---- MTP: the byte floor of a spec step (benchmarks/bench_mtp.py) ---------------------------------------------------
def hand_mtp_bytes() -> int:
    """The MTP block: eh_proj [H, 2H], one attention sublayer, one dense MLP, 5 norms (enorm, hnorm, the layer's
    two, the final one)."""
    attention = (H * QR + QR + QR * HEADS * (DN + DR) + H * (KVR + DR) + KVR + KVR * HEADS * (DN + DV)
                 + HEADS * DV * H)
    return (2 * H * H + attention + 3 * H * F + 5 * H) * BF16


def test_expected_experts_hit_under_uniform_routing():
    from benchmarks.bench_mtp import expected_experts_hit

    # 3 of 9 slots per token (6 real experts, 3 zero experts): a real expert is hit with probability 1/3 per token
    assert expected_experts_hit(TINY, 1) == pytest.approx(2.0)
    assert expected_experts_hit(TINY, 2) == pytest.approx(6 * (1 - (2 / 3) ** 2))
    assert expected_experts_hit(TINY, 1000) == pytest.approx(6.0)


def test_spec_floor_ratio_counts_verify_tokens_experts_and_draft_passes():
    from benchmarks.bench_mtp import floor_parts, spec_floor_ratio

    parts = floor_parts(TINY)
    assert parts["mtp"] == hand_mtp_bytes() and parts["lm_head"] == V * H * BF16
    assert parts["dense"] == hand_dense_bytes() and parts["per_expert"] == 3 * H * I_EXP * BF16
    kv, entry = 100, (KVR + DR) * BF16
    expert = 3 * H * I_EXP * BF16
    for b, k in ((1, 1), (2, 3)):
        hit = lambda t: 6 * (1 - (2 / 3) ** t)  # noqa: E731
        plain = hand_dense_bytes() + L * hit(b) * expert + b * kv * entry * 2 * L
        verify = hand_dense_bytes() + L * hit(b * (k + 1)) * expert + b * kv * entry * 2 * L
        draft = hand_mtp_bytes() + V * H * BF16 + b * kv * entry
        assert spec_floor_ratio(TINY, b, k, kv) == pytest.approx((verify + k * draft) / plain, rel=1e-12)


def test_spec_floor_ratio_of_the_2l_model_at_k1_batch1():
    """The issue's estimate: two tokens touch about twice the experts and the draft reads the lm_head again."""
    from benchmarks.bench_mtp import spec_floor_ratio
    from benchmarks.decode_driver import FULL_2L

    assert 1.6 < spec_floor_ratio(FULL_2L, 1, 1, 512) < 1.7

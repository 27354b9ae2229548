"""The spec §7 tiny LongCat-Flash config, shared by the tests (no transformers import: GPU tests use it too)."""

TINY_CONFIG = dict(
    vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4,
    v_head_dim=8, ffn_hidden_size=96, expert_ffn_hidden_size=16,
    n_routed_experts=6, zero_expert_num=3, moe_topk=3, routed_scaling_factor=6.0,
    rope_theta=1e7, max_position_embeddings=256, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip

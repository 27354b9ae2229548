"""Expert parallelism with block-FP8 routed experts on CPU (gloo): each rank holds only its whole experts' e4m3
weights and fp32 block scales (sliced from the checkpoint, quantized at load, or dummy), runs them through the FP8
expert op (the CPU reference path), and EP=2 / EP=4 logits (fp32 activations) and greedy tokens equal TP=1 FP8.
6 experts over 4 ranks: 2, 2, 1, 1; expert width 96 (not whole 128-blocks: per-part scales)."""

from __future__ import annotations

import pytest
import torch

from longcat_service.model.loader import load_model
from tests.engine_utils import full_forward_logits
from tests.fp8_checkpoint import ALIGNED, FP8_QUANT, write_pair
from tests.tp_harness import run_on_ranks

TOKENS = [5, 9, 17, 33, 4, 70, 96, 3, 12, 44, 61, 100, 2, 7]
# every tensor-parallel shard of attention and the dense MLPs is whole 128-blocks at TP 2 and 4 (8 heads of
# q_b 128 / kv_b 128 / o_proj 64; ffn 512); the experts are whole per rank, so their width need not be
EP_FP8 = dict(ALIGNED, num_attention_heads=8, ffn_hidden_size=512, expert_ffn_hidden_size=96)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("ep_fp8"), EP_FP8, seed=11)


def _u8(t: torch.Tensor):
    return (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy().copy()


def ep_fp8_rank(path, tokens: list[int], quantization: str | None = None, dummy: bool = False) -> dict:
    """On every rank: EP on, load (fp32 activations, CPU) -> rank 0's logits plus every rank's held experts and
    their layer-0 FP8 weights and scales (bytes), and the rows each MoE layer sent in its all-to-all."""
    import torch.distributed as dist

    from longcat_service.config import ModelConfig
    from longcat_service.distributed import parallel_state
    from longcat_service.layers.moe import LongcatMoE

    parallel_state.set_expert_parallel(True)
    if dummy:
        model = load_model(ModelConfig.from_dict({**EP_FP8, "quantization_config": FP8_QUANT}), dtype="float32",
                           device="cpu", load_format="dummy")
    else:
        model = load_model(path, dtype="float32", device="cpu", quantization=quantization)
    sent: list[int] = []
    for module in model.modules():
        if isinstance(module, LongcatMoE):
            dispatch = module.dispatcher.dispatch

            def recording(rows, local_expert, send_counts, _dispatch=dispatch):
                sent.append(sum(send_counts))
                return _dispatch(rows, local_expert, send_counts)

            module.dispatcher.dispatch = recording
    logits = full_forward_logits(model, tokens).numpy()
    experts = model.model.layers[0].mlp.experts
    info = {"held": experts.local_experts, "sent": sent,
            **{name: _u8(getattr(experts, name).data) for name in ("w13", "w13_scale", "w2", "w2_scale")}}
    gathered: list = [None] * parallel_state.get_tp_size()
    dist.all_gather_object(gathered, info)
    return {"logits": logits, "ranks": gathered}


def _check_against_tp1(result: dict, tp1, world: int) -> None:
    got = torch.from_numpy(result["logits"])
    want = full_forward_logits(tp1, TOKENS)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"ep={world}")
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    full = tp1.model.layers[0].mlp.experts
    assert full.w13.dtype == torch.float8_e4m3fn
    groups = {2: [[0, 1, 2], [3, 4, 5]], 4: [[0, 1], [2, 3], [4], [5]]}[world]
    for rank, info in enumerate(result["ranks"]):
        assert info["held"] == groups[rank]
        for name in ("w13", "w13_scale", "w2", "w2_scale"):  # exactly the TP=1 model's rows of those experts
            want_rows = _u8(getattr(full, name).data[groups[rank]])
            assert info[name].shape == want_rows.shape, name
            assert (info[name] == want_rows).all(), f"rank {rank} {name}"


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_ep_logits_and_expert_shards_equal_tp1_fp8(world, ckpt):
    tp1 = load_model(ckpt["fp8"], dtype="float32", device="cpu")
    result = run_on_ranks(world, ep_fp8_rank, str(ckpt["fp8"]), TOKENS)
    _check_against_tp1(result, tp1, world)
    # w13 [E_r, 2*96, 160] with per-part scales (one block row for gate, one for up; 2 column blocks)
    assert result["ranks"][0]["w13_scale"].shape == (len(result["ranks"][0]["held"]), 2, 2)
    routed = sum(sum(info["sent"]) for info in result["ranks"])
    assert 0 < routed < len(TOKENS) * EP_FP8["moe_topk"] * EP_FP8["num_layers"]  # identity slots stayed home


def test_fp8_ep_quantize_at_load_and_dummy_equal_tp1(ckpt):
    from longcat_service.config import ModelConfig

    tp1 = load_model(ckpt["bf16"], dtype="float32", device="cpu", quantization="fp8")
    _check_against_tp1(run_on_ranks(2, ep_fp8_rank, str(ckpt["bf16"]), TOKENS, "fp8"), tp1, 2)
    tp1_dummy = load_model(ModelConfig.from_dict({**EP_FP8, "quantization_config": FP8_QUANT}), dtype="float32",
                           device="cpu", load_format="dummy")
    _check_against_tp1(run_on_ranks(2, ep_fp8_rank, None, TOKENS, None, True), tp1_dummy, 2)


def test_fp8_ep_rank_reads_only_its_experts_weights_and_scales(ckpt):
    from tests.test_expert_parallel import ep_reads

    per_rank = run_on_ranks(2, ep_reads, str(ckpt["fp8"]))
    for rank, keys in enumerate(per_rank):
        experts = {int(k.split(".experts.")[1].split(".")[0]) for k in keys}
        assert experts == ({0, 1, 2} if rank == 0 else {3, 4, 5}), keys
        assert any(k.endswith(".weight_scale_inv") for k in keys)


@pytest.mark.parametrize("world", [2, 4])
def test_llm_fp8_ep_greedy_tokens_equal_tp1_fp8(world, ckpt):
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams

    prompts = [[5, 17, 20, 31, 9, 77, 31, 45, 12], [11, 12], list(range(7, 26))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kwargs = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=48, max_model_len=48,
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in LLM(model=str(ckpt["fp8"]), **kwargs).generate(prompts, params)]
    llm = LLM(model=str(ckpt["fp8"]), tensor_parallel_size=world, enable_expert_parallel=True, **kwargs)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.engine.runner.close()
    assert got == want
    assert all(len(t) == 12 for t in got)

"""Expert parallelism on CPU (gloo): EP=2 and EP=4 logits equal TP=1 on tiny checkpoints WITH zero (identity)
experts and an expert count that does not divide evenly (6 experts over 4 ranks: 2, 2, 1, 1); zero-expert slots
never enter the all-to-all; a rank reads only its own experts' tensors; static placements; greedy tokens through
LLM(..., enable_expert_parallel=True)."""

from __future__ import annotations

import json

import pytest
import torch

from longcat_service.distributed.expert_parallel import (
    ExpertPlacement,
    ExpertPlacementError,
    owned_token_range,
)
from longcat_service.model.loader import load_model
from tests.engine_utils import full_forward_logits
from tests.hf_tiny import build_hf_model, save_hf_model
from tests.tp_harness import run_on_ranks

TOKENS = [5, 9, 17, 33, 4, 70, 96, 3, 12, 44, 61]
# top-4 of 6 real + 3 identity experts: most tokens pick at least one identity expert, some none
UNEVEN = dict(vocab_size=97, ffn_hidden_size=40, expert_ffn_hidden_size=12, moe_topk=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_hf_model(build_hf_model("base", seed=1, **UNEVEN), tmp_path_factory.mktemp("ep_ckpt")))


@pytest.fixture(scope="module")
def reference_logits(checkpoint):
    return full_forward_logits(load_model(checkpoint, dtype="float32", device="cpu"), TOKENS)


def ep_logits(checkpoint: str, tokens: list[int], placement=None) -> dict:
    """On every rank: EP on, load (fp32, CPU), one prefill -> rank 0's logits, the experts each rank holds, and
    every layer's all-to-all send counts and routed-slot counts of this rank's token share."""
    import torch.distributed as dist

    from longcat_service.distributed import parallel_state
    from longcat_service.layers.moe import LongcatMoE

    parallel_state.set_expert_parallel(True, placement)
    model = load_model(checkpoint, dtype="float32", device="cpu")
    sends: list[tuple[list[int], int]] = []
    for module in model.modules():
        if isinstance(module, LongcatMoE):
            dispatch = module.dispatcher.dispatch

            def recording(rows, local_expert, send_counts, _dispatch=dispatch):
                sends.append((list(send_counts), rows.shape[0]))
                return _dispatch(rows, local_expert, send_counts)

            module.dispatcher.dispatch = recording
    logits = full_forward_logits(model, tokens).numpy()
    held = {name: (m.experts.local_experts, tuple(m.experts.w13.shape)) for name, m in model.named_modules()
            if isinstance(m, LongcatMoE)}
    gathered: list = [None] * parallel_state.get_tp_size()
    dist.all_gather_object(gathered, {"held": held, "sends": sends})
    return {"logits": logits, "ranks": gathered}


def routed_real_slot_counts(checkpoint: str, tokens: list[int]) -> list[int]:
    """Per MoE layer (forward order): how many of the T*k slots go to real experts, from the TP=1 model's router."""
    from longcat_service import ops
    from longcat_service.layers.moe import LongcatMoE

    model = load_model(checkpoint, dtype="float32", device="cpu")
    counts: list[int] = []

    def hook(module, inputs):
        (x,) = inputs
        ids, _, _ = ops.router_topk(module.router(x), module.router.e_score_correction_bias, module.top_k,
                                    module.routed_scaling_factor, module.experts.num_experts)
        counts.append(int((ids < module.experts.num_experts).sum()))

    for module in model.modules():
        if isinstance(module, LongcatMoE):
            module.register_forward_pre_hook(hook)
    full_forward_logits(model, tokens)
    return counts


@pytest.mark.parametrize("world", [2, 4])
def test_ep_logits_match_tp1_and_zero_experts_stay_home(world, checkpoint, reference_logits):
    result = run_on_ranks(world, ep_logits, checkpoint, TOKENS)
    got = torch.from_numpy(result["logits"])
    torch.testing.assert_close(got, reference_logits, atol=2e-5, rtol=1e-5, msg=f"ep={world}")
    assert got.argmax(-1).tolist() == reference_logits.argmax(-1).tolist()

    # whole experts, split 3+3 over 2 ranks and 2+2+1+1 over 4, full intermediate width (12)
    expected_groups = {2: [[0, 1, 2], [3, 4, 5]], 4: [[0, 1], [2, 3], [4], [5]]}[world]
    for rank, info in enumerate(result["ranks"]):
        for experts, w13_shape in info["held"].values():
            assert experts == expected_groups[rank]
            assert w13_shape == (len(experts), 24, 64)

    # every layer sends exactly its real-expert slots; identity slots (T*k minus those) never travel
    real = routed_real_slot_counts(checkpoint, TOKENS)
    num_layers = len(real)
    assert num_layers > 0
    for layer in range(num_layers):
        sent = sum(sum(info["sends"][layer][0]) for info in result["ranks"])
        assert sent == real[layer]
    assert sum(real) < num_layers * len(TOKENS) * UNEVEN["moe_topk"]  # the model really routes to identity experts


def test_static_placement_gives_same_logits(checkpoint, reference_logits, tmp_path):
    mapping = {str(e): r for e, r in enumerate([1, 0, 1, 0, 0, 1])}
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(mapping))
    result = run_on_ranks(2, ep_logits, checkpoint, TOKENS, str(path))
    torch.testing.assert_close(torch.from_numpy(result["logits"]), reference_logits, atol=2e-5, rtol=1e-5)
    held = [next(iter(info["held"].values()))[0] for info in result["ranks"]]
    assert held == [[1, 3, 4], [0, 2, 5]]


def test_placement_contiguous_and_errors():
    assert ExpertPlacement.contiguous(6, 4).owner == (0, 0, 1, 1, 2, 3)
    assert ExpertPlacement.contiguous(512, 8).experts_of(7) == list(range(448, 512))
    placement = ExpertPlacement.from_mapping({"0": 1, "1": 0, "2": 1}, 3, 2)
    assert placement.local_index == (0, 0, 1)
    with pytest.raises(ExpertPlacementError, match="expert 2 has no rank"):
        ExpertPlacement.from_mapping({"0": 0, "1": 1}, 3, 2)
    with pytest.raises(ExpertPlacementError, match="rank 1 owns no expert"):
        ExpertPlacement.from_mapping({"0": 0, "1": 0}, 2, 2)
    with pytest.raises(ExpertPlacementError, match=r"expert 0 -> rank 5"):
        ExpertPlacement.from_mapping({"0": 5, "1": 0}, 2, 2)
    with pytest.raises(ExpertPlacementError, match="out of range"):
        ExpertPlacement.from_mapping({"9": 0}, 2, 2)
    with pytest.raises(ExpertPlacementError, match="at least one expert per rank"):
        ExpertPlacement.contiguous(3, 4)


def test_owned_token_ranges_tile_the_batch():
    for tokens in (0, 1, 5, 11, 64):
        for world in (1, 2, 3, 4, 8):
            ranges = [owned_token_range(tokens, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == tokens
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1


def ep_reads(checkpoint: str) -> list[str]:
    """Keys of expert tensors this rank read any bytes of (EP on)."""
    from longcat_service.distributed import parallel_state
    from longcat_service.model import loader

    reads: list[str] = []
    real = loader.safe_open

    class Slice:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def get_shape(self):
            return self.inner.get_shape()

        def get_dtype(self):  # metadata only (the FP8 dtype check)
            return self.inner.get_dtype()

        def __getitem__(self, index):
            reads.append(self.key)
            return self.inner[index]

    class File:
        def __init__(self, path, **kw):
            self.ctx = real(path, **kw)

        def __enter__(self):
            self.f = self.ctx.__enter__()
            return self

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return Slice(self.f.get_slice(key), key)

    loader.safe_open = File
    parallel_state.set_expert_parallel(True)
    load_model(checkpoint, dtype="float32", device="cpu")
    import torch.distributed as dist

    gathered: list = [None] * parallel_state.get_tp_size()
    dist.all_gather_object(gathered, sorted({k for k in reads if ".experts." in k}))
    return gathered


def test_each_rank_reads_only_its_experts(checkpoint):
    per_rank = run_on_ranks(2, ep_reads, checkpoint)
    for rank, keys in enumerate(per_rank):
        experts = {int(k.split(".experts.")[1].split(".")[0]) for k in keys}
        assert experts == ({0, 1, 2} if rank == 0 else {3, 4, 5}), keys


def test_llm_ep2_greedy_tokens_and_logprobs_equal_tp1(checkpoint):
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams
    from tests.test_tp_model import _with_demo_tokenizer

    model = _with_demo_tokenizer(checkpoint)
    prompts = [[5, 17, 20, 31, 9, 77, 31, 45, 12, 40, 23], [11, 12], list(range(7, 26)), [50, 51, 52, 53]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    # chunked prefill and mixed prefill/decode batches: token shares change size every step (and go empty)
    kwargs = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=40, max_model_len=48,
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    ref = LLM(model=model, **kwargs).generate(prompts, params)
    llm = LLM(model=model, tensor_parallel_size=2, enable_expert_parallel=True, **kwargs)
    try:
        got = llm.generate(prompts, params)
    finally:
        llm.engine.runner.close()
    for r, g in zip(ref, got, strict=True):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        for lr, lg in zip(r.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert lg.logprob == pytest.approx(lr.logprob, abs=1e-4)


def test_grpc_server_with_ep_serves_tp1_tokens_and_a_dead_rank_ends_it_like_tp():
    """longcat-serve --tensor-parallel-size 2 --enable-expert-parallel on the demo model: greedy tokens equal the
    offline TP=1 engine's; a worker SIGKILLed mid-stream: the stream gets UNAVAILABLE and the server exits 3."""
    import signal
    import sys
    import threading
    import time

    import grpc

    from longcat_service.client import NO_RETRY, LongCatClient
    from longcat_service.client.errors import LongCatError
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams
    from tests.test_tp_server import SERVE_ARGS, Proc, _spawned_worker

    prompt = [5, 17, 200, 31, 9]
    expected = LLM(dtype="float32", device="cpu").generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    server = Proc([sys.executable, "-m", "longcat_service.server.cli", "--port", "0", "--tensor-parallel-size", "2",
                   "--enable-expert-parallel", *SERVE_ARGS])
    try:
        port = int(server.wait_for(r"longcat-serve listening on [\d.]+:(\d+)", 120).group(1))
        with LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            got = client.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True).outputs[0].token_ids
        assert list(got) == list(expected)

        errors: list[BaseException] = []
        got_tokens = threading.Event()

        def stream():
            with LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
                try:
                    for _ in client.generate_stream(prompt, max_tokens=200, temperature=0.0, ignore_eos=True):
                        got_tokens.set()
                except BaseException as e:
                    errors.append(e)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert got_tokens.wait(30)
        start = time.monotonic()
        import os

        os.kill(_spawned_worker(server), signal.SIGKILL)
        assert server.p.wait(timeout=30) == 3, server.text[-3000:]
        assert time.monotonic() - start < 15
        t.join(timeout=30)
        assert len(errors) == 1 and isinstance(errors[0], LongCatError), errors
        assert errors[0].code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.kill_group()


def routed_per_expert(checkpoint: str, tokens: list[int]) -> list[int]:
    """Slots routed to each real expert, summed over the layers, for one TP=1 forward of `tokens`."""
    from longcat_service import ops
    from longcat_service.layers.moe import LongcatMoE

    model = load_model(checkpoint, dtype="float32", device="cpu")
    total = torch.zeros(model.config.n_routed_experts + 1, dtype=torch.int64)

    def hook(module, inputs):
        ids, _, _ = ops.router_topk(module.router(inputs[0]), module.router.e_score_correction_bias, module.top_k,
                                    module.routed_scaling_factor, module.experts.num_experts)
        total.add_(torch.bincount(ids.flatten().long().clamp(max=module.experts.num_experts),
                                  minlength=total.numel()))

    for module in model.modules():
        if isinstance(module, LongcatMoE):
            module.register_forward_pre_hook(hook)
    full_forward_logits(model, tokens)
    return total[:-1].tolist()


def test_collected_expert_load_counts_every_routed_slot_and_feeds_a_placement(checkpoint, monkeypatch):
    from prometheus_client import generate_latest

    from longcat_service.distributed import eplb
    from longcat_service.engine import expert_load
    from longcat_service.llm import LLM
    from longcat_service.sampling_params import SamplingParams
    from longcat_service.server.metrics import ServerMetrics
    from tests.test_tp_model import _with_demo_tokenizer

    monkeypatch.setattr(expert_load, "REFRESH_S", 0.0)
    llm = LLM(model=_with_demo_tokenizer(checkpoint), dtype="float32", device="cpu", collect_expert_load=True,
              enable_prefix_caching=False)
    # max_tokens=1: the prompt's one prefill is the only forward pass
    llm.generate([TOKENS], SamplingParams(temperature=0.0, max_tokens=1))
    counts = llm.engine.load().expert_tokens
    assert list(counts) == routed_per_expert(checkpoint, TOKENS)

    class Admission:
        queued_requests = queued_tokens = 0

    text = generate_latest(ServerMetrics(llm.engine, Admission()).registry).decode()
    assert eplb.counts_from_metrics(text) == [float(c) for c in counts]
    placement = eplb.balanced_placement(eplb.counts_from_metrics(text), 2)
    ExpertPlacement.from_mapping({str(e): r for e, r in placement.items()}, len(counts), 2)  # valid for EP


def test_balanced_placement_beats_contiguous_on_skewed_load(tmp_path, capsys):
    from longcat_service.distributed import eplb

    counts = [100.0, 90.0, 80.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the hot experts are neighbours
    contiguous = dict(enumerate(ExpertPlacement.contiguous(8, 2).owner))
    balanced = eplb.balanced_placement(counts, 2)
    assert sorted(list(balanced.values()).count(r) for r in range(2)) == [4, 4]  # equal weights per rank
    assert max(eplb.rank_loads(counts, balanced, 2)) < max(eplb.rank_loads(counts, contiguous, 2))
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(counts))
    assert eplb.main(["--counts", str(path), "--ranks", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert ExpertPlacement.from_mapping(out, 8, 2).owner == tuple(balanced[e] for e in range(8))
    with pytest.raises(ValueError, match="collect-expert-load"):
        eplb.counts_from_metrics("longcat_requests_total 3\n")

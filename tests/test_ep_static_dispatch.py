"""The fixed-capacity expert-parallel exchange (the CUDA-graph decode path) on CPU with gloo, run eagerly: on random
routings it gives bit-for-bit the variable-split path's MoE output; an overflowing routing raises the overflow
flag on every rank; an empty batch and a batch routed only to zero experts work and send nothing; zero-expert slots
never take a buffer row. Then through the engine: a stand-in for the CUDA-graph runner that runs decode steps
through the fixed-capacity path (eagerly, on CPU) gives TP=1's greedy tokens and logprobs at EP=2, and with a tiny
capacity every overflowing step runs again eagerly and counts in longcat_ep_capacity_overflow_total."""

from __future__ import annotations

import math

import pytest
import torch

from longcat_service.distributed.ep_static_dispatch import capacity_per_peer
from tests.tp_harness import run_on_ranks

E, Z, K, H, INTER = 7, 3, 4, 16, 8


def _case_inputs(seed: int, num_tokens: int, zero_only: bool):
    """The whole batch, the same on every rank: hidden [T, H], ids [T, K] (distinct per token, as a router's),
    weights [T, K], zero_weight [T]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, H, generator=gen)
    if zero_only:
        ids = (E + torch.arange(K) % Z).repeat(num_tokens, 1)[:, :K]
    else:
        ids = torch.rand(num_tokens, E + Z, generator=gen).argsort(dim=1)[:, :K]
    weights = torch.rand(num_tokens, K, generator=gen)
    zero_weight = torch.where(ids >= E, weights, torch.zeros_like(weights)).sum(-1)
    return x, ids, weights, zero_weight


def _expected_overflow(ids: torch.Tensor, world: int, capacity: int) -> bool:
    """Independent count: does any rank's token share send more than `capacity` real slots to one rank?"""
    from longcat_service.distributed.expert_parallel import ExpertPlacement, owned_token_range

    owner = ExpertPlacement.contiguous(E, world).owner
    for rank in range(world):
        start, end = owned_token_range(ids.shape[0], rank, world)
        per_peer = [0] * world
        for e in ids[start:end].flatten().tolist():
            if e < E:
                per_peer[owner[e]] += 1
        if max(per_peer) > capacity:
            return True
    return False


def compare_paths(cases: list[tuple]) -> list:
    """On every rank, per case (seed, tokens, zero_only, capacity_factor): the MoE output of this rank's share
    through both exchanges, and what the fixed-capacity dispatcher received."""
    import torch.distributed as dist

    from longcat_service import ops
    from longcat_service.distributed.ep_static_dispatch import FixedCapacityDispatcher
    from longcat_service.distributed.expert_parallel import AllToAllDispatcher, ExpertPlacement, owned_token_range
    from longcat_service.layers.moe_ep import exchange_static, exchange_variable

    rank, world = dist.get_rank(), dist.get_world_size()
    placement = ExpertPlacement.contiguous(E, world)
    owner, local_row = torch.tensor(placement.owner), torch.tensor(placement.local_index)
    mine = placement.experts_of(rank)
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * INTER, H, generator=gen)[mine], torch.randn(E, H, INTER, generator=gen)[mine]

    def local_experts(rows, local_expert):
        offsets, sorted_slots, slot_rows, _, _ = ops.moe_align(local_expert.to(torch.int32).reshape(-1, 1), len(mine))
        y = ops.expert_ffn(rows, w13, w2, offsets, sorted_slots, 1)
        return y.index_select(0, slot_rows.long().clamp(min=0))

    received: list[torch.Tensor] = []

    class Recording(FixedCapacityDispatcher):
        def dispatch(self, *args):
            out = super().dispatch(*args)
            received.append(out[1])
            return out

    variable, static = AllToAllDispatcher(None, world), Recording(None, world)
    results = []
    for seed, num_tokens, zero_only, factor in cases:
        x, ids, weights, zero_weight = _case_inputs(seed, num_tokens, zero_only)
        start, end = owned_token_range(num_tokens, rank, world)
        share, ids_s, w_s, zw_s = x[start:end], ids[start:end], weights[start:end], zero_weight[start:end]
        out_v, rows_v = exchange_variable(share, ids_s, E, owner, local_row, K, world, variable, local_experts)
        capacity = capacity_per_peer(num_tokens, world, K, factor)
        out_s, rows_s, overflow = exchange_static(share, ids_s, E, owner, local_row, K, len(mine), static,
                                                  local_experts, capacity)
        a = ops.combine(out_v, rows_v, w_s, share, zw_s, True)
        b = ops.combine(out_s, rows_s, w_s, share, zw_s, True)
        results.append({
            "equal": torch.equal(a, b), "overflow": bool(overflow), "capacity": capacity,
            "expected_overflow": _expected_overflow(ids, world, capacity),
            "sent_slots_are_real_slots": torch.equal(rows_s.reshape(ids_s.shape) >= 0, ids_s < E),
            "received_rows": int((received[-1] >= 0).sum()), "buffer_rows": received[-1].numel(),
            "variable_received": sum(variable.last_send_counts), "real_slots": int((ids_s < E).sum()),
        })
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    return gathered


CASES = [
    (1, 7, False, None), (2, 16, False, None), (3, 24, False, 0.5), (4, 16, False, 2.0), (5, 32, False, 1.0),
    (6, 0, False, None), (7, 1, False, None), (8, 5, True, None), (9, 9, False, 0.25),
]


@pytest.mark.parametrize("world", [2, 3])
def test_fixed_capacity_equals_variable_splits_bit_for_bit(world):
    per_rank = run_on_ranks(world, compare_paths, CASES)
    overflowed = []
    for i, (seed, num_tokens, zero_only, _factor) in enumerate(CASES):
        results = [ranks[i] for ranks in per_rank]
        expected = results[0]["expected_overflow"]
        assert all(r["overflow"] == expected for r in results), (seed, results)  # every rank knows
        overflowed.append(expected)
        if expected:
            continue
        for r in results:
            assert r["equal"], (seed, r)
            assert r["sent_slots_are_real_slots"], (seed, r)  # zero-expert slots take no buffer row
        # every real slot arrives once, nothing else is a row: the same rows as the variable path
        assert sum(r["received_rows"] for r in results) == sum(r["real_slots"] for r in results)
        assert sum(r["variable_received"] for r in results) == sum(r["real_slots"] for r in results)
        assert all(r["buffer_rows"] == world * r["capacity"] for r in results)
        if zero_only or num_tokens == 0:
            assert all(r["received_rows"] == 0 for r in results)  # nothing dispatched
    assert any(overflowed) and not all(overflowed)  # the cases cover both


def test_capacity_per_peer():
    assert capacity_per_peer(16, 2, 4) == 32  # the largest share (8) x top-k: never exceeded
    assert capacity_per_peer(17, 2, 4) == 36
    assert capacity_per_peer(16, 2, 4, 1.0) == 16  # a uniform routing's rows per peer
    assert capacity_per_peer(16, 2, 4, 1.5) == 24
    assert capacity_per_peer(16, 2, 4, 100.0) == 32  # never above the bound
    assert capacity_per_peer(0, 4, 12) == 1 and capacity_per_peer(1, 8, 12, 0.01) == 1
    assert capacity_per_peer(256, 8, 12, 2.0) == math.ceil(2 * 32 * 12 / 8)


# ---- through the engine ------------------------------------------------------------------------------------------

class EagerStaticGraphRunner:
    """Stands in for engine/cuda_graph_runner.CUDAGraphRunner on CPU: the decode step it would replay (the forward
    inside static_dispatch, i.e. the fixed-capacity all-to-all), run eagerly."""

    def __init__(self, runner):
        self.runner, self.block_size, self.replays = runner, runner.block_size, 0
        self.flagged = 0  # replays after which some MoE layer's overflow flag was set

    def can_run(self, batch_size: int, max_seq_len: int) -> bool:
        return batch_size > 0

    def run(self, input_ids, positions, slot_mapping, seq_lens, block_tables, device_input_ids=None):
        from longcat_service.distributed.ep_static_dispatch import static_dispatch
        from longcat_service.layers.attention_metadata import AttentionMetadata

        self.replays += 1
        meta = AttentionMetadata.build(query_lens=[1] * len(input_ids), seq_lens=seq_lens, block_tables=block_tables,
                                       block_size=self.block_size, device=self.runner.device)
        ids = device_input_ids if device_input_ids is not None else torch.tensor(input_ids)
        with static_dispatch():
            hidden = self.runner.model(ids, torch.tensor(positions), meta, self.runner.kv_caches)
            logits = self.runner.model.compute_logits(hidden)
        flags = [m.capacity_overflow for m in self.runner.model.modules() if hasattr(m, "capacity_overflow")]
        assert flags
        self.flagged += int(any(bool(f) for f in flags))
        return logits


PROMPTS = [[5, 17, 20, 31, 9, 77, 31, 45, 12, 40, 23], [11, 12], list(range(7, 26)), [50, 51, 52, 53]]
LLM_KWARGS = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=48, max_model_len=48,
                  enable_prefix_caching=False, async_scheduling=False, collect_expert_load=True)


def _params():
    from longcat_service.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)


def ep_engine_rank(model: str, capacity_factor: float | None) -> dict:
    """Every rank runs the same LLM (tp group of the harness, EP on) with the stand-in graph runner."""
    from prometheus_client import generate_latest

    from longcat_service.distributed import parallel_state
    from longcat_service.llm import LLM
    from longcat_service.server.metrics import ServerMetrics

    parallel_state.set_expert_parallel(True, None, capacity_factor)
    llm = LLM(model=model, **LLM_KWARGS)
    runner = llm.engine.runner
    runner.graph_runner = stand_in = EagerStaticGraphRunner(runner)
    out = llm.generate(PROMPTS, _params())
    load = torch.tensor(runner.expert_load.totals())  # this rank's share of the tokens: the sum is the whole
    torch.distributed.all_reduce(load)

    class Admission:
        queued_requests = queued_tokens = 0

    return {"tokens": [o.outputs[0].token_ids for o in out],
            "logprobs": [[lp.logprob for lp in o.outputs[0].logprobs] for o in out],
            "replays": stand_in.replays, "flagged": stand_in.flagged, "overflows": runner.ep_capacity_overflows,
            "expert_load": tuple(load.tolist()),
            "metrics": generate_latest(ServerMetrics(llm.engine, Admission()).registry).decode()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A BF16-style (fp32 here) checkpoint with zero experts and 6 experts over 2 ranks, and a block-FP8 one."""
    from tests.fp8_checkpoint import write_pair
    from tests.hf_tiny import build_hf_model, save_hf_model
    from tests.test_expert_parallel import UNEVEN
    from tests.test_expert_parallel_fp8 import EP_FP8

    return {"bf16": str(save_hf_model(build_hf_model("base", seed=1, **UNEVEN), tmp_path_factory.mktemp("ep_st"))),
            "fp8": str(write_pair(tmp_path_factory.mktemp("ep_st_fp8"), EP_FP8, seed=2)["fp8"])}


@pytest.fixture(scope="module")
def references(models):
    from longcat_service.llm import LLM

    refs = {}
    for kind, path in models.items():
        llm = LLM(model=path, **LLM_KWARGS)
        out = llm.generate(PROMPTS, _params())
        refs[kind] = ([o.outputs[0].token_ids for o in out], [[lp.logprob for lp in o.outputs[0].logprobs] for o in out],
                      llm.engine.runner.expert_load.totals())
    return refs


def _overflow_metric(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("longcat_ep_capacity_overflow_total "):
            return float(line.split()[1])
    raise AssertionError("longcat_ep_capacity_overflow_total not exported")


@pytest.mark.parametrize(("kind", "capacity_factor"), [("bf16", None), ("bf16", 0.01), ("fp8", 0.01)])
def test_engine_decode_through_fixed_capacity_equals_tp1(models, references, kind, capacity_factor):
    got = run_on_ranks(2, ep_engine_rank, models[kind], capacity_factor, timeout_s=300)
    want_tokens, want_logprobs, want_load = references[kind]
    assert got["tokens"] == want_tokens
    for want, have in zip(want_logprobs, got["logprobs"], strict=True):
        assert have == pytest.approx(want, abs=1e-4)
    assert got["replays"] > 0  # decode steps went through the fixed-capacity path
    # each overflowing step ran again eagerly (the tokens and logprobs above) and was counted once
    assert got["overflows"] == got["flagged"]
    if capacity_factor is None:  # buffers sized for the worst routing: never re-run
        assert got["overflows"] == 0
    else:  # one row per peer: most decode steps overflow
        assert 0 < got["overflows"] <= got["replays"]
    assert _overflow_metric(got["metrics"]) == got["overflows"]
    # collect_expert_load counts every step once: a replay that overflowed and ran again is not counted twice
    assert got["expert_load"] == want_load and sum(want_load) > 0


def test_ep_capacity_factor_flag_and_its_errors():
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.errors import EngineArgsError
    from longcat_service.server.cli import build_parser, engine_args_from

    argv = ["--tensor-parallel-size", "2", "--enable-expert-parallel", "--ep-capacity-factor", "1.5"]
    assert engine_args_from(build_parser().parse_args(argv)).ep_capacity_factor == 1.5
    assert EngineArgs().ep_capacity_factor is None
    with pytest.raises(EngineArgsError, match="ep_capacity_factor.*needs enable_expert_parallel"):
        EngineArgs(ep_capacity_factor=2.0)
    for bad in (0, -1.0, "2", True):
        with pytest.raises(EngineArgsError, match="ep_capacity_factor.*must be a number > 0"):
            EngineArgs(enable_expert_parallel=True, ep_capacity_factor=bad)


def test_overflow_counter_is_exported_only_under_expert_parallelism():
    from prometheus_client import generate_latest

    from longcat_service.engine.llm_engine import EngineLoad
    from longcat_service.server.metrics import ServerMetrics

    class Engine:
        overflows = None

        def load(self):
            return EngineLoad(0, 0, 0, 0.0, ep_capacity_overflows=self.overflows)

    class Admission:
        queued_requests = queued_tokens = 0

    engine = Engine()
    metrics = ServerMetrics(engine, Admission())
    assert "longcat_ep_capacity_overflow" not in generate_latest(metrics.registry).decode()
    engine.overflows = 3
    assert _overflow_metric(generate_latest(metrics.registry).decode()) == 3

"""The GPU step is launched without a host sync (ModelRunner.launch's contract): torch's sync debug mode turns any
synchronizing op (.item(), .tolist(), nonzero, a blocking host<->device copy such as torch.tensor(list,
device="cuda")) into an error while a FP8 prefill, a mixed decode + prefill-chunk batch and an eager decode batch
are enqueued. Kernels are compiled and warmed up first (module loads may synchronize)."""

from __future__ import annotations

import json
import time

import pytest
import torch

import longcat_service.ops as ops
from tests.tiny_config import TINY_CONFIG

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if ops.ACTIVE_BACKEND != "extension cpu+cuda":
    pytest.skip(f"CUDA kernels not built (ops backend: {ops.ACTIVE_BACKEND})", allow_module_level=True)

# whole 128-blocks (and K/128 a multiple of 4 where torch's blockwise scaled-mm takes it), >= 8 slots per expert
CONFIG = dict(TINY_CONFIG, vocab_size=1024, hidden_size=512, q_lora_rank=512, kv_lora_rank=128, num_attention_heads=4,
              qk_nope_head_dim=64, qk_rope_head_dim=64, head_dim=64, v_head_dim=64, ffn_hidden_size=512,
              expert_ffn_hidden_size=256, n_routed_experts=8, zero_expert_num=2, moe_topk=2,
              max_position_embeddings=2048)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from longcat_service.engine.engine_args import EngineArgs
    from longcat_service.engine.model_runner import ModelRunner

    path = tmp_path_factory.mktemp("nosync")
    (path / "config.json").write_text(json.dumps(dict(CONFIG, model_type="longcat_flash")))
    args = EngineArgs(model=str(path), dtype="bfloat16", device="cuda", load_format="dummy", quantization="fp8",
                      block_size=16, num_kv_blocks=256, capture_graphs_at_startup=False)
    r = ModelRunner(args, str(path))
    r.graph_runner = None  # decode rows run eagerly (a graph capture is allowed to synchronize)
    return r


def _batches():
    from longcat_service.engine.scheduler import ScheduledSeq
    from longcat_service.engine.sequence import Sequence, SequenceGroup
    from longcat_service.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    seqs, first = [], 0
    for i, n in enumerate((600, 300, 40)):
        prompt = torch.randint(3, CONFIG["vocab_size"], (n,), generator=gen).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        seq = Sequence(SequenceGroup(f"s{i}", prompt, params, time.monotonic()), 0)
        blocks = -(-(n + 4) // 16)
        seq.block_table = list(range(first, first + blocks))
        first += blocks
        seqs.append(seq)
    a, b, c = seqs
    return [
        [ScheduledSeq(a, 600, 0)],  # a whole prompt (grouped FP8 experts: 1200 slots over 8 experts)
        [ScheduledSeq(b, 200, 0)],  # a first chunk ...
        [ScheduledSeq(c, 39, 0), ScheduledSeq(b, 100, 200)],  # ... then a chunk after cached context, beside a prompt
        [ScheduledSeq(c, 1, 39), ScheduledSeq(a, 1, 599)],  # an eager decode batch (attention plan on the device)
        [ScheduledSeq(c, 1, 39), ScheduledSeq(b, 20, 280)],  # a decode row in a mixed batch
    ]


def test_launch_enqueues_every_step_without_a_host_sync(runner):
    batches = _batches()
    for batch in batches:  # compile and warm up (Triton module loads, cuBLAS handles, the rotary table)
        runner.collect(runner.launch(batch))
    torch.cuda.synchronize()
    for batch in batches:
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle = runner.launch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results = runner.collect(handle)  # the step's one sync, by design
        for r, s in zip(results, batch, strict=True):
            assert (r.token_id is not None) == s.needs_sample
            assert r.token_id is None or 0 <= r.token_id < CONFIG["vocab_size"]

"""A model runner that stands in for the accelerator: every step takes a fixed time and samples a fixed token.

Swapped into a real LLMEngine (scheduler, block manager, output processor and AsyncEngine stay real), it lets a
CPU machine drive the service at H200 step rates (LongCat-Flash-2L decodes batch 64 in ~15 ms) to check that the
gRPC path keeps up. `host_ms` of each step holds the GIL (the Python side of a real step: metadata, graph
launch, sampling readback); the rest sleeps with the GIL released, as a CUDA synchronize does.
"""

from __future__ import annotations

import time

from longcat_service.engine.model_runner import SeqStepResult


class FakeComputeRunner:
    def __init__(self, real_runner, step_ms: float, host_ms: float = 2.0):
        if not 0 <= host_ms <= step_ms:
            raise ValueError(f"host_ms: must be in [0, step_ms={step_ms}], got {host_ms}")
        self.real = real_runner  # keeps num_blocks / config / sampler for the engine
        self.step_s, self.host_s = step_ms / 1000.0, host_ms / 1000.0
        self.num_steps = 0
        self.num_tokens = 0

    def __getattr__(self, name):  # config, vocab_size, num_blocks, sampler, ... of the real runner
        return getattr(self.real, name)

    def release(self, seq_id: int) -> None:
        self.real.release(seq_id)

    def execute(self, batch) -> list[SeqStepResult]:
        start = time.perf_counter()
        vocab = self.real.vocab_size
        results = []
        for s in batch:  # a deterministic token of the sequence's state, never EOS-dependent (ignore_eos runs)
            tok = (s.end_pos * 7919 + s.seq.token_ids[0]) % vocab if s.needs_sample else None
            results.append(SeqStepResult(token_id=tok))
        while time.perf_counter() - start < self.host_s:
            pass  # Python work on the host: holds the GIL
        remaining = self.step_s - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)  # the device computes; the GIL is free
        self.num_steps += 1
        self.num_tokens += sum(r.token_id is not None for r in results)
        return results


def install(llm_engine, step_ms: float, host_ms: float) -> FakeComputeRunner:
    """Replace an idle LLMEngine's runner; returns the fake (its counters measure the engine's own rate)."""
    runner = FakeComputeRunner(llm_engine.runner, step_ms, host_ms)
    llm_engine.runner = runner
    return runner

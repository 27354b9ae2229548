"""Shared helpers for the engine tests: a small-cache engine on the demo model and a no-cache reference."""

from __future__ import annotations

import torch

from longcat_service.engine.engine_args import EngineArgs
from longcat_service.engine.llm_engine import LLMEngine
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.model.kv_cache import allocate_kv_caches
from longcat_service.sampling_params import SamplingParams

PROMPTS = [  # mixed lengths (block_size 4 below: some cross several blocks, one is shorter than a block)
    [5, 17, 200, 31, 9, 77, 310, 45, 12, 400, 23],
    [101, 102],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
    [250, 251, 252, 253],
    [60, 61, 62, 63, 64, 65, 66],
]


def make_engine(**kwargs) -> LLMEngine:
    defaults = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_model_len=256)
    defaults.update(kwargs)
    return LLMEngine(EngineArgs(**defaults))


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def run_to_completion(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], max_steps=10_000):
    """Add every request, step until all finish; return {request_id: final RequestOutput} and all step outputs."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    final, stream = {}, []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            stream.append(out)
            if out.finished:
                final[out.request_id] = out
    assert not engine.has_unfinished_requests()
    return final, stream


@torch.inference_mode()
def full_forward_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits of every position from one prefill over a fresh cache (no reuse of earlier steps)."""
    block_size = 16
    num_blocks = -(-len(token_ids) // block_size)
    param = next(model.parameters())
    caches = allocate_kv_caches(model.config, num_blocks, block_size, param.dtype, param.device)
    n = len(token_ids)
    md = AttentionMetadata.build([n], [n], [list(range(num_blocks))], block_size, param.device)
    hidden = model(torch.tensor(token_ids, device=param.device), torch.arange(n, device=param.device), md, caches)
    return model.compute_logits(hidden).float()


def reference_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding by full recompute of the whole sequence at every step."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(full_forward_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting

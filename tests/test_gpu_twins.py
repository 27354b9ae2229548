"""GPU twins of the CPU suite: our CUDA model (Triton decode path, CUDA MoE ops, CUDA graphs) against our CPU
model, which tests/test_model_parity.py checks against transformers 4.57 (so this is parity with HF by
transitivity: the device's transformers 5.17 cannot load the per-expert tiny checkpoints, spec §8.10).
"""

from __future__ import annotations

import pytest
import torch

from longcat_service.config import ModelConfig
from longcat_service.layers.attention_metadata import AttentionMetadata
from longcat_service.model.kv_cache import allocate_kv_caches
from longcat_service.model.loader import load_model
from tests.tiny_config import TINY_CONFIG

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = {**TINY_CONFIG, "max_position_embeddings": 512}
BLOCK = 4
PROMPTS = [[5, 9, 11, 3, 8, 1, 4], [2, 60, 7], [99] * 13, list(range(10, 40))]
TABLES = [[0, 1, 20], [4, 21], [6, 2, 8, 9, 22], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _twin_models(dtype):
    config = ModelConfig.from_dict(TINY)
    cpu = load_model(config, dtype=dtype, device="cpu", load_format="dummy", seed=3)
    with torch.no_grad():  # larger-than-dummy weights so that routing and attention matter
        for name, p in cpu.named_parameters():
            if "norm" not in name:
                p.copy_((torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.08).to(p.dtype))
    gpu = load_model(config, dtype=dtype, device="cuda", load_format="dummy", seed=3)
    gpu.load_state_dict(cpu.state_dict())
    return config, cpu, gpu


def _run(model, config, dtype, device, prompts, tables, steps):
    """Prefill every prompt, then `steps` batched decode steps; returns the decode logits of each step."""
    caches = allocate_kv_caches(config, 24, BLOCK, dtype, device)
    toks = [list(p) for p in prompts]
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            meta = AttentionMetadata.build([len(p)], [len(p)], [tables[i]], BLOCK, device)
            h = model(torch.tensor(p, device=device), torch.arange(len(p), device=device), meta, caches)
            toks[i].append(int(model.compute_logits(h[-1:]).argmax(-1)))
        out = []
        for _ in range(steps):
            lens = [len(t) for t in toks]
            meta = AttentionMetadata.build([1] * len(toks), lens, tables, BLOCK, device)
            ids = torch.tensor([t[-1] for t in toks], device=device)
            pos = torch.tensor([n - 1 for n in lens], device=device)
            logits = model.compute_logits(model(ids, pos, meta, caches))
            out.append(logits.cpu())
            for t, nxt in zip(toks, logits.argmax(-1).tolist(), strict=True):
                t.append(nxt)
    return out, caches


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_gpu_model_matches_cpu_model(dtype, tol):
    config, cpu, gpu = _twin_models(dtype)
    ref, _ = _run(cpu, config, dtype, "cpu", PROMPTS, TABLES, steps=1)
    ours, _ = _run(gpu, config, dtype, "cuda", PROMPTS, TABLES, steps=1)
    assert _rel(ours[0], ref[0]) < tol


def test_batch_invariance_of_decode():
    """A sequence's decode logits do not depend on what else is in the batch (fp32)."""
    config, _, gpu = _twin_models(torch.float32)
    alone, _ = _run(gpu, config, torch.float32, "cuda", PROMPTS[2:3], TABLES[2:3], steps=3)
    batched, _ = _run(gpu, config, torch.float32, "cuda", PROMPTS, TABLES, steps=3)
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b[2:3], a) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype):
    from longcat_service.engine.cuda_graph_runner import CUDAGraphRunner

    config, _, gpu = _twin_models(dtype)
    prompts, tables = PROMPTS[:3], TABLES[:3]
    _, caches = _run(gpu, config, dtype, "cuda", prompts, tables, steps=0)
    graph_caches = [c.clone() for c in caches]
    lens = [len(p) + 1 for p in prompts]
    ids, pos = [17, 33, 5], [n - 1 for n in lens]
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos, strict=True)]
    with torch.inference_mode():
        meta = AttentionMetadata.build([1] * 3, lens, tables, BLOCK, "cuda")
        eager = gpu.compute_logits(gpu(torch.tensor(ids, device="cuda"), torch.tensor(pos, device="cuda"), meta, caches))
    runner = CUDAGraphRunner(gpu, graph_caches, BLOCK, max_blocks_per_seq=16, buckets=(1, 4, 8))
    before = [c.clone() for c in graph_caches]
    graph = runner.run(ids, pos, slots, lens, tables).clone()  # batch 3 padded to bucket 4
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # GEMMs at M=4 vs M=3 may round differently
    assert _rel(graph, eager) < tol
    others = torch.ones(graph_caches[0].shape[0] * BLOCK, dtype=torch.bool)
    others[slots] = False
    for g, e, b in zip(graph_caches, caches, before, strict=True):
        assert _rel(g, e) < tol
        assert torch.equal(g.view(-1, g.shape[-1])[others.cuda()], b.view(-1, b.shape[-1])[others.cuda()])
    # a second replay with other inputs reuses the graph and still matches eager
    lens2 = [n + 1 for n in lens]
    pos2 = [n - 1 for n in lens2]
    slots2 = [t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos2, strict=True)]
    with torch.inference_mode():
        meta2 = AttentionMetadata.build([1] * 3, lens2, tables, BLOCK, "cuda")
        eager2 = gpu.compute_logits(gpu(torch.tensor(ids, device="cuda"), torch.tensor(pos2, device="cuda"), meta2,
                                        caches))
    graph2 = runner.run(ids, pos2, slots2, lens2, tables)
    assert len(runner.graphs) == 1 and _rel(graph2, eager2) < tol


def test_mla_decode_real_shapes_bf16():
    from longcat_service.kernels.mla_decode import mla_decode, mla_decode_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    lens = [1, 700, 1500, 33]
    bs, heads, rank, rope = 16, 64, 512, 64
    blocks = sum(-(-n // bs) for n in lens) + 4
    cache = torch.randn(blocks, bs, rank + rope, device="cuda", generator=gen).bfloat16()
    perm = torch.randperm(blocks, device="cuda", generator=gen)
    tables = torch.zeros(len(lens), max(-(-n // bs) for n in lens), dtype=torch.int32, device="cuda")
    k = 0
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        tables[i, :nb] = perm[k : k + nb].int()
        k += nb
    q_lat = torch.randn(len(lens), heads, rank, device="cuda", generator=gen).bfloat16()
    q_rope = torch.randn(len(lens), heads, rope, device="cuda", generator=gen).bfloat16()
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = mla_decode_reference(q_lat, q_rope, cache, tables, seq, 0.0722)
    out = mla_decode(q_lat, q_rope, cache, tables, seq, 0.0722)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("batch", [1, 64])
def test_mla_decode_graph_replay_real_shapes_bf16(batch):
    """MLA decode at the real shapes (64 heads, 512 + 64, W_UV 128 columns), eager and as a CUDA graph captured at
    one set of lengths and replayed with another (runtime merge loop bounds)."""
    from longcat_service.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_uv_reference

    gen = torch.Generator(device="cuda").manual_seed(batch)
    bs, heads, rank, rope, dv, max_len = 16, 64, 512, 64, 128, 1000
    per_row = -(-max_len // bs)
    cache = torch.randn(batch * per_row + 4, bs, rank + rope, device="cuda", generator=gen).bfloat16()
    perm = torch.randperm(cache.shape[0], device="cuda", generator=gen)
    tables = perm[: batch * per_row].view(batch, per_row).int()
    q_lat = torch.randn(batch, heads, rank, device="cuda", generator=gen).bfloat16()
    q_rope = torch.randn(batch, heads, rope, device="cuda", generator=gen).bfloat16()
    w_uv = (torch.randn(heads, dv, rank, device="cuda", generator=gen) * 0.05).bfloat16()
    first = [512 if i % 2 == 0 else 1000 for i in range(batch)]
    second = [1000 if i % 2 == 0 else 512 for i in range(batch)]
    seq = torch.tensor(first, dtype=torch.int32, device="cuda")
    args = (q_lat, q_rope, cache, tables, seq, 0.0722)
    for uv in (None, w_uv):
        seq.copy_(torch.tensor(first, dtype=torch.int32))
        ref = mla_decode_reference(*args) if uv is None else mla_decode_uv_reference(*args, uv)
        assert _rel(mla_decode(*args, w_uv=uv), ref) < 1e-2
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = mla_decode(*args, w_uv=uv)
        for lens in (second, first):
            seq.copy_(torch.tensor(lens, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            ref = mla_decode_reference(*args) if uv is None else mla_decode_uv_reference(*args, uv)
            assert _rel(captured, ref) < 1e-2, (uv is not None, lens[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_moe_graph_is_bit_identical_to_inline_moe(dtype, monkeypatch):
    """Inside graph capture of small batches the shortcut MoE runs on a side stream
    (LONGCAT_MOE_OVERLAP_MAX_TOKENS): the same kernels on the same inputs, so logits and cache writes must equal
    the inline capture exactly."""
    from longcat_service.engine.cuda_graph_runner import CUDAGraphRunner

    config, _, gpu = _twin_models(dtype)
    prompts, tables = PROMPTS[:3], TABLES[:3]
    _, caches = _run(gpu, config, dtype, "cuda", prompts, tables, steps=0)
    lens = [len(p) + 1 for p in prompts]
    ids, pos = [17, 33, 5], [n - 1 for n in lens]
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos, strict=True)]
    results = {}
    for overlap in ("8", "0"):
        monkeypatch.setenv("LONGCAT_MOE_OVERLAP_MAX_TOKENS", overlap)
        graph_caches = [c.clone() for c in caches]
        runner = CUDAGraphRunner(gpu, graph_caches, BLOCK, max_blocks_per_seq=16, buckets=(4,))
        logits = [runner.run(ids, pos, slots, lens, tables).clone() for _ in range(3)]  # replays agree too
        torch.cuda.synchronize()
        results[overlap] = (logits, graph_caches)
    (l1, c1), (l0, c0) = results["8"], results["0"]
    assert all(torch.equal(x, l0[0]) for x in l1 + l0)
    assert all(torch.equal(a, b) for a, b in zip(c1, c0, strict=True))

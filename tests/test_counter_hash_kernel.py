"""The one-launch seeded-uniform kernel (kernels/counter_hash.py) against its spec, the torch hash of
engine/seeded_draws.py (hashed_uniforms_at_reference), bit for bit: extreme seeds (0, 2^32 +- 1, 2^63 - 1, 2^64 - 1,
negative ones through row_seed), positions around 2^30 and 2^32 (where counters wrap) and negative bases (the low
32 bits), every kind, strided views of the sampled graph's buffers, odd and zero row counts, blocks past the first.
A few values also against the plain-integer reference of tests/test_seeded_draws.py. Without a GPU the kernel runs
in Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py); on CUDA the GPU tests compare it with the CPU torch
hash, eagerly, replayed from a CUDA graph, and count its launches in a sampled step's uniforms."""

from __future__ import annotations

import collections
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from longcat_service.engine import seeded_draws as sd  # noqa: E402
from longcat_service.engine.seeded_draws import ACCEPT, DRAFT, NUM_KINDS, TARGET, RowSeeds  # noqa: E402
from longcat_service.engine.spec_sampled import StepUniforms, _step_counters  # noqa: E402
from longcat_service.kernels.counter_hash import hashed_uniforms_at  # noqa: E402
from tests.test_seeded_draws import ref_uniform  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"  # the kernel: compiled on a GPU, interpreted without one
EXTREME_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1,
                 sd.row_seed(-1, 0), sd.row_seed(-(2**63), 0)]
EDGE_POSITIONS = [0, 1, 2**30 - 2, 2**30 - 1, 2**30, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 3]


def _keys(seeds, device=DEVICE, pad: int = 0) -> torch.Tensor:
    """[4, R] seed keys as the sampled graph holds them: rows 1..4 of a [5, R + pad] buffer (strides R + pad, 1)."""
    cols = torch.tensor(sd.seed_columns(list(seeds) + [None] * pad), dtype=torch.int64, device=device)
    return cols[1:, : len(seeds)]


def _random_seeds(n: int, gen: torch.Generator) -> list[int]:
    hi = torch.randint(0, 2**32, (n,), generator=gen).tolist()
    lo = torch.randint(0, 2**32, (n,), generator=gen).tolist()
    return [(h << 32) | v for h, v in zip(hi, lo, strict=True)]  # all 64 bits random


def _check(keys, base, offsets):
    """The kernel on DEVICE == the torch hash on the CPU."""
    got = hashed_uniforms_at(keys, base, offsets)
    want = sd.hashed_uniforms_at_reference(keys.cpu(), base.cpu(), offsets.cpu())
    assert got.dtype == torch.float64 and got.shape == (base.shape[0], offsets.shape[0])
    assert torch.equal(got.cpu(), want)
    return got


@pytest.mark.parametrize("rows", [0, 1, 3, 37])
def test_kernel_equals_the_torch_hash(rows):
    gen = torch.Generator().manual_seed(rows)
    seeds = (EXTREME_SEEDS + _random_seeds(rows, gen))[:rows]
    base = torch.cat((torch.tensor(EDGE_POSITIONS), torch.randint(0, 2**31, (rows,), generator=gen)))[:rows]
    # every kind at several offsets, kind 3 (unused, in the counter space) and the offsets of a step at k = 3
    offsets = torch.cat((torch.arange(4 * 5), _step_counters(3, torch.device("cpu"))))
    got = _check(_keys(seeds, pad=3), base.to(DEVICE), offsets.to(DEVICE)).cpu()  # 37 x 34 elements: 5 blocks of 256
    if rows:
        assert ((got >= 0) & (got < 1)).all()
        for r in range(rows):  # the plain-integer spec at a few counters
            for j in (0, 1, 2, 4 * 3 + 2, offsets.shape[0] - 1):
                pos, kind = divmod(int(offsets[j]), NUM_KINDS)
                assert got[r, j].item() == ref_uniform(seeds[r], int(base[r]) + pos, kind)


def test_kernel_on_strided_step_inputs_and_wrapping_counters():
    """The sampled step's own inputs: start = positions.view(b, k + 1)[:, 0] (stride k + 1), its step counters; bases
    whose counters wrap past 2^32 and negative ones (the low 32 bits, as & (2^32 - 1) on int64)."""
    gen = torch.Generator().manual_seed(7)
    for k in (1, 2, 3):
        b = 5
        seeds = _random_seeds(b, gen)
        positions = torch.randint(0, 2**31, (b * (k + 1),), generator=gen)
        positions[0], positions[k + 1] = 2**30 - 1, 2**32 - 2
        _check(_keys(seeds, pad=2), positions.to(DEVICE).view(b, k + 1)[:, 0], _step_counters(k, torch.device(DEVICE)))
    base = torch.tensor([-1, -(2**40) - 5, 2**60 - 1, 2**40 + 7], device=DEVICE)
    _check(_keys(_random_seeds(4, gen)), base, torch.tensor([ACCEPT, TARGET, DRAFT, 4 + DRAFT], device=DEVICE))
    no_cols = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    _check(_keys(EXTREME_SEEDS[:2]), torch.tensor([3, 4], device=DEVICE), no_cols)


def test_step_uniforms_split_the_kernel_output():
    """StepUniforms (the sampled step's call: the kernel on CUDA, the torch hash on the CPU) takes its accept /
    target / draft uniforms from the right counters."""
    seeds = [5, 2**64 - 1, 123456789]
    start = torch.tensor([10, 2**30 - 1, 0], device=DEVICE)
    k = 2
    u = StepUniforms.of(RowSeeds.from_columns(torch.tensor(sd.seed_columns(seeds), device=DEVICE)), start, k)
    for r, s in enumerate(seeds):
        p = int(start[r])
        assert u.accept[r].tolist() == [ref_uniform(s, p + 1 + j, ACCEPT) for j in range(k)]
        assert u.target[r].tolist() == [ref_uniform(s, p + 1 + j, TARGET) for j in range(k + 1)]
        assert u.drafts[r].tolist() == [ref_uniform(s, p + 1 + j, DRAFT) for j in range(2 * k + 1)]


def test_bad_inputs_raise():
    keys, base, offs = _keys([1, 2]), torch.tensor([0, 1], device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="keys"):
        hashed_uniforms_at(keys[:3], base, offs)
    with pytest.raises(ValueError, match="rows"):
        hashed_uniforms_at(keys, base[:1], offs)
    with pytest.raises(ValueError, match="int64"):
        hashed_uniforms_at(keys, base.int(), offs)
    with pytest.raises(ValueError, match="offsets"):
        hashed_uniforms_at(keys, base, offs[None])


# ---- on a GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_cuda_kernel_equals_the_cpu_torch_hash_eager_and_in_a_graph():
    gen = torch.Generator().manual_seed(3)
    rows = 517
    seeds = EXTREME_SEEDS + _random_seeds(rows - len(EXTREME_SEEDS), gen)
    base = torch.cat((torch.tensor(EDGE_POSITIONS), torch.randint(0, 2**31, (rows - len(EDGE_POSITIONS),),
                                                                  generator=gen)))
    offsets = torch.cat((torch.arange(4 * 5), _step_counters(3, torch.device("cpu"))))
    want = sd.hashed_uniforms_at_reference(_keys(seeds, "cpu"), base, offsets)
    keys_d, base_d, offs_d = _keys(seeds, "cuda", pad=5), base.cuda(), offsets.cuda()
    assert torch.equal(sd.hashed_uniforms_at(keys_d, base_d, offs_d).cpu(), want)  # the engine's entry point
    # captured with other inputs, replayed after the static buffers were refilled (as the sampled graph does)
    static_keys, static_base = torch.zeros_like(keys_d), torch.zeros_like(base_d)
    sd.hashed_uniforms_at(static_keys, static_base, offs_d)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sd.hashed_uniforms_at(static_keys, static_base, offs_d)
    static_keys.copy_(keys_d)
    static_base.copy_(base_d)
    graph.replay()
    assert torch.equal(out.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_a_sampled_steps_uniforms_are_one_kernel_launch():
    """The census of StepUniforms.of on CUDA: one kernel (the torch hash it replaced launched ~30: printed)."""
    b, k = 16, 3
    seeds = RowSeeds.from_columns(torch.tensor(sd.seed_columns(list(range(b))), device="cuda"))
    start = torch.arange(b, device="cuda") * 100

    def kernels(fn) -> collections.Counter:
        fn()  # compiles, builds the cached step counters
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return collections.Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    ours = kernels(lambda: StepUniforms.of(seeds, start, k))
    torch_hash = kernels(lambda: sd.hashed_uniforms_at_reference(seeds.keys, start, _step_counters(k, start.device)))
    print("kernel:", dict(ours), "\ntorch hash:", sum(torch_hash.values()), "kernels")
    assert sum(ours.values()) == 1 and "_counter_uniforms_kernel" in next(iter(ours))
    assert sum(torch_hash.values()) >= 25

"""kernels/compile_watch: Triton specializations first built after the start-up warm-up are logged once and
counted; an existing hook keeps running; manual warm-up compiles are not reported."""

from __future__ import annotations

import logging

import pytest

from longcat_service.kernels import compile_watch


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(compile_watch, "_seen", {})
    monkeypatch.setattr(compile_watch, "_installed", False)
    try:
        from triton import knobs
    except ImportError:
        return
    # the process-wide knob gets its old value back after the test
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", knobs.runtime.jit_post_compile_hook)


def _call(hook, repr_text: str, warmup: bool = False):
    return hook(key=("k",), repr=repr_text, fn=None, compile={}, is_manual_warmup=warmup, already_compiled=False)


def test_each_specialization_is_logged_once_and_counted(fresh, caplog):
    hook = compile_watch._hook(None)
    with caplog.at_level(logging.WARNING, logger=compile_watch.__name__):
        _call(hook, "_prefill_fwd[num_warps=4](n: i32)")
        _call(hook, "_prefill_fwd[num_warps=4](n: i32)")
        _call(hook, "_rms_norm_kernel[num_warps=4](x: *bf16)")
        _call(hook, "_silu_mul_kernel(...)", warmup=True)  # triton's own warmup(): not a request's time
    assert compile_watch.compiles_after_warm_up() == {"_prefill_fwd[num_warps=4](n: i32)": 2,
                                                      "_rms_norm_kernel[num_warps=4](x: *bf16)": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "_prefill_fwd" in messages[0] and "_rms_norm_kernel" in messages[1]


def test_builds_during_a_later_engines_warm_up_are_not_reported(fresh, caplog):
    hook = compile_watch._hook(None)
    with caplog.at_level(logging.WARNING, logger=compile_watch.__name__):
        with compile_watch.warming_up():  # e.g. an fp32 engine built after a bf16 one installed the watch
            _call(hook, "_rms_norm_kernel(x: *fp32)")
        _call(hook, "_silu_mul_kernel(x: *fp32)")  # a request's build, after that warm-up
    assert compile_watch.compiles_after_warm_up() == {"_silu_mul_kernel(x: *fp32)": 1}
    assert [r.getMessage().count("_silu_mul_kernel") for r in caplog.records] == [1]


def test_an_existing_hook_still_runs_and_its_result_is_kept(fresh):
    calls = []

    def previous(**kwargs):
        calls.append(kwargs["repr"])
        return "kept"

    hook = compile_watch._hook(previous)
    assert _call(hook, "a") == "kept" and calls == ["a"]
    assert compile_watch.compiles_after_warm_up() == {"a": 1}


def test_install_chains_onto_the_triton_knob_once(fresh, monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(kw["repr"]))
    assert compile_watch.watch_compiles_after_warm_up()
    installed = knobs.runtime.jit_post_compile_hook
    assert compile_watch.watch_compiles_after_warm_up() and knobs.runtime.jit_post_compile_hook is installed
    _call(installed, "b")
    assert seen == ["b"] and compile_watch.compiles_after_warm_up() == {"b": 1}


@pytest.mark.gpu
def test_a_new_specialization_on_the_gpu_is_reported(fresh):
    """New keys that every Triton version builds anew: another pointer dtype and another constexpr value. (Integer
    specialization, e.g. n=17 against n=32, is version-dependent: Triton 3.6 on the H200 built one binary for both.)"""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (Triton compiles nothing in the CPU interpreter)")
    triton = pytest.importorskip("triton")
    tl = triton.language

    @triton.jit
    def _watched_copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    assert compile_watch.watch_compiles_after_warm_up()
    x32 = torch.arange(40, dtype=torch.float32, device="cuda")
    y32 = torch.empty_like(x32)
    x16, y16 = x32.half(), torch.empty_like(x32.half())
    def builds() -> int:
        torch.cuda.synchronize()
        return sum(v for k, v in compile_watch.compiles_after_warm_up().items() if "_watched_copy" in k)

    # counted as increments: how many hook calls one build makes is Triton's business (Triton 3.6 on the H200
    # counted 6 for the 3 builds below, under one repr), that a launch of an already built key adds none is ours
    start = builds()
    _watched_copy[(1,)](x32, y32, 19, BLOCK=64)  # a first build
    first = builds()
    _watched_copy[(1,)](x32, y32, 19, BLOCK=64)  # the same key: no build
    same = builds()
    _watched_copy[(1,)](x16, y16, 19, BLOCK=64)  # fp16 pointers: a new build
    fp16 = builds()
    _watched_copy[(1,)](x32, y32, 19, BLOCK=128)  # another constexpr: a new build
    block = builds()
    _watched_copy[(1,)](x16, y16, 19, BLOCK=64)  # built already
    again = builds()
    assert first > start and same == first, (start, first, same)
    assert fp16 > same and block > fp16 and again == block, (fp16, block, again)
    assert torch.equal(y32[:19], x32[:19]) and torch.equal(y16[:19], x16[:19])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_after_the_engine_warm_up_requests_build_no_triton_kernel(dtype):
    """Warm-up covers what an engine of each dtype runs: requests of many lengths, sampling, logprobs, n > 1 and
    cached prefixes build no new Triton specialization (an fp32 model used to log seven on its first requests)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from longcat_service.llm import LLM

    before = compile_watch.compiles_after_warm_up()
    llm = LLM(device="cuda", dtype=dtype, max_num_seqs=16)
    # an earlier engine of this process (the other dtype) installed the watch: this one's warm-up is not counted
    assert compile_watch.compiles_after_warm_up() == before
    _varied_requests(llm, max_tokens=(8, 8, 5))
    assert compile_watch.compiles_after_warm_up() == before


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "k"), [("bfloat16", 1), ("float32", 3)])
def test_after_the_mtp_engine_warm_up_requests_build_no_triton_kernel(dtype, k):
    """With MTP on, the start-up warm-up (spec-step graphs of every bucket, eager prefill and verify steps) covers
    what requests run: spec decode steps of many batch sizes, mixed prefill + verify steps, sampling, cached
    prefixes build no new Triton specialization and capture no new graph."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from longcat_service.demo import DEMO_CHECKPOINT_DIR
    from longcat_service.llm import LLM

    before = compile_watch.compiles_after_warm_up()
    llm = LLM(model=str(DEMO_CHECKPOINT_DIR), device="cuda", dtype=dtype, max_num_seqs=16,
              speculative_config={"method": "mtp", "num_speculative_tokens": k})
    assert compile_watch.compiles_after_warm_up() == before
    graphs = llm.engine.runner.spec_decoder.graphs
    captured = set(graphs.graphs)
    assert captured == {(kind, b) for kind in graphs.kinds() for b in graphs.buckets}
    _varied_requests(llm, max_tokens=(12, 12, 7))
    assert compile_watch.compiles_after_warm_up() == before
    assert set(graphs.graphs) == captured


def _varied_requests(llm, max_tokens):
    """Prompts of many lengths under greedy, top-p/top-k and n=2 + logprobs + penalties sampling, each batch followed
    by a cached prefix plus a few new tokens. max_tokens: one per sampling setting."""
    import torch

    from longcat_service.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 2, 7, 16, 17, 31, 64, 100, 333, 1000)]
    greedy, top, multi = max_tokens
    params = [SamplingParams(temperature=0.0, max_tokens=greedy, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=top, ignore_eos=True, seed=1),
              SamplingParams(temperature=0.7, n=2, logprobs=3, max_tokens=multi, ignore_eos=True,
                             repetition_penalty=1.1, presence_penalty=0.2)]
    for p in params:
        llm.generate(prompts, p)
        llm.generate([prompts[-1] + [5, 6, 7]], p)  # a cached prefix plus a few new tokens

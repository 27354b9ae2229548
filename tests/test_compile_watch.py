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
    x = torch.arange(40, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    _watched_copy[(1,)](x, y, 17, BLOCK=64)  # n = 17: not a multiple of 16
    _watched_copy[(1,)](x, y, 32, BLOCK=64)  # n = 32: another specialization
    _watched_copy[(1,)](x, y, 19, BLOCK=64)  # same key as 17: no new build
    torch.cuda.synchronize()
    built = [k for k in compile_watch.compiles_after_warm_up() if "_watched_copy" in k]
    assert len(built) == 2
    assert torch.equal(y[:19], x[:19])

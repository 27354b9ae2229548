"""Reports Triton kernel specializations that a process first compiles after its start-up warm-up.

Triton compiles one binary per kernel and specialization. Among the keys are integer arguments equal to 1 or
divisible by 16, dtypes and constexprs. A key that the warm-up did not produce compiles inside a request's time:
hundreds of ms, or less when TRITON_CACHE_DIR already holds the binary. On a fresh H200 server the first serving run
reached 0.75 of offline throughput and the second 1.00 (benchmarks/RESULTS.md, session 4).

After `watch_compiles_after_warm_up()`, each such compile is logged at WARNING with the kernel and its argument
types and counted (`compiles_after_warm_up()`). That data says which shapes the warm-up must add, or which
arguments to mark do_not_specialize. The log also reads the same triton knob that the hook goes into, so an
existing hook keeps running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_seen: dict[str, int] = {}  # kernel repr -> times compiled after the warm-up (several devices: one each)
_installed = False
_warming_up = 0  # engines in their start-up warm-up now: their builds are the warm-up's, not a request's


@contextmanager
def warming_up() -> Iterator[None]:
    """Builds inside are not reported: a second engine in a process whose watch is installed already (tests,
    benchmarks, an fp32 and a bf16 engine) warms up without its warm-up being logged as request-time builds."""
    global _warming_up
    with _lock:
        _warming_up += 1
    try:
        yield
    finally:
        with _lock:
            _warming_up -= 1


def record_compile(repr_text: str) -> None:
    """Count one compile of a kernel specialization and log it the first time (not during a warm-up)."""
    with _lock:
        if _warming_up:
            return
        first = repr_text not in _seen
        _seen[repr_text] = _seen.get(repr_text, 0) + 1
    if first:
        logger.warning("Triton built a kernel specialization after the start-up warm-up (compiled, or loaded from "
                       "TRITON_CACHE_DIR, inside a request's time; add its shape to ModelRunner.warm_up_prefill): %s",
                       repr_text)


def compiles_after_warm_up() -> dict[str, int]:
    with _lock:
        return dict(_seen)


def _hook(previous):
    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (triton's names)
        if not is_manual_warmup:
            record_compile(repr)
        if previous is not None:
            return previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled)
        return None

    return hook


def watch_compiles_after_warm_up() -> bool:
    """Install the hook (once per process). False without triton or without the knob (then nothing is
    reported)."""
    global _installed
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    with _lock:
        if not _installed:
            runtime.jit_post_compile_hook = _hook(runtime.jit_post_compile_hook)
            _installed = True
    return True

"""Compile Triton kernels for sm_90 (Hopper) on a machine without a GPU: the tests' offline checks of wgmma, TMA,
shared memory and register spills, which the CPU interpreter cannot see."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SM90_SHARED_MEMORY = 227 * 1024  # bytes a thread block may use on an H200 SM


def compile_for_sm90(script: str) -> list[str]:
    """Run `script` (Python that compiles kernels with triton.compile for sm_90 and prints a line per kernel, the
    kernel's shared memory last) in a subprocess outside the interpreter; its output lines. Skips the test when
    Triton's CUDA backend is not installed; fails it when the script fails."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        pytest.skip("triton's CUDA backend is not installed")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()


def assert_fits_shared_memory(lines: list[str]) -> None:
    for line in lines:
        assert int(line.split()[-1]) <= SM90_SHARED_MEMORY, line

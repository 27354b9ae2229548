"""The extension build and the backend selection in longcat_service.ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.extension_switch import skip_without_extension

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _extension_built() -> bool:
    return any((ROOT / "longcat_service").glob("_C*.so")) or _run_python("import longcat_service._C").returncode == 0


def test_force_reference_env_selects_reference():
    proc = _run_python(
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import longcat_service.ops as ops, longcat_service.ops.reference as r\n"
        "assert ops.moe_forward is r.moe_forward\n"
        "print(ops.ACTIVE_BACKEND)",
        LONGCAT_FORCE_REFERENCE="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference (LONGCAT_FORCE_REFERENCE is set)"
    assert "longcat ops backend: reference" in proc.stderr


@skip_without_extension(_extension_built(), "extension not built: pip install --no-build-isolation -e .")
def test_extension_loads_after_torch_and_reports_backend():
    proc = _run_python(
        "import json, logging; logging.basicConfig(level=logging.INFO)\n"
        "import torch, longcat_service.ops as ops\n"
        "from longcat_service import _C\n"
        "names = ['router_topk', 'moe_align', 'expert_ffn', 'combine', 'dense_gemv', 'dense_gemv_fp8',\n"
        "         'expert_ffn_fp8']\n"
        "print(json.dumps([ops.ACTIVE_BACKEND, _C.built_with_cuda(), [hasattr(torch.ops.longcat, n) for n in names]]))",
        LONGCAT_FORCE_REFERENCE="0",
    )
    assert proc.returncode == 0, proc.stderr
    backend, cuda_built, registered = json.loads(proc.stdout)
    assert backend == ("extension cpu+cuda" if cuda_built else "extension cpu")
    assert registered == [True] * 7
    assert f"longcat ops backend: {backend}" in proc.stderr
    if torch.version.cuda is None:
        assert not cuda_built, "a CPU-only torch cannot have loaded CUDA kernels"


# Without torch the build now fails saying what to run, and LONGCAT_BUILD_EXT=0 installs pure Python on purpose
# (issue 14): tests/test_setup_decision.py tests that decision.


def test_setup_with_torch_declares_the_extension():
    proc = _run_python(
        "import setuptools\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})\n"
        "print([e.name for e in captured['ext_modules']])"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['longcat_service._C']"


@skip_without_extension(_extension_built(), "extension not built: pip install --no-build-isolation -e .")
def test_cxx_error_from_extension_becomes_runtime_error():
    # In a subprocess: a mislinked extension (static libstdc++) segfaults here instead of raising.
    proc = _run_python(
        "import torch, longcat_service._C\n"
        "try:\n"
        "    torch.ops.longcat.router_topk(torch.zeros(2, 8), torch.zeros(7), 2, 1.0, 4)\n"
        "except RuntimeError as exc:\n"
        "    print('raised', 'correction_bias' in str(exc))\n",
        LONGCAT_FORCE_REFERENCE="0",
    )
    assert proc.returncode == 0, f"rc={proc.returncode} {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "raised True"

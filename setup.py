"""Build: `pip install --no-build-isolation [-e] .` after installing torch.

CMake (CMakeLists.txt) builds the torch-op extension `longcat_service._C` against the torch that is
importable at build time. Without torch the package installs as pure Python and runs the reference ops.
Env: LONGCAT_BUILD_CUDA=0/1 (default: auto), LONGCAT_CUDA_ARCHS="90a;80" (default 90a),
MAX_JOBS (default: min(4, cpu count)).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DLONGCAT_OUTPUT_DIR={out_path.parent}",
            f"-DLONGCAT_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        cuda = os.environ.get("LONGCAT_BUILD_CUDA")
        if cuda is not None:
            args.append(f"-DLONGCAT_BUILD_CUDA={'ON' if cuda.strip() in ('1', 'ON', 'on', 'true') else 'OFF'}")
        if os.environ.get("LONGCAT_CUDA_ARCHS"):
            args.append(f"-DLONGCAT_CUDA_ARCHS={os.environ['LONGCAT_CUDA_ARCHS']}")
        if shutil.which("ninja") or _ninja_from_wheel():
            args += ["-G", "Ninja"]
            if _ninja_from_wheel() and not shutil.which("ninja"):
                args.append(f"-DCMAKE_MAKE_PROGRAM={_ninja_from_wheel()}")
        jobs = os.environ.get("MAX_JOBS") or str(min(4, os.cpu_count() or 1))
        cmake = shutil.which("cmake") or "cmake"
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        verbose = ["--verbose"] if os.environ.get("LONGCAT_VERBOSE_BUILD") else []
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs, *verbose], check=True)
        if not out_path.exists():
            raise RuntimeError(f"CMake did not produce {out_path}")


def _ninja_from_wheel() -> str | None:
    try:
        import ninja
    except ImportError:
        return None
    path = Path(ninja.BIN_DIR) / "ninja"
    return str(path) if path.exists() else None


def _extensions() -> list[Extension]:
    try:
        import torch  # noqa: F401
    except ImportError:
        warnings.warn(
            "torch is not importable at build time: building longcat-service without the C++/CUDA "
            "extension (the pure-PyTorch reference ops will be used). Install torch first and build "
            "with --no-build-isolation to get the extension.",
            stacklevel=1,
        )
        return []
    return [CMakeExtension("longcat_service._C")]


setup(ext_modules=_extensions(), cmdclass={"build_ext": CMakeBuild})

"""Build: `pip install --no-build-isolation [-e] .` after installing torch.

CMake (CMakeLists.txt) builds the torch-op extension `longcat_service._C` against the torch that is
importable at build time. Without torch the build fails with a message that says what to run (pip's default
isolated build has no torch, and installing the package silently without its extension left users on the slow
reference ops); LONGCAT_BUILD_EXT=0 installs pure Python on purpose (reference ops).
Env: LONGCAT_BUILD_EXT=0/1 (default 1), LONGCAT_BUILD_CUDA=0/1 (default: auto), LONGCAT_CUDA_ARCHS="90a;80"
(default 90a), MAX_JOBS (default: min(4, cpu count)), LONGCAT_VERBOSE_BUILD=1 (every compiler command line).
Ninja's progress lines ([k/N] Building ...) are printed, and also written to the terminal when pip captures the
output (pip shows a build's output only with -v or after a failure).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


NO_TORCH_MESSAGE = """
longcat-service: torch is not importable in this build environment, so the C++/CUDA extension cannot be built
against the torch that will load it (pip builds in an isolated environment without torch unless told otherwise).
Run:
    pip install torch            # the CPU or CUDA build you want, first
    pip install --no-build-isolation .
or, to install without the extension on purpose (pure-PyTorch reference ops, much slower):
    LONGCAT_BUILD_EXT=0 pip install .
"""


def extension_wanted(env: Mapping[str, str]) -> bool:
    """LONGCAT_BUILD_EXT: 1 (default) builds the extension, 0 installs pure Python on purpose."""
    wanted = env.get("LONGCAT_BUILD_EXT", "1").strip().lower()
    if wanted in ("0", "off", "false", "no"):
        return False
    if wanted not in ("1", "on", "true", "yes"):
        raise SetupError(f"LONGCAT_BUILD_EXT must be 0 or 1, got {env['LONGCAT_BUILD_EXT']!r}")
    return True


def extension_plan(env: Mapping[str, str], torch_importable: bool) -> bool:
    """True: build longcat_service._C; False: pure Python on purpose (LONGCAT_BUILD_EXT=0).
    Raises SetupError (saying what to run) when the extension is wanted but torch is missing."""
    if not extension_wanted(env):
        return False
    if not torch_importable:
        raise SetupError(NO_TORCH_MESSAGE)
    return True


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class CMakeBuild(build_ext):
    def run(self) -> None:
        # decided here, not when setup() is called: making an sdist needs no torch
        if self.extensions and not extension_plan(os.environ, _torch_importable()):
            self.extensions = []
        super().run()

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
        _run_showing_progress([cmake, "--build", str(build_dir), "--parallel", jobs, *verbose])
        if not out_path.exists():
            raise RuntimeError(f"CMake did not produce {out_path}")


def _ninja_from_wheel() -> str | None:
    try:
        import ninja
    except ImportError:
        return None
    path = Path(ninja.BIN_DIR) / "ninja"
    return str(path) if path.exists() else None


def _run_showing_progress(cmd: list[str]) -> None:
    """Run the build, echoing its output; when our stdout is captured (pip), ninja's [k/N] lines also go to the
    terminal, so a minutes-long compile is not silent."""
    tty = None
    if not sys.stdout.isatty():
        try:
            tty = open("/dev/tty", "w")  # noqa: SIM115
        except OSError:
            tty = None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if tty is not None and line.startswith("["):
                tty.write(f"longcat-service build: {line}")
                tty.flush()
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
    finally:
        if tty is not None:
            tty.close()


if __name__ == "__main__":  # tests load this file for extension_plan without building
    setup(ext_modules=[CMakeExtension("longcat_service._C")] if extension_wanted(os.environ) else [],
          cmdclass={"build_ext": CMakeBuild})

"""The README's two fresh-machine commands stay true: CI runs the test command verbatim, and the entry points
they name exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_the_two_fresh_machine_commands():
    serve, tests = _quick_start_commands()[:2]
    assert serve.endswith("longcat-serve")
    assert "torch==2.13.0" in serve and "torch==2.13.0" in tests  # a CPU build, never an unpinned CUDA torch
    assert tests.endswith("pytest -q -rs -n 2 --dist loadscope") and '".[test]"' in tests


def test_ci_runs_the_readme_test_command_verbatim():
    readme = _quick_start_commands()[1]
    tests_command = readme[readme.index("pip install torch"):]  # after creating the venv, which CI does itself
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests_command in ci
    assert "ruff check" in ci


def test_console_scripts_named_in_the_readme_exist():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), name
        assert f"def {func}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text(), name
    assert {"longcat-serve", "longcat-client"} <= set(scripts)

"""longcat_service/envs.py is the one place of every LONGCAT_* switch: lazily read, validated, the README's table
generated from it, and no other code reads such a variable from the environment."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_service import envs

ROOT = Path(__file__).resolve().parents[1]
README_BEGIN, README_END = envs.README_BEGIN, envs.README_END
# LONGCAT_* names that are not switches of ours: chat-template constants, CMake-internal variables and the
# docker compose variable of the model volume (deploy/docker-compose.yml).
NOT_SWITCHES = {"LONGCAT_EOS", "LONGCAT_CHAT_TEMPLATE", "LONGCAT_WITH_CUDA", "LONGCAT_OUTPUT_DIR",
                "LONGCAT_EXT_SUFFIX", "LONGCAT_MODEL_DIR"}


def _sources(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern) if "generated" not in p.parts)


def test_readme_table_is_generated_from_the_module():
    readme = (ROOT / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    cli = subprocess.run([sys.executable, "-m", "longcat_service.envs", "--markdown"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True).stdout
    assert table == cli == envs.markdown_table(), "regenerate: python -m longcat_service.envs --update-readme"
    for switch in envs.SWITCHES:
        assert f"| `{switch.name}` |" in table


def _environ_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every read of a literal LONGCAT_* variable: os.environ.get / os.getenv / os.environ[...]
    loads / `in os.environ`."""

    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    def literal(node) -> str | None:
        ok = isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("LONGCAT_")
        return node.value if ok else None

    reads = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            f = node.func
            if (f.attr in ("get", "pop", "setdefault") and is_environ(f.value)) or f.attr == "getenv":
                name = literal(node.args[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_environ(node.value):
            name = literal(node.slice)
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            name = literal(node.left)
        if name:
            reads.append((node.lineno, name))
    return reads


def test_no_module_but_envs_reads_a_longcat_variable():
    offenders = []
    for path in _sources("longcat_service/**/*.py", "benchmarks/**/*.py"):
        if path == ROOT / "longcat_service" / "envs.py":
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line} reads {name}"
                      for line, name in _environ_reads(ast.parse(path.read_text()))]
    assert not offenders, "read it through longcat_service.envs:\n" + "\n".join(offenders)


def test_the_read_finder_sees_every_form():
    code = ('import os\nos.environ.get("LONGCAT_A")\nos.getenv("LONGCAT_B", "1")\nx = os.environ["LONGCAT_C"]\n'
            '"LONGCAT_D" in os.environ\nos.environ["LONGCAT_E"] = "1"\nos.environ.get("OTHER")\n')
    assert [name for _, name in _environ_reads(ast.parse(code))] == ["LONGCAT_A", "LONGCAT_B", "LONGCAT_C",
                                                                       "LONGCAT_D"]


def test_every_longcat_name_in_code_scripts_and_docs_is_a_known_switch():
    """A deleted switch leaves no trace: not in the package, the C++/CUDA sources, the build, the benchmark
    scripts (gpu_session.sh included), the tests, the README, docs/ or deploy/ (benchmarks/RESULTS.md is history)."""
    known = {s.name for s in envs.SWITCHES} | NOT_SWITCHES
    files = _sources("longcat_service/**/*.py", "csrc/**/*", "benchmarks/*.py", "benchmarks/*.sh", "tests/*.py",
                     "docs/*.md", "README.md", "setup.py", "CMakeLists.txt", "deploy/**/*")
    unknown = []
    for path in files:
        if path.is_file():
            text = path.read_text()
            macros = set(re.findall(r"#define\s+(LONGCAT_\w+)", text))  # C preprocessor macros are code
            for name in sorted(set(re.findall(r"\bLONGCAT_[A-Z0-9_]*[A-Z0-9]\b", text)) - macros):
                if name not in known and path.name != "test_envs.py":
                    unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, "\n".join(unknown)


def test_csrc_reads_only_switches_of_the_table():
    reads = set()
    for path in _sources("csrc/**/*"):
        if path.is_file():
            reads |= set(re.findall(r'getenv\("(LONGCAT_\w+)"\)', path.read_text()))
    assert reads == {"LONGCAT_FFN_DECODE_KERNEL", "LONGCAT_FP8_GEMV_SPLITK", "LONGCAT_FP8_GEMV_MMA"}
    assert all(name in {s.name for s in envs.SWITCHES} for name in reads)


def test_reads_are_lazy_and_typed(monkeypatch):
    monkeypatch.delenv("LONGCAT_DENSE_GEMV_ROWS", raising=False)
    assert envs.LONGCAT_DENSE_GEMV_ROWS == 2
    monkeypatch.setenv("LONGCAT_DENSE_GEMV_ROWS", " 0 ")
    assert envs.LONGCAT_DENSE_GEMV_ROWS == 0
    monkeypatch.setenv("LONGCAT_DENSE_GEMV_ROWS", "")  # empty = unset
    assert envs.LONGCAT_DENSE_GEMV_ROWS == 2
    for raw, value in (("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)):
        monkeypatch.setenv("LONGCAT_ENFORCE_EAGER", raw)
        assert envs.LONGCAT_ENFORCE_EAGER is value
    monkeypatch.setenv("LONGCAT_TP_HEARTBEAT_TIMEOUT_S", "2.5")
    assert envs.LONGCAT_TP_HEARTBEAT_TIMEOUT_S == 2.5
    monkeypatch.setenv("LONGCAT_FFN_DECODE_KERNEL", "V3")
    assert envs.LONGCAT_FFN_DECODE_KERNEL == "v3"


@pytest.mark.parametrize("name,raw", [("LONGCAT_ENFORCE_EAGER", "maybe"), ("LONGCAT_DENSE_GEMV_ROWS", "-1"),
                                      ("LONGCAT_DENSE_GEMV_ROWS", "two"), ("LONGCAT_TP_HEARTBEAT_TIMEOUT_S", "0"),
                                      ("LONGCAT_FFN_DECODE_KERNEL", "v9")])
def test_bad_values_name_the_variable(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=name):
        getattr(envs, name)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError):
        envs.LONGCAT_NO_SUCH_SWITCH  # noqa: B018
    assert len({s.name for s in envs.SWITCHES}) == len(envs.SWITCHES)

"""The import structure of longcat_service, read statically (ast, every import including those inside functions):
no cycles, and no import from a lower layer to a higher one. The layers are the table in docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "longcat_service"
TOP = "longcat_service"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        if "generated" in f.relative_to(PACKAGE).parts:  # protobuf stubs: generated code, imports only grpc
            continue
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imported(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The longcat_service modules `module` imports (a `from pkg import name` counts as pkg.name when that is a
    module, else as pkg); the compiled extension and the generated stubs are left out."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods or a.name == "_C" else source
                       for a in node.names]
        else:
            continue
        for t in targets:
            if not t.startswith(TOP) or t.endswith("._C") or ".server.generated" in t:
                continue
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t != module:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imported(m, p, mods) for m, p in mods.items()}


def _layer_table() -> dict[str, int]:
    """docs/architecture.md's '| n | `a`, `b` |' rows -> {name: n} (a package, or a module of the package root)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layers = {}
    for number, names in re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            layers[name] = int(number)
    assert len(set(layers.values())) >= 6, "docs/architecture.md lost its layer table"
    return layers


def _unit(module: str) -> str:
    """longcat_service.engine.llm_engine -> engine; longcat_service.envs -> envs; longcat_service -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_imports_between_layers():
    layers = _layer_table()
    graph = _graph()
    unplaced = sorted({_unit(m) for m in graph} - set(layers))
    assert not unplaced, f"put these in docs/architecture.md's layer table: {unplaced}"
    upward = [f"{m} (layer {layers[_unit(m)]}) imports {t} (layer {layers[_unit(t)]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets)
              if layers[_unit(t)] < layers[_unit(m)]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("source,expected", [
    ("from longcat_service import envs\n", {"longcat_service.envs"}),
    ("from longcat_service.engine.model_runner import ModelRunner\n", {"longcat_service.engine.model_runner"}),
    ("def f():\n    from ..engine import model_runner\n", {"longcat_service.engine.model_runner"}),
    ("import longcat_service.ops as ops\nfrom longcat_service import _C\n", {"longcat_service.ops"}),
])
def test_the_import_reader_sees_every_form(tmp_path, source, expected):
    """The checks above are only as good as this reader: module-level, lazy and relative imports all count."""
    f = tmp_path / "probe.py"
    f.write_text(source)
    assert _imported("longcat_service.layers.probe", f, _modules()) == expected


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    layers = _layer_table()
    assert layers["server"] < layers["engine"] < layers["model"] < layers["layers"] < layers["ops"] < layers["kernels"]


def test_the_client_sdk_imports_only_itself_and_the_generated_stubs():
    """longcat_service.client works without torch and without the server: docs/architecture.md's rule for it."""
    outside = [f"{m} imports {t}" for m, targets in sorted(_graph().items()) if _unit(m) == "client"
               for t in sorted(targets) if _unit(t) != "client"]
    assert not outside, "\n".join(outside)

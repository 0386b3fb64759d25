"""The package's architecture, checked: the layers and independent stages of .importlinter, no import
cycle between any two modules, no module reaching into another's private names, and every stage module
registered with a complete Stage."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llmcycle"


def _graph() -> dict[str, set[str]]:
    """module -> the llmcycle modules it imports (at the top or inside functions)."""
    grimp = pytest.importorskip("grimp", reason="import-linter is not installed (pip install import-linter)")
    graph = grimp.build_graph("llmcycle")
    return {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}


def test_the_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install import-linter)")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), str(ROOT / ".importlinter")], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 kept, 0 broken" in proc.stdout


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None (depth-first search, colouring the nodes)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_module_is_part_of_an_import_cycle():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmcycle"):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_every_stage_is_registered_with_a_complete_contract():
    from llmcycle.stages import registry

    on_disk = {p.stem for p in (PACKAGE / "stages").glob("*.py")} | {
        p.name for p in (PACKAGE / "stages").iterdir() if (p / "__init__.py").exists()}
    assert on_disk - {"__init__", "contract", "registry"} == set(registry.NAMES)
    for stage in registry.STAGES:
        assert callable(stage.run) and callable(stage.variants) and stage.summary, stage.name
    with pytest.raises(Exception, match="unknown stage 'tuen'.*did you mean 'tune'"):
        registry.get("tuen")

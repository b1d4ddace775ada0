"""The code's layout holds: iss imports no module that (transitively) imports it back, and the stage modules
import only the stages before them in the order data flows (iss.stages' docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import iss.stages

SOURCE = Path(iss.stages.__file__).resolve().parents[1]  # src/iss
STAGE_ORDER = ["context", "price", "inputs", "retrieval", "warmup", "influence", "select", "train", "mechanism"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The iss modules a file imports when it is imported (top level, not under ``if TYPE_CHECKING``)."""
    imported = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from iss.stages import select` imports the submodule iss.stages.select
            imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in imported if name.startswith("iss")}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in SOURCE.rglob("*.py")}
    return {name: (runtime_imports(path) & set(files)) - {name} for name, path in files.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports, if any (depth-first search); a package importing its own submodules is not one."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if target.startswith(node + "."):
                continue
            if state.get(target) == "open":
                return [*path, node, target]
            if target not in state and (found := visit(target, [*path, node])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_module_of_iss_imports_itself_back():
    graph = import_graph()
    assert "iss.pipeline" in graph and "iss.stages.select" in graph
    assert cycle(graph) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["iss.stages.context"] = graph["iss.stages.context"] | {"iss.pipeline"}  # pipeline -> stages -> context
    assert cycle(graph) is not None


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_a_stage_module_imports_only_the_stages_before_it(stage):
    imported = import_graph()[f"iss.stages.{stage}"]
    later = {f"iss.stages.{name}" for name in STAGE_ORDER[STAGE_ORDER.index(stage) :]}
    assert not imported & later
    assert not imported & {"iss.pipeline", "iss.estimate", "iss.cli", "iss.api", "iss.report"}

"""The code's layout holds: each subpackage of iss is one concept, and the subpackages form layers that import
only downwards (data flows from the run folder and the config up to the pipeline, the report and the commands).
No module imports one that (transitively) imports it back, and the stage modules import only the stages before
them in the order data flows (iss.stages' docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import iss.stages

SOURCE = Path(iss.stages.__file__).resolve().parents[1]  # src/iss
STAGE_ORDER = ["context", "plan", "price", "inputs", "retrieval", "warmup", "influence", "select", "train", "mechanism"]
# lowest first: a module may import its own subpackage and any layer below its own, never one beside or above it
LAYERS = [
    ["iss.errors", "iss._version", "iss._moved"],
    ["iss.runs"],  # the run folder, the stage engine, the processes of a run
    ["iss.config"],
    ["iss.data"],
    ["iss.modeling"],
    ["iss.training", "iss.retrieval"],
    ["iss.influence"],
    ["iss.selection"],
    ["iss.comparison"],
    ["iss.stages"],
    ["iss.pipeline"],
    ["iss.report"],
    ["iss.api"],
    ["iss.cli"],
    ["iss.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, lazy: bool) -> set[str]:
    """The iss modules a file imports when it is imported (top level, not under ``if TYPE_CHECKING``), and with
    ``lazy`` also those its functions import when they run."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if lazy else tree.body
    skipped = {id(n) for top in tree.body if _type_checking(top) for n in ast.walk(top)}
    imported = set()
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from iss.stages import select` imports the submodule iss.stages.select
            # (`from iss import stages` imports iss.stages, not what the package's front names)
            package = {node.module} if node.module != "iss" else set()
            imported |= {*package, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in imported if name == "iss" or name.startswith("iss.")}


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    files = {module_name(path): path for path in SOURCE.rglob("*.py")}
    return {name: (imports(path, lazy) & set(files)) - {name} for name, path in files.items()}


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest listed name it is or lies under."""
    matches = [(len(name), index) for index, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]  # fmt: skip
    if module == "iss":  # the package's lazy front (iss.select, iss.Pipeline, ...) names what lies above it
        return len(LAYERS)
    assert matches, f"{module} is in no layer: add its subpackage to LAYERS"
    return max(matches)[1]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


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


def violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            same_package = package_of(target) == package_of(module) or target.startswith(module + ".")
            if not same_package and layer_of(target) >= layer_of(module):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def test_every_module_lies_in_a_layer_and_imports_only_below_it():
    graph = import_graph(lazy=True)  # an import inside a function is still a dependency
    assert {"iss.pipeline.run", "iss.stages.select", "iss.runs.folder"} <= set(graph)
    assert violations(graph) == []


def test_the_layer_rule_finds_a_planted_upward_import():
    graph = import_graph(lazy=True)
    graph["iss.modeling.model"] = graph["iss.modeling.model"] | {"iss.selection.methods"}
    graph["iss.training.loop"] = graph["iss.training.loop"] | {"iss.retrieval.bm25"}  # beside it: not allowed
    assert violations(graph) == [
        "iss.modeling.model -> iss.selection.methods",
        "iss.training.loop -> iss.retrieval.bm25",
    ]


def test_no_two_modules_share_a_name_and_a_job():
    """A module's own name says its job: the same file name in two subpackages (the old ``retrieval.py`` and
    ``stages/retrieval.py``) is allowed only for a stage, whose module is named after the stage it runs."""
    names: dict[str, list[str]] = {}
    for path in SOURCE.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(module_name(path))
    shared = {stem: mods for stem, mods in names.items() if len(mods) > 1}
    assert all(sum(not m.startswith("iss.stages.") for m in mods) <= 1 for mods in shared.values()), shared
    assert all(len({package_of(m) for m in mods}) == len(mods) for mods in shared.values()), shared


def test_no_module_of_iss_imports_itself_back():
    graph = import_graph()
    assert cycle(graph) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["iss.stages.context"] = graph["iss.stages.context"] | {"iss.pipeline.run"}  # run -> stages -> context
    assert cycle(graph) is not None


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_a_stage_module_imports_only_the_stages_before_it(stage):
    imported = import_graph()[f"iss.stages.{stage}"]
    later = {f"iss.stages.{name}" for name in STAGE_ORDER[STAGE_ORDER.index(stage) :]}
    assert not imported & later


def test_old_module_paths_import_with_a_deprecation_warning():
    import importlib
    import sys

    for old in ("iss.compare", "iss.model"):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="moved to"):
            module = importlib.import_module(old)
        assert callable(module.verdicts if old == "iss.compare" else module.per_sample_lm_loss)
    from iss.modeling import batches

    assert sys.modules["iss.model"].per_sample_lm_loss is batches.per_sample_lm_loss  # a split module: a view


def test_the_package_docs_point_at_what_exists():
    """Defects a reader meets first: the front docstring's config, select's list of methods, the licence."""
    import re

    import iss
    from iss.api import select
    from iss.config.schema import SELECTION_METHOD_NAMES

    root = SOURCE.parents[1]
    configs = re.findall(r"configs/[\w/.-]+\.yaml", iss.__doc__)
    assert configs and all((root / path).is_file() for path in configs), configs
    named = select.__doc__.split("method: ", 1)[1].split("budget: ")[0]
    assert all(re.search(rf"\b{re.escape(name)}\b", named) for name in SELECTION_METHOD_NAMES), named
    assert "MIT License" in (root / "LICENSE").read_text(encoding="utf-8")

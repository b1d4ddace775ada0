"""Module paths of iss 0.3 that moved into subpackages in 0.4: each still imports, for one version, with a
``DeprecationWarning`` that names the new home (a notebook or script written for 0.3 keeps working).

A module that moved whole is the same module object under both names (patching one patches the other); one whose
contents were split over several modules is a view that looks each name up in its new homes, in order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    "iss.analysis": ("iss.stages.analysis",),
    "iss.compare": ("iss.comparison.verdict",),
    "iss.distributed": ("iss.retrieval.ray_bm25", "iss.influence.ray_scoring"),
    "iss.dsir": ("iss.selection.dsir",),
    "iss.engine": ("iss.runs.engine",),
    "iss.estimate": ("iss.pipeline.estimate", "iss.pipeline.calibration"),
    "iss.evaluation": ("iss.training.finetuning",),
    "iss.family": ("iss.modeling.family",),
    "iss.frozen": ("iss.modeling.frozen",),
    "iss.gradients": ("iss.influence.gradients",),
    "iss.knn": ("iss.selection.knn",),
    "iss.layers": ("iss.modeling.layers",),
    "iss.methods": ("iss.selection.methods",),
    "iss.model": ("iss.modeling.model", "iss.modeling.batches", "iss.modeling.precision"),
    "iss.parallel": ("iss.runs.processes",),
    "iss.plan": ("iss.stages.plan",),
    "iss.selectors": ("iss.selection.selectors",),
    "iss.stats": ("iss.comparison.stats",),
    "iss.tokenization": ("iss.modeling.tokenizer",),
    "iss.topk": ("iss.retrieval.topk",),
}


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules: each attribute is read from the first that has it."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name)
        self.__homes = [importlib.import_module(home) for home in homes]

    def __getattr__(self, attribute: str):
        for home in self.__homes:
            if hasattr(home, attribute):
                return getattr(home, attribute)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r}")


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(homes)} in iss 0.4; the old path goes in 0.5",
            DeprecationWarning,
            stacklevel=4,
        )
        if len(homes) == 1:
            return importlib.import_module(homes[0])
        return _SplitModule(spec.name, homes)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the new homes are imported already."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import iss`` does)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())

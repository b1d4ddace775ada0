"""iss: Influential Subset Selection. Pick the corpus subset that helps one end task most, then pretrain on it.

The library behind the ``iss`` command::

    import iss

    subset = iss.select(task="../shared/data/tasks/acl_arc", corpus="../shared/data/corpus/general.jsonl",
                        budget="500 docs", config="configs/chemprot.yaml")

``select`` is one call; :class:`Pipeline` runs (or reuses) each stage of a config in a run folder;
:class:`InfluenceScorer` scores candidates against a task from any model; the methods a run compares are in
:data:`SELECTION` and :data:`EVALUATED`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from iss import _moved
from iss._version import __version__
from iss.errors import ConfigError, DataError, IssError

_moved.install()  # the module paths of 0.3, for one version

if TYPE_CHECKING:
    from iss.api import select
    from iss.comparison.verdict import TaskVerdict, verdicts
    from iss.config.io import load_config
    from iss.config.schema import IssConfig
    from iss.influence.scorer import InfluenceObjective, InfluenceResult, InfluenceScorer, LanguageModelObjective
    from iss.pipeline.run import Pipeline
    from iss.retrieval.topk import TopK
    from iss.selection.methods import EVALUATED, SELECTION, Candidates, EvaluatedMethod, SelectionMethod

# imported on first use: `iss --help` and `import iss.config` need none of torch, datasets or scikit-learn
_LAZY = {
    "select": "iss.api",
    "IssConfig": "iss.config.schema",
    "load_config": "iss.config.io",
    "InfluenceResult": "iss.influence.scorer",
    "InfluenceScorer": "iss.influence.scorer",
    "InfluenceObjective": "iss.influence.scorer",
    "LanguageModelObjective": "iss.influence.scorer",
    "TaskVerdict": "iss.comparison.verdict",
    "verdicts": "iss.comparison.verdict",
    "EVALUATED": "iss.selection.methods",
    "SELECTION": "iss.selection.methods",
    "Candidates": "iss.selection.methods",
    "EvaluatedMethod": "iss.selection.methods",
    "SelectionMethod": "iss.selection.methods",
    "Pipeline": "iss.pipeline.run",
    "TopK": "iss.retrieval.topk",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'iss' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "EVALUATED",
    "SELECTION",
    "Candidates",
    "ConfigError",
    "DataError",
    "EvaluatedMethod",
    "InfluenceObjective",
    "InfluenceResult",
    "InfluenceScorer",
    "IssConfig",
    "IssError",
    "LanguageModelObjective",
    "Pipeline",
    "SelectionMethod",
    "TaskVerdict",
    "TopK",
    "__version__",
    "load_config",
    "select",
    "verdicts",
]

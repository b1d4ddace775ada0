"""iss: Influential Subset Selection. Pick the corpus subset that helps one end task most, then pretrain on it.

The library behind the ``iss`` command::

    import iss

    subset = iss.select(task="../shared/data/tasks/acl_arc", corpus="../shared/data/corpus/general.jsonl",
                        budget="500 docs", config="configs/quick.yaml")

``select`` is one call; :class:`Pipeline` runs (or reuses) each stage of a config in a run folder;
:class:`InfluenceScorer` scores candidates against a task from any model; the methods a run compares are in
:data:`SELECTION` and :data:`EVALUATED`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from iss._version import __version__
from iss.errors import ConfigError, DataError, IssError

if TYPE_CHECKING:
    from iss.api import select
    from iss.compare import TaskVerdict, verdicts
    from iss.config import IssConfig, load_config
    from iss.influence import InfluenceObjective, InfluenceResult, InfluenceScorer, LanguageModelObjective
    from iss.methods import EVALUATED, SELECTION, Candidates, EvaluatedMethod, SelectionMethod
    from iss.pipeline import Pipeline
    from iss.topk import TopK

# imported on first use: `iss --help` and `import iss.config` need none of torch, datasets or scikit-learn
_LAZY = {
    "select": "iss.api",
    "IssConfig": "iss.config",
    "load_config": "iss.config",
    "InfluenceResult": "iss.influence",
    "InfluenceScorer": "iss.influence",
    "InfluenceObjective": "iss.influence",
    "LanguageModelObjective": "iss.influence",
    "TaskVerdict": "iss.compare",
    "verdicts": "iss.compare",
    "EVALUATED": "iss.methods",
    "SELECTION": "iss.methods",
    "Candidates": "iss.methods",
    "EvaluatedMethod": "iss.methods",
    "SelectionMethod": "iss.methods",
    "Pipeline": "iss.pipeline",
    "TopK": "iss.topk",
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

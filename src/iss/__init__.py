"""iss: Influential Subset Selection. Pick the corpus subset that helps one end task most, then pretrain on it.

The library behind the ``iss`` command::

    import iss

    subset = iss.select(task="../shared/data/tasks/acl_arc", corpus="../shared/data/corpus/general.jsonl",
                        budget="500 docs", config="configs/quick.yaml")

``select`` is one call; :class:`Pipeline` runs (or reuses) each stage of a config in a run folder;
:class:`InfluenceScorer` scores candidates against a task from any model; the methods a run compares are in
:data:`SELECTION` and :data:`EVALUATED`.
"""

from iss._version import __version__
from iss.api import select
from iss.config import IssConfig, load_config
from iss.errors import ConfigError, DataError, IssError
from iss.influence import InfluenceResult, InfluenceScorer
from iss.methods import EVALUATED, SELECTION, Candidates, EvaluatedMethod, SelectionMethod
from iss.pipeline import Pipeline
from iss.topk import TopK

__all__ = [
    "EVALUATED",
    "SELECTION",
    "Candidates",
    "ConfigError",
    "DataError",
    "EvaluatedMethod",
    "InfluenceResult",
    "InfluenceScorer",
    "IssConfig",
    "IssError",
    "Pipeline",
    "SelectionMethod",
    "TopK",
    "__version__",
    "load_config",
    "select",
]

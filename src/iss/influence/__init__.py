"""Influence of a corpus document on a task sample: per-sample gradients at one layer
(:mod:`~iss.influence.gradients`), the scorer that keeps each task sample's top candidates
(:mod:`~iss.influence.scorer`) and its Ray runner (:mod:`~iss.influence.ray_scoring`).
"""

from iss.influence.scorer import (
    InfluenceObjective,
    InfluenceResult,
    InfluenceScorer,
    LanguageModelObjective,
    Progress,
    ScorerRecipe,
    ShardRunner,
    seeded_groups,
)

__all__ = [
    "InfluenceObjective",
    "InfluenceResult",
    "InfluenceScorer",
    "LanguageModelObjective",
    "Progress",
    "ScorerRecipe",
    "ShardRunner",
    "seeded_groups",
]

"""The methods a run can compare, in one place: what each selects with, which config it changes, its name.

A selection method (``selection.method``) turns the pool or the corpus into ranked lists; an evaluated method
(``evaluation.methods``) is a selection method under some config overrides, or ``none`` (no pretraining).
Stage names use the evaluated method's name, so ISS with cosine similarity keeps artifacts of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvaluatedMethod:
    name: str
    display: str
    selection: str | None  # selection.method it runs; None: no pretraining at all
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """Suffix of its stage names beside those of its selection method."""
        return "" if self.selection is None or self.name == self.selection else self.name[len(self.selection) :]


EVALUATED: dict[str, EvaluatedMethod] = {
    method.name: method
    for method in (
        EvaluatedMethod("iss", "ISS", "iss"),
        EvaluatedMethod("iss-cosine", "ISS (cosine)", "iss", {"influence.similarity": "cosine"}),
        EvaluatedMethod("tlm", "TLM (BM25)", "tlm"),
        EvaluatedMethod("random", "random (pool)", "random"),
        EvaluatedMethod("random-corpus", "random (whole corpus)", "random-corpus"),  # positive control
        EvaluatedMethod("iss-bottom", "ISS bottom (least influential)", "iss-bottom"),  # negative control
        EvaluatedMethod("none", "no pretraining", None),
    )
}

SELECTION_METHODS = ("iss", "tlm", "random", "random-corpus", "iss-bottom")  # values of selection.method
NEEDS_INFLUENCE = {"iss", "iss-bottom"}  # selection methods that read the influence stage
POOL_FREE = {"random-corpus"}  # selection methods that sample the corpus, not the BM25 pool


def display_name(name: str) -> str:
    method = EVALUATED.get(name)
    return method.display if method else name

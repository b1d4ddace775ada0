"""The methods a run can compare, in one place: what each needs, how it ranks candidates, its display name.

A selection method (``selection.method``) turns its inputs (the BM25 pool, the retrieval hits, the influence
result, or a sample of the whole corpus) into ranked lists that ``selection.round_robin`` turns into a subset.
The selectors that read texts (DSIR, kNN: :mod:`iss.selectors`) rank a stream of candidates, the pool or the
whole corpus, and return the rows they kept with their lists.
An evaluated method (``evaluation.methods``) is a selection method under some config overrides, or ``none``
(no pretraining). Stage names use the evaluated method's name, so ISS with cosine similarity keeps artifacts of
its own. ``iss.config`` holds the names alone (so a config validates without importing this code); the
registries here must hold exactly those names, which import time asserts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from iss.config.schema import EVALUATED_METHOD_NAMES, SELECTION_METHOD_NAMES
from iss.selection.budget import RankedLists, random_lists
from iss.selection.selectors import TextCandidates, check_knn, dsir_rank, knn_rank

if TYPE_CHECKING:
    from iss.config.schema import IssConfig
    from iss.influence.scorer import InfluenceResult


@dataclass(frozen=True)
class Candidates:
    """What a selection method ranks: the candidate documents in table order and what it needs of upstream."""

    corpus_ids: np.ndarray
    seed: int
    bm25: RankedLists | None = None  # per task training query (needs_hits)
    influence: InfluenceResult | None = None  # (needs_influence)
    task_split: str = "dev"  # the split influence was measured on (names the task units)


def _influence(candidates: Candidates) -> InfluenceResult:
    if candidates.influence is None:
        raise ValueError("this method ranks by influence, but no influence result was given")
    return candidates.influence


def _unit_docs(result: InfluenceResult) -> list[np.ndarray]:
    return [np.asarray(docs, np.int64) for docs in result.pool_units]


def iss_lists(candidates: Candidates) -> RankedLists:
    """ISS: every task unit ranks candidate units by influence (its top-k)."""
    result = _influence(candidates)
    split = candidates.task_split
    names = [[f"{split}:{i}" for i in ids] for ids in result.task_units]
    return RankedLists(result.top.ids, result.top.scores.astype(np.float64), names, _unit_docs(result))


def iss_bottom_lists(candidates: Candidates) -> RankedLists:
    """Negative control: the pool's candidate units by ascending mean influence over all task units."""
    result = _influence(candidates)
    means = result.unit_means
    scored = np.flatnonzero(~np.isnan(means))
    order = scored[np.argsort(means[scored], kind="stable")]
    return RankedLists(order[None, :], means[order][None, :], [[]], _unit_docs(result))


def tlm_lists(candidates: Candidates) -> RankedLists:
    """TLM: each task training query ranks documents by BM25."""
    if candidates.bm25 is None:
        raise ValueError("tlm ranks by the BM25 hits, but none were given")
    return candidates.bm25


def random_pool_lists(candidates: Candidates) -> RankedLists:
    """The random baseline: a seeded shuffle of the BM25 pool."""
    return random_lists(candidates.corpus_ids, candidates.seed)


def corpus_sample_lists(candidates: Candidates) -> RankedLists:
    """Positive control: documents of the whole corpus, already in their seeded random order."""
    ids = candidates.corpus_ids
    return RankedLists(np.arange(ids.size)[None, :], None, [[]], [np.array([d]) for d in ids])


@dataclass(frozen=True)
class SelectionMethod:
    name: str
    rank: Callable[[Candidates], RankedLists] | None = None
    needs_influence: bool = False  # reads the influence stage
    needs_hits: bool = False  # reads the BM25 hits per training query
    samples_corpus: bool = False  # ranks a uniform sample of the whole corpus instead of the BM25 pool
    # a selector that reads the candidates' texts (the pool's, or the whole corpus's with selection.over: corpus)
    rank_texts: Callable[[TextCandidates], tuple[pa.Table, RankedLists]] | None = None
    check: Callable[[IssConfig], None] | None = None  # what the config and checkpoints can refuse before any stage


SELECTION: dict[str, SelectionMethod] = {
    method.name: method
    for method in (
        SelectionMethod("iss", iss_lists, needs_influence=True),
        SelectionMethod("tlm", tlm_lists, needs_hits=True),
        SelectionMethod("random", random_pool_lists),
        SelectionMethod("random-corpus", corpus_sample_lists, samples_corpus=True),
        SelectionMethod("iss-bottom", iss_bottom_lists, needs_influence=True),
        SelectionMethod("dsir", rank_texts=dsir_rank),
        SelectionMethod("knn", rank_texts=knn_rank, check=check_knn),
    )
}
assert tuple(SELECTION) == SELECTION_METHOD_NAMES, "iss.config names the selection methods a config may use"


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
        EvaluatedMethod(  # the paper's Table A.1 mini-batch matching, units of 4 random pool documents
            "iss-batched",
            "ISS (B_p 4 random units, B_t 8)",
            "iss",
            {"influence.pool_batch": 4, "influence.task_batch": 8, "influence.pool_grouping": "random"},
        ),
        EvaluatedMethod("tlm", "TLM (BM25)", "tlm"),
        EvaluatedMethod("random", "random (pool)", "random"),
        EvaluatedMethod("random-corpus", "random (whole corpus)", "random-corpus"),  # positive control
        EvaluatedMethod("iss-bottom", "ISS bottom (least influential)", "iss-bottom"),  # negative control
        EvaluatedMethod("dsir", "DSIR (hashed n-grams)", "dsir"),
        EvaluatedMethod("knn", "kNN (sentence embeddings)", "knn"),
        EvaluatedMethod("none", "no pretraining", None),
    )
}
assert tuple(EVALUATED) == EVALUATED_METHOD_NAMES, "iss.config names the methods a config may evaluate"
assert all(m.selection is None or m.selection in SELECTION for m in EVALUATED.values())


# (first, second, what it shows) for the paired-differences table; pairs whose methods did not run are left out
COMPARISONS = [
    ("iss", "tlm", "ISS vs BM25"),
    ("iss", "random", "ISS vs random of the pool"),
    ("iss-cosine", "tlm", "ISS (cosine) vs BM25"),
    ("iss-cosine", "random", "ISS (cosine) vs random of the pool"),
    ("iss-cosine", "iss", "cosine vs dot"),
    ("iss", "iss-batched", "per document vs Table A.1 batches"),
    ("tlm", "random-corpus", "positive control: the regime sees data if > 0"),
    ("iss", "iss-bottom", "negative control: influence ranks if > 0"),
    ("dsir", "tlm", "DSIR vs BM25"),
    ("knn", "tlm", "kNN vs BM25"),
    ("iss", "dsir", "ISS vs DSIR"),
    ("iss", "knn", "ISS vs kNN"),
]
assert all(name in EVALUATED for pair in COMPARISONS for name in pair[:2])


def display_name(name: str) -> str:
    method = EVALUATED.get(name)
    return method.display if method else name

"""Turning ranked candidate lists into a subset under a budget, with provenance for every document: the
budget resolved against the pool, and the lists taken round-robin over the task samples until it is filled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from iss.data.corpus import iter_corpus, seeded_hash
from iss.errors import ConfigError

if TYPE_CHECKING:
    from iss.config.schema import Budget, CorpusConfig


class BudgetError(ConfigError):
    """The budget cannot be met by the candidate pool."""


@dataclass
class RankedLists:
    """units[c, r] is chooser c's r-th best unit (-1 when its list is shorter), scores[c, r] its score."""

    units: np.ndarray
    scores: np.ndarray | None
    chooser_names: list[list[str]]
    unit_docs: list[np.ndarray]


@dataclass
class Selection:
    """Documents in the order they joined, with best score and the choosers that reached them."""

    doc_ids: list[int] = field(default_factory=list)
    best_score: dict[int, float] = field(default_factory=dict)
    chosen_by: dict[int, list[str]] = field(default_factory=dict)
    unit_mates: dict[int, list[int]] = field(default_factory=dict)  # the other documents of the unit it came in
    tokens: int = 0
    budget_met: bool = False
    depth: int = 0


def resolve_budget(budget: Budget, pool_doc_tokens: np.ndarray) -> tuple[str, int]:
    """('docs' | 'tokens', limit) for a budget over a pool whose documents have these token counts."""
    pool_docs, pool_tokens = pool_doc_tokens.size, int(pool_doc_tokens.sum())
    if budget.kind == "fraction":
        return "docs", max(1, math.floor(budget.value * pool_docs))
    limit = int(budget.value)
    available = pool_docs if budget.kind == "docs" else pool_tokens
    if limit > available:
        raise BudgetError(
            f"budget of {limit} {budget.kind} is larger than the candidate pool ({available} {budget.kind}); "
            "lower the budget or retrieve more candidates (retrieval.top_k)"
        )
    return budget.kind, limit


def round_robin(lists: RankedLists, doc_tokens: dict[int, int], kind: str, limit: int, seed: int) -> Selection:
    """Choosers take turns (seeded order) adding their next-ranked unit until ``limit`` docs/tokens."""
    selection = Selection()
    chosen: set[int] = set()
    order = np.random.default_rng(seed).permutation(lists.units.shape[0])
    for rank in range(lists.units.shape[1]):
        selection.depth = rank + 1
        for chooser in order:
            unit = int(lists.units[chooser, rank])
            if unit < 0:
                continue
            score = float(lists.scores[chooser, rank]) if lists.scores is not None else math.nan
            for doc in lists.unit_docs[unit].tolist():
                if doc not in chosen:
                    cost = 1 if kind == "docs" else doc_tokens[doc]
                    used = len(selection.doc_ids) if kind == "docs" else selection.tokens
                    if used + cost > limit:
                        selection.budget_met = True
                        return selection
                    chosen.add(doc)
                    selection.doc_ids.append(doc)
                    selection.unit_mates[doc] = [d for d in lists.unit_docs[unit].tolist() if d != doc]
                    selection.tokens += doc_tokens[doc]
                    selection.chosen_by[doc] = []
                selection.chosen_by[doc].extend(lists.chooser_names[chooser])
                if not math.isnan(score):
                    selection.best_score[doc] = max(score, selection.best_score.get(doc, -math.inf))
            used = len(selection.doc_ids) if kind == "docs" else selection.tokens
            if used >= limit:
                selection.budget_met = True
                return selection
    return selection


def random_lists(pool_ids: np.ndarray, seed: int) -> RankedLists:
    """The random baseline: one chooser whose 'ranking' is a seeded shuffle of the pool."""
    order = np.random.default_rng(seed).permutation(pool_ids.size)
    return RankedLists(order[None, :], None, [[]], [np.array([doc]) for doc in pool_ids])


def bm25_lists(hits: pa.Table, query_names: list[str], top_k: int) -> RankedLists:
    """TLM's lists from the retrieval stage's hits table (query, rank, corpus_id, score): each query's hits, best
    first."""
    ids, scores = np.full((len(query_names), top_k), -1, np.int64), np.zeros((len(query_names), top_k), np.float32)
    query, rank = hits.column("query").to_numpy(), hits.column("rank").to_numpy()
    ids[query, rank] = hits.column("corpus_id").to_numpy()
    scores[query, rank] = hits.column("score").to_numpy()
    return hits_lists(ids, scores, query_names)


def wanted_docs(kind: str, limit: int, mean_pool_tokens: float) -> int:
    """Documents worth keeping for a budget of ``limit`` docs or tokens: a token budget is bought by documents
    of about the pool's mean length, with room for shorter ones (x4, +1000)."""
    return limit if kind == "docs" else int(4 * limit / max(1.0, mean_pool_tokens)) + 1000


def corpus_sample(
    corpus: CorpusConfig,
    kind: str,
    limit: int,
    mean_pool_tokens: float,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> pa.Table:
    """A uniform random sample of the whole corpus, in a seeded random order, large enough for the budget.

    Each document's place in the order is a hash of (seed, corpus id), so the sample does not depend on how the
    corpus is batched; one streaming pass keeps only the documents with the smallest hashes.
    """
    wanted = wanted_docs(kind, limit, mean_pool_tokens)
    keys, ids, texts, sources = np.zeros(0, np.uint64), np.zeros(0, np.int64), [], []
    for batch in iter_corpus(corpus):
        keys = np.concatenate([keys, seeded_hash(batch.ids, seed)])
        ids = np.concatenate([ids, batch.ids])
        texts, sources = texts + batch.texts, sources + (batch.sources or [""] * len(batch.texts))
        keep = np.sort(np.argsort(keys, kind="stable")[:wanted])
        keys, ids = keys[keep], ids[keep]
        texts, sources = [texts[i] for i in keep], [sources[i] for i in keep]
        if progress:
            progress(len(batch.ids))
    order = np.argsort(keys, kind="stable")
    return pa.table(
        {
            "corpus_id": pa.array(ids[order], pa.int64()),
            "text": [texts[i] for i in order],
            "source": [sources[i] for i in order],
            "bm25_score": pa.nulls(len(order), pa.float32()),
        }
    )


def hits_lists(hit_ids: np.ndarray, hit_scores: np.ndarray, query_names: list[str]) -> RankedLists:
    """Ranked lists from (query x hit) arrays: each query (a task training text for TLM, a task sample for kNN)
    ranks its hits by score, best first."""
    docs, inverse = np.unique(hit_ids[hit_ids >= 0], return_inverse=True)
    units = np.full(hit_ids.shape, -1, np.int64)
    units[hit_ids >= 0] = inverse
    return RankedLists(units, hit_scores, [[name] for name in query_names], [np.array([d]) for d in docs])

"""Turning ranked candidate lists into a subset under a budget, with provenance for every document.

Every method reduces to the same shape: a set of *choosers* (task samples or task batches for ISS, task
training queries for TLM, one seeded shuffle for random), each with a ranked list of candidate *units* (a
document, or a batch of B_p documents under mini-batch matching). Choosers take turns in a seeded order,
each adding its next unit, rank by rank, until the budget is met. A document remembers its best score and
every chooser that reached it, so the subset can be explained row by row.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iss.data import iter_corpus, seeded_hash
from iss.errors import ConfigError

if TYPE_CHECKING:
    from iss.config import Budget, CorpusConfig


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
    """TLM: each task training query ranks documents by BM25."""
    docs, inverse = np.unique(hit_ids[hit_ids >= 0], return_inverse=True)
    units = np.full(hit_ids.shape, -1, np.int64)
    units[hit_ids >= 0] = inverse
    return RankedLists(units, hit_scores, [[name] for name in query_names], [np.array([d]) for d in docs])


def subset_table(selection: Selection, pool: pa.Table, doc_tokens: dict[int, int]) -> pa.Table:
    """The subset in selection order, each row with text, best score and provenance."""
    position = {int(doc): i for i, doc in enumerate(pool.column("corpus_id").to_pylist())}
    rows = [position[doc] for doc in selection.doc_ids]
    picked = pool.take(rows) if rows else pool.slice(0, 0)
    scores = [selection.best_score.get(doc) for doc in selection.doc_ids]
    return pa.table(
        {
            "corpus_id": picked.column("corpus_id"),
            "text": picked.column("text"),
            "source": picked.column("source"),
            "score": pa.array(scores, pa.float64()),
            "chosen_by": pa.array(
                [sorted(set(selection.chosen_by[d]), key=_natural) for d in selection.doc_ids], pa.list_(pa.string())
            ),
            "unit_mates": pa.array([selection.unit_mates[d] for d in selection.doc_ids], pa.list_(pa.int64())),
            "n_tokens": pa.array([doc_tokens[d] for d in selection.doc_ids], pa.int64()),
            "bm25_score": picked.column("bm25_score"),
            "selection_rank": pa.array(np.arange(len(rows)), pa.int64()),
        }
    )


def source_shares(sources: list[str | None]) -> dict[str, float]:
    """Share of the documents from each source, largest first (what a subset is made of)."""
    counts = Counter(source or "" for source in sources)
    return {source: round(count / max(1, len(sources)), 4) for source, count in counts.most_common()}


def jaccard(a: set[int], b: set[int]) -> float:
    """Shared documents over documents in either subset (0 for two empty ones)."""
    return len(a & b) / max(1, len(a | b))


def _natural(name: str) -> tuple[str, int]:
    split, _, number = name.partition(":")
    return split, int(number) if number.isdigit() else -1


SUBSET_SHARD_ROWS = 100_000


SUBSET_FILE, SUBSET_IDS_FILE = "subset.parquet", "ids.npy"  # a select stage's artifacts; this module owns them


def subset_file(folder: Path) -> Path:
    """The subset (a folder of parquet shards that ``pq.read_table`` reads as one table) of a select stage."""
    return folder / SUBSET_FILE


def read_subset(folder: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(folder / SUBSET_FILE, columns=columns)


def read_subset_texts(folder: Path) -> list[str]:
    return read_subset(folder, ["text"]).column("text").to_pylist()


def read_subset_ids(folder: Path) -> np.ndarray:
    """The corpus ids of a select stage's subset, in selection order (``ids.npy``, written by :func:`write_subset`)."""
    return np.load(folder / SUBSET_IDS_FILE)


def with_overlaps(rows: list[dict], ids: list[np.ndarray], references: tuple[str, ...] = ("iss", "tlm")) -> list[dict]:
    """Subset rows (method, budget, ...) with the Jaccard overlap of each subset's documents with the subset of
    each reference method at the same budget: two selectors that pick the same documents are one selector."""
    found = {
        (row["method"], row.get("budget", "")): set(doc_ids.tolist()) for row, doc_ids in zip(rows, ids, strict=True)
    }
    out = []
    for row in rows:
        mine = found[(row["method"], row.get("budget", ""))]
        extra = {}
        for reference in references:
            theirs = found.get((reference, row.get("budget", "")))
            if theirs is not None:  # every row gets the column (1.0 for the reference itself): tables stay square
                extra[f"jaccard_{reference}"] = round(jaccard(mine, theirs), 4)
        out.append({**row, **extra})
    return out


def write_subset(subset: pa.Table, folder: Path, shard_rows: int = SUBSET_SHARD_ROWS) -> None:
    """The subset as ``subset.parquet/``, a folder of parquet shards ``part-NNNNN-of-MMMMM.parquet`` of at most
    ``shard_rows`` rows in selection order (``pyarrow.parquet.read_table`` reads the folder as one table; for
    ``datasets.load_dataset("parquet", data_files="…/subset.parquet/*.parquet")``), a ``subset.jsonl.gz`` copy
    and ``ids.npy``, its corpus ids in selection order (what resharders take). Every file is deterministic: the
    gzip header carries no timestamp."""
    shards = folder / SUBSET_FILE
    shards.mkdir()
    count = max(1, -(-subset.num_rows // shard_rows))
    for number in range(count):
        part = subset.slice(number * shard_rows, shard_rows)
        pq.write_table(part, shards / f"part-{number:05d}-of-{count:05d}.parquet")
    with gzip.GzipFile(folder / "subset.jsonl.gz", "wb", mtime=0) as handle:
        for row in subset.to_pylist():
            row["score"] = None if row["score"] is None or math.isnan(row["score"]) else row["score"]
            handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    np.save(folder / SUBSET_IDS_FILE, subset.column("corpus_id").to_numpy())

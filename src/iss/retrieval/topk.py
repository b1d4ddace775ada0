"""One running top-k, and its shard checkpoint: BM25 keeps the best documents per query with it, influence the
best candidate units per task unit.

Both stream their candidates in shards (corpus shards, pool shards) that may finish in any order (Ray) and may be
interrupted, so the rule for ties is fixed (higher score first, then lower id) and the running lists are saved
after every shard: the result does not depend on shard order, batching or restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iss.runs.folder import atomic_savez

EMPTY = -1  # id of an unused slot; its score is -inf


@dataclass
class TopK:
    """The best ``k`` (id, score) per row, best first. A score of -inf is never kept (its slot stays empty).

    With ``track_means`` it also keeps every merged column's mean score over the rows (``seen_ids``,
    ``seen_means``): for influence, a candidate unit's influence on the mean task loss, which ranks the whole
    pool (the ``iss-bottom`` control reads it).
    """

    ids: np.ndarray  # [rows, k] int64
    scores: np.ndarray  # [rows, k] float32
    seen_ids: np.ndarray | None = None
    seen_means: np.ndarray | None = None

    @classmethod
    def empty(cls, rows: int, k: int, track_means: bool = False) -> TopK:
        seen = (np.zeros(0, np.int64), np.zeros(0, np.float32)) if track_means else (None, None)
        return cls(np.full((rows, k), EMPTY, np.int64), np.full((rows, k), -np.inf, np.float32), *seen)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def of(cls, scores: np.ndarray, ids: np.ndarray, k: int, track_means: bool = False) -> TopK:
        """The best k of one [rows, n] score block whose columns are the candidates ``ids`` ([n])."""
        scores = np.asarray(scores, np.float32)
        ids = np.asarray(ids, np.int64)
        top = cls(*_best(np.broadcast_to(ids, scores.shape), scores, k))
        if track_means:
            top.seen_ids, top.seen_means = ids, scores.mean(0)
        return top

    def update(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Merge a [rows, n] score block whose columns are the candidates ``ids`` ([n])."""
        self.merge(TopK.of(scores, ids, self.k, track_means=self.seen_ids is not None))

    def merge(self, other: TopK) -> None:
        """Keep the best k of both (the order of merges does not change the result)."""
        self.ids, self.scores = _best(
            np.concatenate([self.ids, other.ids], axis=1), np.concatenate([self.scores, other.scores], axis=1), self.k
        )
        if self.seen_ids is not None and other.seen_ids is not None:
            self.seen_ids = np.concatenate([self.seen_ids, other.seen_ids])
            self.seen_means = np.concatenate([self.seen_means, np.asarray(other.seen_means, np.float32)])

    def column_means(self, n_columns: int) -> np.ndarray:
        """[n_columns] mean score of each column id over the rows (NaN for an id never merged)."""
        means = np.full(n_columns, np.nan)
        if self.seen_ids is not None:
            means[self.seen_ids] = self.seen_means.astype(np.float64)
        return means

    def state(self) -> dict[str, np.ndarray]:
        arrays = {"ids": self.ids, "scores": self.scores}
        if self.seen_ids is not None:
            arrays.update(seen_ids=self.seen_ids, seen_means=self.seen_means)
        return arrays

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> TopK:
        return cls(state["ids"], state["scores"], state.get("seen_ids"), state.get("seen_means"))


def _best(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k highest scores (ties: lower id first), best first; -inf scores leave empty slots."""
    width = scores.shape[1]
    if width > k:
        # Narrow to the k + 1 best by score (torch.topk: one pass, no negated copy, all threads). Where the
        # (k+1)-th equals the k-th, a tie crosses the boundary and that row is settled by id, exactly.
        values, indices = torch.from_numpy(np.ascontiguousarray(scores)).topk(k + 1, dim=1)
        part = indices[:, :k].numpy()
        threshold = values[:, k - 1 : k].numpy()
        ambiguous = (values[:, k].numpy() == threshold[:, 0]) & np.isfinite(threshold[:, 0])
        for row in np.flatnonzero(ambiguous):
            above = np.flatnonzero(scores[row] > threshold[row])
            tied = np.flatnonzero(scores[row] == threshold[row])
            part[row] = np.concatenate([above, tied[np.argsort(ids[row, tied], kind="stable")][: k - above.size]])
        ids, scores = np.take_along_axis(ids, part, axis=1), np.take_along_axis(scores, part, axis=1)
    elif width < k:  # fewer candidates than slots
        ids = np.pad(ids, ((0, 0), (0, k - width)), constant_values=EMPTY)
        scores = np.pad(scores, ((0, 0), (0, k - width)), constant_values=-np.inf)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)
    ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
    return np.where(np.isneginf(scores), EMPTY, ids), scores.astype(np.float32, copy=False)


class TopKCheckpoint:
    """The running top-k over the shards merged so far, saved after each one (temp file + rename).

    Shards are keyed by an int (a corpus shard number, a pool shard's first unit), so they may finish in any
    order and a rerun skips those in ``done``. Without a path nothing is saved.
    """

    def __init__(self, path: Path | None, empty: TopK) -> None:
        self.path = path
        self.top = empty
        self.done: set[int] = set()
        if path is not None and path.is_file():
            with np.load(path) as state:
                arrays = dict(state)
            self.done = set(arrays.pop("done").tolist())
            self.top = TopK.from_state(arrays)

    def add(self, key: int, shard_top: TopK) -> None:
        self.top.merge(shard_top)
        self.done.add(key)
        if self.path is not None:
            atomic_savez(self.path, done=np.asarray(sorted(self.done), np.int64), **self.top.state())

"""The one running top-k that BM25 and influence share: exact, order-independent, resumable."""

from __future__ import annotations

import numpy as np

from iss.retrieval.topk import TopK, TopKCheckpoint


def _reference(full: np.ndarray, k: int) -> list[list[int]]:
    """Best k column ids per row by (score desc, id asc), -inf never kept."""
    return [
        [c for c in sorted(range(full.shape[1]), key=lambda c: (-row[c], c)) if np.isfinite(row[c])][:k] for row in full
    ]


def test_streaming_top_k_equals_full_sort_with_ties_and_empty_slots():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 12, (30, 400)).astype(np.float32)  # many ties at every boundary
    full[:, ::3] = -np.inf  # never kept
    full[0, :] = -np.inf  # a row with no candidates at all
    full[1, :] = np.where(np.arange(400) < 3, 1.0, -np.inf)  # fewer candidates than slots
    order = rng.permutation(400)
    top = TopK.empty(30, 9, track_means=True)
    for start in range(0, 400, 37):
        columns = order[start : start + 37]
        top.update(full[:, columns], columns)
    for row, want in enumerate(_reference(full, 9)):
        assert top.ids[row, : len(want)].tolist() == want
        assert (top.ids[row, len(want) :] == -1).all() and np.isneginf(top.scores[row, len(want) :]).all()
    np.testing.assert_allclose(top.column_means(401)[:400], full.mean(0), rtol=1e-6)
    assert np.isnan(top.column_means(401)[400])


def test_merge_order_does_not_change_the_result():
    rng = np.random.default_rng(1)
    full = rng.integers(0, 5, (8, 120)).astype(np.float32)
    shards = [np.arange(s, s + 20) for s in range(0, 120, 20)]
    results = []
    for shard_order in (range(6), reversed(range(6)), [3, 0, 5, 1, 4, 2]):
        top = TopK.empty(8, 6)
        for number in shard_order:
            part = TopK.empty(8, 6)
            part.update(full[:, shards[number]], shards[number])
            top.merge(part)
        results.append(top)
    for other in results[1:]:
        np.testing.assert_array_equal(other.ids, results[0].ids)
        np.testing.assert_array_equal(other.scores, results[0].scores)


def test_checkpoint_resumes_with_the_shards_already_merged(tmp_path):
    rng = np.random.default_rng(2)
    full = rng.normal(size=(5, 60)).astype(np.float32)
    path = tmp_path / "state.npz"
    first = TopKCheckpoint(path, TopK.empty(5, 4, track_means=True))
    for number in (0, 2):
        part = TopK.empty(5, 4, track_means=True)
        part.update(full[:, number * 20 : (number + 1) * 20], np.arange(number * 20, (number + 1) * 20))
        first.add(number, part)
    resumed = TopKCheckpoint(path, TopK.empty(5, 4, track_means=True))
    assert resumed.done == {0, 2}
    np.testing.assert_array_equal(resumed.top.ids, first.top.ids)
    part = TopK.empty(5, 4, track_means=True)
    part.update(full[:, 20:40], np.arange(20, 40))
    resumed.add(1, part)
    assert resumed.top.ids.tolist() == _reference(full, 4)
    np.testing.assert_allclose(resumed.top.column_means(60), full.mean(0), rtol=1e-6)

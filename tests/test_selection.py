"""Budget logic, determinism and provenance of the round-robin selection shared by every method."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iss.config.schema import Budget
from iss.selection.budget import BudgetError, RankedLists, hits_lists, random_lists, resolve_budget, round_robin
from iss.selection.subset import subset_table, write_subset


def _ranked(seed: int, choosers: int = 12, depth: int = 15, docs: int = 60, unit_size: int = 1) -> RankedLists:
    rng = np.random.default_rng(seed)
    n_units = docs // unit_size
    units = np.stack([rng.permutation(n_units)[:depth] for _ in range(choosers)])
    units[0, depth // 2 :] = -1  # one chooser with a short list
    scores = np.sort(rng.random((choosers, depth)), axis=1)[:, ::-1].copy()
    unit_docs = [np.arange(u * unit_size, (u + 1) * unit_size) + 1000 for u in range(n_units)]
    names = [[f"dev:{c}"] for c in range(choosers)]
    return RankedLists(units, scores, names, unit_docs)


def _tokens(lists: RankedLists) -> dict[int, int]:
    return {int(d): 5 + int(d) % 7 for docs in lists.unit_docs for d in docs}


@pytest.mark.parametrize("unit_size", [1, 3])
def test_docs_budget_is_met_exactly_and_provenance_is_right(unit_size):
    lists = _ranked(0, unit_size=unit_size)
    selection = round_robin(lists, _tokens(lists), "docs", 25, seed=3)
    assert len(selection.doc_ids) == 25 and selection.budget_met
    assert len(set(selection.doc_ids)) == 25
    unit_of = {int(d): u for u, docs in enumerate(lists.unit_docs) for d in docs}
    for doc in selection.doc_ids:
        choosers = selection.chosen_by[doc]
        assert choosers, f"doc {doc} has no chooser"
        expected_best = -math.inf
        for name in choosers:
            c = int(name.split(":")[1])
            ranks = np.flatnonzero(lists.units[c] == unit_of[doc])
            assert ranks.size == 1 and ranks[0] < selection.depth, "a chooser must have the doc in its reached list"
            expected_best = max(expected_best, lists.scores[c, ranks[0]])
        assert selection.best_score[doc] == pytest.approx(expected_best)


def test_tokens_budget_is_never_exceeded():
    lists = _ranked(1)
    tokens = _tokens(lists)
    selection = round_robin(lists, tokens, "tokens", 140, seed=0)
    assert selection.tokens == sum(tokens[d] for d in selection.doc_ids)
    assert selection.tokens <= 140
    assert selection.budget_met
    assert selection.tokens > 140 - max(tokens.values())


def test_selection_is_deterministic_for_a_seed_and_seed_dependent():
    lists = _ranked(2)
    tokens = _tokens(lists)
    first = round_robin(lists, tokens, "docs", 17, seed=5)
    again = round_robin(lists, tokens, "docs", 17, seed=5)
    other = round_robin(lists, tokens, "docs", 17, seed=6)
    assert first.doc_ids == again.doc_ids and first.chosen_by == again.chosen_by
    # Seeds change who goes first in each round, so the last, partial round differs.
    assert first.doc_ids != other.doc_ids


def test_short_lists_leave_budget_unmet_instead_of_inventing_docs():
    lists = _ranked(3, choosers=2, depth=3)
    selection = round_robin(lists, _tokens(lists), "docs", 50, seed=0)
    assert not selection.budget_met
    assert len(selection.doc_ids) == len({int(u) for u in lists.units.ravel() if u >= 0})


def test_budget_resolution():
    lengths = np.array([10, 20, 30, 40])
    assert resolve_budget(Budget.parse("50%"), lengths) == ("docs", 2)
    assert resolve_budget(Budget.parse("3 docs"), lengths) == ("docs", 3)
    assert resolve_budget(Budget.parse("60 tokens"), lengths) == ("tokens", 60)
    with pytest.raises(BudgetError, match="larger than the candidate pool"):
        resolve_budget(Budget.parse("5 docs"), lengths)
    with pytest.raises(BudgetError, match="101 tokens"):
        resolve_budget(Budget.parse("101 tokens"), lengths)


def test_random_and_tlm_lists_share_the_format():
    pool_ids = np.arange(100, 140)
    tokens = {int(d): 3 for d in pool_ids}
    random_selection = round_robin(random_lists(pool_ids, 0), tokens, "docs", 10, seed=0)
    assert len(random_selection.doc_ids) == 10 and not random_selection.best_score
    assert round_robin(random_lists(pool_ids, 0), tokens, "docs", 10, 0).doc_ids == random_selection.doc_ids
    assert round_robin(random_lists(pool_ids, 1), tokens, "docs", 10, 0).doc_ids != random_selection.doc_ids

    hit_ids = np.array([[101, 105, -1], [105, 130, 131]])
    hit_scores = np.array([[3.0, 2.0, 0.0], [5.0, 1.0, 0.5]])
    lists = hits_lists(hit_ids, hit_scores, ["train:0", "train:1"])
    selection = round_robin(lists, tokens, "docs", 4, seed=0)
    assert set(selection.doc_ids) == {101, 105, 130, 131}
    assert sorted(selection.chosen_by[105]) == ["train:0", "train:1"]
    assert selection.best_score[105] == 5.0

    pool = pa.table(
        {
            "corpus_id": pool_ids,
            "text": [f"doc {i}" for i in pool_ids],
            "source": ["s"] * 40,
            "bm25_score": np.ones(40, np.float32),
        }
    )
    table = subset_table(selection, pool, tokens)
    rows = {row["corpus_id"]: row for row in table.to_pylist()}
    assert rows[105]["text"] == "doc 105" and rows[105]["chosen_by"] == ["train:0", "train:1"]
    assert table.column("selection_rank").to_pylist() == list(range(4))


def test_a_subset_is_written_as_ordered_parquet_shards(tmp_path):
    subset = pa.table({"corpus_id": list(range(25)), "text": [f"doc {i}" for i in range(25)], "score": [0.5] * 25})
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_subset(subset, tmp_path / name, shard_rows=10)
    shards = sorted((tmp_path / "a" / "subset.parquet").iterdir())
    assert [p.name for p in shards] == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in shards] == [10, 10, 5]
    assert pq.read_table(tmp_path / "a" / "subset.parquet").equals(subset)  # one table, in selection order
    assert np.load(tmp_path / "a" / "ids.npy").tolist() == list(range(25))
    for shard in shards:  # deterministic bytes: the same subset writes the same files
        assert shard.read_bytes() == (tmp_path / "b" / "subset.parquet" / shard.name).read_bytes()


def test_subset_rows_get_their_jaccard_overlap_with_iss_and_tlm_at_the_same_budget():
    from iss.selection.subset import with_overlaps

    rows = [{"method": m, "budget": b} for m, b in (("iss", "10"), ("tlm", "10"), ("dsir", "10"), ("dsir", "20"))]
    ids = [np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6]), np.array([1, 2, 3, 9]), np.array([5, 6])]
    out = with_overlaps(rows, ids)
    assert out[0]["jaccard_iss"] == 1.0 and out[0]["jaccard_tlm"] == round(2 / 6, 4)
    assert out[2]["jaccard_iss"] == round(3 / 5, 4) and out[2]["jaccard_tlm"] == round(1 / 7, 4)
    assert "jaccard_iss" not in out[3]  # no ISS subset at that budget

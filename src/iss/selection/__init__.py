"""Turning scores into a subset: the selection methods (:mod:`~iss.selection.methods`: ISS, TLM,
random, DSIR, kNN, a random corpus sample), the document-level selectors (:mod:`~iss.selection.selectors`,
:mod:`~iss.selection.dsir`, :mod:`~iss.selection.knn`), the budget filled round-robin from ranked lists
(:mod:`~iss.selection.budget`) and the subset's files (:mod:`~iss.selection.subset`).
"""

from iss.selection.budget import (
    BudgetError,
    RankedLists,
    Selection,
    bm25_lists,
    corpus_sample,
    hits_lists,
    random_lists,
    resolve_budget,
    round_robin,
    wanted_docs,
)
from iss.selection.subset import (
    SUBSET_SHARD_ROWS,
    jaccard,
    read_subset,
    read_subset_ids,
    read_subset_texts,
    source_shares,
    subset_file,
    subset_table,
    with_overlaps,
    write_subset,
)

__all__ = [
    "SUBSET_SHARD_ROWS",
    "BudgetError",
    "RankedLists",
    "Selection",
    "bm25_lists",
    "corpus_sample",
    "hits_lists",
    "jaccard",
    "random_lists",
    "read_subset",
    "read_subset_ids",
    "read_subset_texts",
    "resolve_budget",
    "round_robin",
    "source_shares",
    "subset_file",
    "subset_table",
    "wanted_docs",
    "with_overlaps",
    "write_subset",
]

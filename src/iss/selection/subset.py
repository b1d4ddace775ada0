"""A selected subset's files (sharded parquet with each document's score and who chose it, and its ids),
read back by pretraining and the report, and the overlaps between subsets.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from iss.selection.budget import Selection


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


SUBSET_FILE, SUBSET_IDS_FILE = "subset.parquet", "ids.npy"  # a select stage's artifacts; this module owns them
SUBSET_SHARD_ROWS = 100_000


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

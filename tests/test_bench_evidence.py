"""The evidence benchmark's tables read from a run folder (benchmarks/bench_evidence.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_evidence


def write_ids(path: Path, ids: range) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"corpus_id": list(ids)}), path)


def test_overlap_counts_shared_pool_documents_against_chance(tmp_path: Path) -> None:
    """Pairs of pool subsets report their shared documents and a * b / pool; a subset drawn from outside the pool
    (the random corpus sample) and a method whose subset was never selected are left out."""
    write_ids(tmp_path / "retrieval" / "pool.parquet", range(100))
    write_ids(tmp_path / "select-iss" / "subset.parquet", range(20))
    write_ids(tmp_path / "select-iss-bottom" / "subset.parquet", range(10, 30))
    write_ids(tmp_path / "select-tlm" / "subset.parquet", range(50, 90))
    write_ids(tmp_path / "select-random-corpus" / "subset.parquet", range(500, 520))
    subsets = [{"method": m} for m in ("iss", "iss-bottom", "tlm", "random-corpus", "random")]

    rows = bench_evidence.overlap_rows(tmp_path, subsets)

    assert rows == [
        {"subsets": "iss & iss-bottom", "shared": 10, "by_chance": 4},
        {"subsets": "iss & tlm", "shared": 0, "by_chance": 8},
        {"subsets": "iss-bottom & tlm", "shared": 0, "by_chance": 8},
    ]


def test_overlap_is_empty_without_a_pool(tmp_path: Path) -> None:
    write_ids(tmp_path / "select-iss" / "subset.parquet", range(20))
    assert bench_evidence.overlap_rows(tmp_path, [{"method": "iss"}]) == []

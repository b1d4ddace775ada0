"""The Ray Data backend selects exactly what the local backend selects (local Ray, num_cpus=2, shared data)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from iss.config.schema import CorpusConfig, RayConfig, RetrievalConfig
from iss.errors import DataError
from iss.retrieval.bm25 import BM25Index
from iss.retrieval.ray_bm25 import ray_bm25_search

from .conftest import CORPUS, iss_command, require_shared


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield RayConfig(num_cpus=2, workers=2)
    ray.shutdown()


def test_ray_bm25_equals_local_on_the_shared_corpus(local_ray, tmp_path, chemprot_texts):
    require_shared()
    corpus = CorpusConfig(paths=[str(CORPUS)], shard_size=20000)  # 4 shards
    queries = [text for text, _ in chemprot_texts[:150]]
    config = RetrievalConfig(top_k=20)
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = BM25Index(config, tmp_path / "local").build(corpus)
    expected = local.search(queries, 20)
    distributed = BM25Index(config, tmp_path / "ray")
    hits = ray_bm25_search(distributed, corpus, queries, 20, local_ray)
    assert distributed.n_docs == local.n_docs and distributed.total_length == local.total_length
    assert distributed.vocabulary == local.vocabulary
    np.testing.assert_array_equal(distributed.doc_freq, local.doc_freq)
    np.testing.assert_array_equal(hits.ids, expected.ids)
    np.testing.assert_array_equal(hits.scores, expected.scores)
    assert (hits.ids >= 0).sum() > 0.9 * hits.ids.size


def test_bad_corpus_line_on_a_ray_worker_is_the_same_one_line_error(local_ray, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "work").mkdir()
    index = BM25Index(RetrievalConfig(), tmp_path / "work")
    with pytest.raises(DataError, match=r"corpus\.jsonl: line 3: not valid UTF-8"):
        ray_bm25_search(index, CorpusConfig(paths=[str(corpus)], shard_size=2), ["query"], 5, local_ray)


@pytest.mark.slow
def test_ray_backend_selects_the_same_subset_as_local(config_file, tmp_path):
    """Retrieval and influence on Ray (2 workers, several shards each) against the local run of the same config."""
    shards = ["--set", "influence.shard_units=300", "--set", "corpus.shard_size=20000", "--quiet", "--json"]
    runs = {}
    for backend in ("local", "ray"):
        run_dir = tmp_path / backend
        extra = ["--backend", "ray", "--set", "ray.num_cpus=2"] if backend == "ray" else []
        result = iss_command("select", str(config_file), "--run-dir", str(run_dir), *shards, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[backend] = json.loads(result.stdout)
        assert runs[backend]["influence"]["pool_units"] > 3 * 300  # several pool shards
    for name in ("retrieval/hits.parquet", "retrieval/pool.parquet", "influence/topk.parquet"):
        assert pq.read_table(tmp_path / "local" / name).equals(pq.read_table(tmp_path / "ray" / name)), name
    local, ray = (pq.read_table(tmp_path / b / "select-iss" / "subset.parquet") for b in ("local", "ray"))
    assert local.num_rows == ray.num_rows > 0
    assert local.equals(ray)

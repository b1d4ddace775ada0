"""DSIR and embedding nearest neighbours: the same weights and rankings as their references, streamed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from iss.config.schema import IssConfig
from iss.errors import ConfigError
from iss.selection.dsir import HashedNgrams, ImportanceWeights, gumbel_keys
from iss.selection.selectors import TextCandidates, corpus_chunks, dsir_rank, knn_rank, pool_chunks

from .conftest import SHARED, iss_command, require_shared
from .test_causal import _smollm2

MINILM = SHARED.parent / "models" / "all-MiniLM-L6-v2"
SCIENCE = [
    "protein",
    "binding",
    "kinase",
    "inhibitor",
    "cell",
    "assay",
    "enzyme",
    "gene",
    "expression",
    "receptor",
    "ligand",
]
GENERAL = ["the", "match", "team", "city", "film", "music", "election", "market", "season", "player", "river", "song"]


def _texts(count: int, science_share: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        words = SCIENCE if rng.random() < science_share else GENERAL
        texts.append(" ".join(rng.choice(words + GENERAL[:3], size=rng.integers(5, 25))) + " .")
    return texts


def _pool(texts: list[str], first_id: int = 0) -> pa.Table:
    return pa.table(
        {
            "corpus_id": pa.array(np.arange(first_id, first_id + len(texts)), pa.int64()),
            "text": texts,
            "source": ["toy"] * len(texts),
            "bm25_score": pa.nulls(len(texts), pa.float32()),
        }
    )


def _candidates(chunks, targets: list[str], wanted: int = 20, seed: int = 0, **settings) -> TextCandidates:
    config = IssConfig.model_validate({"selectors": settings})
    names = [f"train:{i}" for i in range(len(targets))]
    return TextCandidates(chunks, targets, names, config.selectors, seed, wanted)


def test_dsir_weights_equal_the_authors_package(tmp_path):
    """The same hashed n-gram features, fitted distributions and log importance weights as data-selection's
    HashedNgramDSIR (fitted on every token, no length filter)."""
    package = pytest.importorskip("data_selection")
    raw, target = _texts(80, 0.3, 0), _texts(30, 0.9, 1)
    for name, texts in (("raw", raw), ("target", target)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    reference = package.HashedNgramDSIR(
        [str(tmp_path / "raw.jsonl")],
        [str(tmp_path / "target.jsonl")],
        cache_dir=str(tmp_path / "cache"),
        num_proc=1,
        min_example_length=0,
        num_buckets=500,
    )
    reference.fit_importance_estimator(num_tokens_to_fit="all")
    expected = np.array([reference.importance_estimator(reference.featurizer(text)) for text in raw])

    features = HashedNgrams(2, 500)
    weights = ImportanceWeights.fit(features, target, [raw[:50], raw[50:]])  # raw streamed in two batches
    assert weights.log_ratio == pytest.approx(reference.log_diff)
    assert weights.log_weights(raw) == pytest.approx(expected)
    assert features.counts([raw[0]]) == pytest.approx(reference.featurizer(raw[0]))
    assert expected[np.argsort(-expected)[:5]].min() > np.median(expected)  # sanity: a spread of weights


def test_gumbel_top_k_samples_in_proportion_to_the_weights():
    """Top-1 of the Gumbel keys over many seeds picks each document with probability weight / sum."""
    log_weights, ids = np.log([1.0, 2.0, 7.0]), np.array([10, 11, 12])
    wins = np.bincount([np.argmax(gumbel_keys(log_weights, ids, seed)) for seed in range(6000)], minlength=3)
    assert wins / wins.sum() == pytest.approx([0.1, 0.2, 0.7], abs=0.025)


def test_dsir_subset_does_not_depend_on_chunking_and_prefers_the_targets_domain():
    texts = _texts(300, 0.2, 2)
    pool, targets = _pool(texts), _texts(40, 1.0, 3)
    small = dsir_rank(_candidates(pool_chunks(pool, rows=7), targets, wanted=30, dsir={"buckets": 2000}))
    large = dsir_rank(_candidates(pool_chunks(pool, rows=1000), targets, wanted=30, dsir={"buckets": 2000}))
    assert small[0].column("corpus_id").to_pylist() == large[0].column("corpus_id").to_pylist()
    assert small[1].scores == pytest.approx(large[1].scores)
    kept = small[0].column("text").to_pylist()
    share = np.mean([any(w in text.split() for w in SCIENCE) for text in kept])
    assert small[0].num_rows == 30 and share > 0.8  # the pool is 20 % science


def test_over_corpus_streams_with_bounded_memory(tmp_path):
    """DSIR over a whole corpus ~40x larger than its chunks holds the kept candidates and one chunk, never the
    corpus: the arrow memory it allocates stays a small fraction of the corpus's text."""
    texts = [text * 40 for text in _texts(4000, 0.1, 4)]  # long documents: ~2 KB each, ~9 MB of text
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "toy"}) + "\n" for t in texts))
    config = IssConfig.model_validate({"corpus": {"paths": [str(corpus)], "shard_size": 100}})
    peak = [0]

    def measured():
        for chunk in corpus_chunks(config.corpus)():
            peak[0] = max(peak[0], pa.total_allocated_bytes())
            yield chunk

    before = pa.total_allocated_bytes()
    kept, lists = dsir_rank(_candidates(measured, _texts(20, 1.0, 5), wanted=50, dsir={"buckets": 1000}))
    corpus_bytes = sum(len(t) for t in texts)
    assert kept.num_rows == 50 and lists.units.shape == (1, 50)
    assert peak[0] - before < corpus_bytes / 8
    reference, _ = dsir_rank(
        _candidates(pool_chunks(_pool(texts)), _texts(20, 1.0, 5), wanted=50, dsir={"buckets": 1000})
    )
    assert kept.column("corpus_id").to_pylist() == reference.column("corpus_id").to_pylist()


def _brute_force_embeddings(texts: list[str]) -> np.ndarray:
    tokenizer, model = AutoTokenizer.from_pretrained(MINILM), AutoModel.from_pretrained(MINILM).eval()
    rows = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            batch = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
            mean = model(**batch).last_hidden_state[0].mean(0).numpy()
            rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def test_knn_ranks_equal_a_brute_force_cosine_ranking():
    require_shared()
    pool = _pool(_texts(45, 0.5, 6), first_id=100)
    targets = _texts(4, 1.0, 7)
    kept, lists = knn_rank(_candidates(pool_chunks(pool, rows=8), targets, knn={"model": str(MINILM), "top_k": 10}))
    cosine = _brute_force_embeddings(targets) @ _brute_force_embeddings(pool.column("text").to_pylist()).T
    ids = pool.column("corpus_id").to_numpy()
    for row in range(len(targets)):
        expected = ids[np.argsort(-cosine[row], kind="stable")[:10]]
        got = [int(lists.unit_docs[unit][0]) for unit in lists.units[row]]
        assert got == expected.tolist()
        assert lists.scores[row] == pytest.approx(np.sort(cosine[row])[::-1][:10], abs=1e-4)
    assert set(kept.column("corpus_id").to_pylist()) == {d for unit in lists.unit_docs for d in unit.tolist()}
    assert lists.chooser_names == [[f"train:{i}"] for i in range(4)]


def test_empty_targets_and_a_missing_model_are_refused():
    pool = _pool(_texts(10, 0.5, 8))
    with pytest.raises(ConfigError, match="training texts are empty"):
        dsir_rank(_candidates(pool_chunks(pool), ["", "  "]))
    with pytest.raises(ConfigError, match=r"selectors\.knn\.model"):
        knn_rank(_candidates(pool_chunks(pool), ["a text"]))


def test_knn_with_a_causal_lm_stops_before_any_stage_with_one_line(config_file, tmp_path):
    """A selector with a model it cannot use: `iss select` exits 2 with one line, and the run folder holds no
    stage (the check comes before data, tokenizer and retrieval)."""
    run_dir = tmp_path / "run"
    result = iss_command(
        "select", str(config_file), "--method", "knn", "--run-dir", str(run_dir),
        "--set", f"selectors.knn.model={_smollm2()}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "causal LM" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not run_dir.exists() or not any(path.is_dir() for path in run_dir.iterdir())

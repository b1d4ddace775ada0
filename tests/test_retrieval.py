"""Sharded BM25 against a brute-force BM25 written out here, and against bm25s itself on one shard."""

from __future__ import annotations

import math
from collections import Counter

import bm25s
import numpy as np
import pytest

from iss.config.schema import CorpusConfig, RetrievalConfig
from iss.data.corpus import iter_corpus
from iss.retrieval.bm25 import BM25Index, bm25_tokenizer, collect_pool

from .conftest import CORPUS, require_shared

N_DOCS = 1500
TOP_K = 8


def _brute_force(doc_tokens: list[list[str]], query: list[str], k1: float, b: float) -> np.ndarray:
    """Lucene BM25 (bm25s's default), term by term, query terms counted with multiplicity."""
    n = len(doc_tokens)
    avg = sum(len(d) for d in doc_tokens) / n
    df = Counter(term for doc in doc_tokens for term in set(doc))
    scores = np.zeros(n)
    for i, doc in enumerate(doc_tokens):
        tf = Counter(doc)
        for term in query:
            if term in tf:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                scores[i] += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(doc) / avg))
    return scores


@pytest.fixture(scope="module")
def small_corpus():
    require_shared()
    return CorpusConfig(paths=[str(CORPUS)], max_docs=N_DOCS, shard_size=400)


def test_sharded_bm25_matches_brute_force(small_corpus, chemprot_texts, tmp_path):
    config = RetrievalConfig(top_k=TOP_K, query_batch_size=7)
    queries = [text for text, _ in chemprot_texts[:25]] + ["zzzz qqqq"]  # last: no word in the corpus
    index = BM25Index(config, tmp_path).build(small_corpus)
    assert len(index.shards) == math.ceil(N_DOCS / 400)
    hits = index.search(queries, TOP_K)

    texts = [t for batch in iter_corpus(small_corpus) for t in batch.texts]
    ids = np.concatenate([batch.ids for batch in iter_corpus(small_corpus)])
    splitter = bm25_tokenizer(config)
    doc_ids = splitter.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
    vocab_words = {v: k for k, v in splitter.get_vocab_dict().items()}
    doc_tokens = [[vocab_words[t] for t in doc] for doc in doc_ids]
    query_tokens = [
        [vocab_words[t] for t in q]
        for q in splitter.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    ]
    for q, tokens in enumerate(query_tokens):
        expected = _brute_force(doc_tokens, tokens, config.k1, config.b)
        positive = expected > 0
        want = np.sort(expected[positive])[::-1][:TOP_K]
        got = hits.scores[q][hits.ids[q] >= 0]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        # Every returned id really has the score reported (ties may be ordered either way).
        position = {int(doc_id): i for i, doc_id in enumerate(ids)}
        for doc_id, score in zip(hits.ids[q][: got.size], got, strict=True):
            assert expected[position[int(doc_id)]] == pytest.approx(score, rel=1e-5)
    assert (hits.ids[-1] == -1).all()


def test_single_shard_scores_equal_bm25s(small_corpus, chemprot_texts, tmp_path):
    one_shard = small_corpus.model_copy(update={"shard_size": N_DOCS})
    config = RetrievalConfig(top_k=TOP_K)
    queries = [text for text, _ in chemprot_texts[100:120]]
    hits = BM25Index(config, tmp_path).build(one_shard).search(queries, TOP_K)

    texts = [t for batch in iter_corpus(one_shard) for t in batch.texts]
    splitter = bm25_tokenizer(config)
    corpus_tokens = splitter.tokenize(texts, update_vocab=True, return_as="tuple", show_progress=False)
    reference = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
    reference.index(corpus_tokens, show_progress=False)
    query_ids = splitter.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    _, scores = reference.retrieve(query_ids, k=TOP_K, show_progress=False)
    np.testing.assert_allclose(hits.scores, scores, rtol=1e-5)


def test_pool_is_the_union_of_hits_with_texts(small_corpus, chemprot_texts, tmp_path):
    queries = [text for text, _ in chemprot_texts[:10]]
    hits = BM25Index(RetrievalConfig(top_k=5), tmp_path).build(small_corpus).search(queries, 5)
    pool = collect_pool(hits, small_corpus)
    assert set(pool.column("corpus_id").to_pylist()) == set(hits.ids[hits.ids >= 0].tolist())
    by_id = {
        int(b_id): text
        for batch in iter_corpus(small_corpus)
        for b_id, text in zip(batch.ids, batch.texts, strict=True)
    }
    for row in pool.to_pylist():
        assert row["text"] == by_id[row["corpus_id"]]
        assert row["bm25_score"] == pytest.approx(float(hits.scores[hits.ids == row["corpus_id"]].max()))

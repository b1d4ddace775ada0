"""BM25 retrieval of a candidate pool from a streamed corpus: the TLM baseline and ISS's first stage.

bm25s tokenizes (with a vocabulary that grows shard by shard), and scores use bm25s's default Lucene variant.
bm25s computes IDF and average length over whatever one index holds; to keep scores exact when the corpus is
read in shards, pass 1 streams the corpus once to count document frequencies and lengths, and pass 2 builds
each shard's score matrix from those global statistics and keeps a running top-K per query. Memory is one
shard plus the vocabulary, whatever the corpus size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from bm25s.tokenization import Tokenizer

from iss.config.schema import CorpusConfig, RetrievalConfig
from iss.data.corpus import iter_corpus
from iss.errors import DataError
from iss.retrieval.topk import TopK, TopKCheckpoint
from iss.runs.folder import atomic_savez

Progress = Callable[[int], None]
log = logging.getLogger("iss")


POOL_FILE, HITS_FILE = "pool.parquet", "hits.parquet"  # the retrieval stage's artifacts; this module owns them


def write_retrieval(folder: Path, hits: TopK, pool: pa.Table) -> None:
    """The retrieval stage's files: every query's hits (query, rank, corpus_id, score) and the pool's documents."""
    pq.write_table(hits_table(hits), folder / HITS_FILE)
    pq.write_table(pool, folder / POOL_FILE)


def pool_file(folder: Path) -> Path:
    return folder / POOL_FILE


def read_pool(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """The BM25 pool (corpus_id, text, source, bm25_score) a retrieval stage folder holds."""
    return pq.read_table(folder / POOL_FILE, columns=columns)


def read_hits(folder: Path) -> pa.Table:
    return pq.read_table(folder / HITS_FILE)


def hits_table(hits: TopK) -> pa.Table:
    """Long format of the top-K per query: one row per (query, rank) with a real hit."""
    query, rank = np.nonzero(hits.ids >= 0)
    return pa.table(
        {
            "query": pa.array(query, pa.int32()),
            "rank": pa.array(rank, pa.int32()),
            "corpus_id": pa.array(hits.ids[query, rank], pa.int64()),
            "score": pa.array(hits.scores[query, rank], pa.float32()),
        }
    )


def bm25_tokenizer(config: RetrievalConfig) -> Tokenizer:
    return Tokenizer(stopwords=config.stopwords or [], stemmer=None)


@dataclass
class TokenizedShard:
    ids: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    terms: np.ndarray

    @classmethod
    def from_tokens(cls, ids: np.ndarray, token_lists: list[list[int]]) -> TokenizedShard:
        lengths = np.fromiter((len(t) for t in token_lists), np.int64, len(token_lists))
        terms = np.fromiter((t for tokens in token_lists for t in tokens), np.int64, int(lengths.sum()))
        return cls(ids, lengths, np.concatenate([[0], np.cumsum(lengths)]), terms)

    def save(self, path: Path) -> None:
        atomic_savez(path, ids=self.ids, lengths=self.lengths, offsets=self.offsets, terms=self.terms)

    @classmethod
    def load(cls, path: Path) -> TokenizedShard:
        with np.load(path) as data:
            return cls(data["ids"], data["lengths"], data["offsets"], data["terms"])


class BM25Index:
    """Global BM25 statistics over a streamed corpus, with its tokenized shards kept on disk.

    Both passes checkpoint after every shard (temp file + rename) in ``work_dir``, so a killed build or search
    resumes from the last finished shard and ends with the same hits as an uninterrupted run.
    """

    def __init__(self, config: RetrievalConfig, work_dir: Path) -> None:
        self.config = config
        self.work_dir = work_dir
        self.tokenizer = bm25_tokenizer(config)
        self.doc_freq = np.zeros(0, np.int64)
        self.n_docs = 0
        self.total_length = 0
        self.shards: list[Path] = []

    @property
    def _build_state(self) -> Path:
        return self.work_dir / "index-state.npz"

    def build(self, corpus: CorpusConfig, progress: Progress | None = None) -> BM25Index:
        """Pass 1: tokenize every shard, count document frequencies and lengths."""
        done = self._resume_build()
        for number, batch in enumerate(iter_corpus(corpus)):
            if number < done:
                if progress:
                    progress(len(batch.texts))
                continue
            shard = self.tokenize(batch.ids, batch.texts, grow_vocabulary=True)
            shard_df = shard_doc_freq(shard, len(self.tokenizer.get_vocab_dict()))
            self.add_counts(shard_df, shard.lengths.size, int(shard.lengths.sum()))
            path = self.work_dir / f"bm25-shard-{number:05d}.npz"
            shard.save(path)
            self.shards.append(path)
            self.save_build_state()
            if progress:
                progress(shard.ids.size)
        if self.n_docs == 0:
            raise DataError(f"corpus {', '.join(corpus.paths)}: no non-empty documents")
        return self

    def tokenize(self, ids: np.ndarray, texts: list[str], grow_vocabulary: bool) -> TokenizedShard:
        """bm25s token ids of one shard's documents; new words join the vocabulary only when growing it."""
        token_lists = self.tokenizer.tokenize(texts, update_vocab=grow_vocabulary, return_as="ids", show_progress=False)
        return TokenizedShard.from_tokens(ids, token_lists)

    def add_counts(self, shard_df: np.ndarray, n_docs: int, total_length: int) -> None:
        """Add one shard's document frequencies (over the vocabulary so far), documents and tokens to the totals."""
        self.doc_freq = np.pad(self.doc_freq, (0, shard_df.size - self.doc_freq.size)) + shard_df
        self.n_docs += n_docs
        self.total_length += total_length

    @property
    def vocabulary(self) -> list[str]:
        """Words in id order (bm25s numbers new words in the order it first sees them)."""
        words = self.tokenizer.get_vocab_dict()
        return sorted(words, key=words.__getitem__)

    def set_vocabulary(self, words: list[str]) -> None:
        self.tokenizer.word_to_id = {word: i for i, word in enumerate(words)}

    def save_build_state(self) -> None:
        atomic_savez(
            self._build_state,
            words=np.asarray(self.vocabulary, dtype=str),
            doc_freq=self.doc_freq,
            totals=np.asarray([self.n_docs, self.total_length, len(self.shards)], np.int64),
        )

    def _resume_build(self) -> int:
        """Load the counts of the shards a killed build finished; return how many it finished."""
        if not self._build_state.is_file():
            return 0
        with np.load(self._build_state) as state:
            self.set_vocabulary(state["words"].tolist())
            self.doc_freq = state["doc_freq"]
            self.n_docs, self.total_length, done = (int(v) for v in state["totals"])
        self.shards = [self.work_dir / f"bm25-shard-{number:05d}.npz" for number in range(done)]
        log.info("BM25 index: resuming after %d finished shards", done)
        return done

    @property
    def idf(self) -> np.ndarray:
        df = self.doc_freq.astype(np.float64)
        return np.log(1 + (self.n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)

    def shard_matrix(self, shard: TokenizedShard) -> sp.csr_matrix:
        """BM25 term weights of one shard's documents under the global statistics: [docs, vocab]."""
        vocab_size = self.doc_freq.size
        doc_of_token = np.repeat(np.arange(shard.lengths.size), shard.lengths)
        keys, tf = np.unique(doc_of_token * vocab_size + shard.terms, return_counts=True)
        docs, terms = keys // vocab_size, keys % vocab_size
        avg_length = self.total_length / self.n_docs
        length_norm = self.config.k1 * (1 - self.config.b + self.config.b * shard.lengths[docs] / avg_length)
        weights = self.idf[terms] * tf / (tf + length_norm)
        return sp.csr_matrix((weights.astype(np.float32), (docs, terms)), shape=(shard.lengths.size, vocab_size))

    def query_matrix(self, queries: list[str]) -> sp.csr_matrix:
        """Query term counts over the corpus vocabulary (terms never seen in the corpus drop out)."""
        token_lists = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        vocab_size = self.doc_freq.size
        rows = np.repeat(np.arange(len(token_lists)), [len(t) for t in token_lists])
        cols = np.fromiter((t for tokens in token_lists for t in tokens), np.int64, rows.size)
        matrix = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(len(queries), vocab_size))
        matrix.sum_duplicates()
        return matrix

    def shard_top_k(self, shard: TokenizedShard, query_matrix: sp.csr_matrix, top_k: int) -> TopK:
        """The best ``top_k`` documents of one shard for every query; a zero score (no shared term) is no hit."""
        doc_matrix = self.shard_matrix(shard).T.tocsr()
        hits = TopK.empty(query_matrix.shape[0], top_k)
        buffer = np.empty((min(self.config.query_batch_size, query_matrix.shape[0]), doc_matrix.shape[1]), np.float32)
        for start in range(0, query_matrix.shape[0], self.config.query_batch_size):
            stop = start + self.config.query_batch_size
            product = query_matrix[start:stop] @ doc_matrix
            # BM25 scores of shared terms are positive; a document sharing none is no hit (-inf, never kept)
            scores = buffer[: product.shape[0]]
            scores.fill(-np.inf)
            scores[np.repeat(np.arange(product.shape[0]), np.diff(product.indptr)), product.indices] = product.data
            block = TopK.of(scores, shard.ids, top_k)
            hits.ids[start:stop], hits.scores[start:stop] = block.ids, block.scores
        return hits

    def search(self, queries: list[str], top_k: int, progress: Progress | None = None) -> TopK:
        """Pass 2: score every shard against every query, keeping a running top-K per query (resumable)."""
        query_matrix = self.query_matrix(queries)
        state = TopKCheckpoint(self.work_dir / "search-state.npz", TopK.empty(len(queries), top_k))
        if state.done:
            log.info("BM25 search: resuming, %d of %d shards already scored", len(state.done), len(self.shards))
        for number, path in enumerate(self.shards):
            if number in state.done:
                continue
            shard = TokenizedShard.load(path)
            state.add(number, self.shard_top_k(shard, query_matrix, top_k))
            if progress:
                progress(shard.ids.size)
        return state.top


def shard_doc_freq(shard: TokenizedShard, vocab_size: int) -> np.ndarray:
    """In how many of the shard's documents each term occurs."""
    doc_of_token = np.repeat(np.arange(shard.lengths.size), shard.lengths)
    unique_pairs = np.unique(doc_of_token * vocab_size + shard.terms)
    return np.bincount(unique_pairs % vocab_size, minlength=vocab_size)


def collect_pool(hits: TopK, corpus: CorpusConfig) -> pa.Table:
    """Stream the corpus once more to fetch the text of every retrieved document (the candidate pool)."""
    valid = hits.ids >= 0
    pool_ids, inverse = np.unique(hits.ids[valid], return_inverse=True)
    best = np.zeros(pool_ids.size, np.float32)
    np.maximum.at(best, inverse, hits.scores[valid])
    n_queries = np.bincount(inverse, minlength=pool_ids.size)
    texts: dict[int, str] = {}
    sources: dict[int, str | None] = {}
    for batch in iter_corpus(corpus):
        wanted = np.flatnonzero(np.isin(batch.ids, pool_ids))
        for i in wanted:
            texts[int(batch.ids[i])] = batch.texts[i]
            sources[int(batch.ids[i])] = batch.sources[i] if batch.sources else None
    return pa.table(
        {
            "corpus_id": pa.array(pool_ids, pa.int64()),
            "text": [texts[int(i)] for i in pool_ids],
            "source": [sources[int(i)] for i in pool_ids],
            "bm25_score": pa.array(best, pa.float32()),
            "n_queries": pa.array(n_queries, pa.int32()),
        }
    )


def query_order(hits: pa.Table, pool_ids: np.ndarray) -> np.ndarray:
    """Pool rows in BM25 order: query by query, each query's hits best first, a document where it first
    appears. Consecutive rows are then neighbours (hits of one query), which is how B_p > 1 units are formed."""
    order = np.lexsort((hits.column("rank").to_numpy(), hits.column("query").to_numpy()))
    ranked = hits.column("corpus_id").to_numpy()[order]
    _, first = np.unique(ranked, return_index=True)
    in_order = ranked[np.sort(first)]
    rows = np.searchsorted(pool_ids, in_order)
    if not np.array_equal(pool_ids[rows], in_order) or rows.size != pool_ids.size:
        raise ValueError("the hits and the pool do not hold the same documents")
    return rows

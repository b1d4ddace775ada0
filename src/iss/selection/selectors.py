"""Selectors that read the candidates' texts: DSIR and embedding nearest neighbours, peers of ISS and BM25.

Both rank the same candidates as the others (the BM25 pool) or, with ``selection.over: corpus``, the whole corpus.
Candidates arrive as a re-iterable stream of chunks (corpus_id, text, source, bm25_score), so ranking the whole
corpus holds only the candidates still in the running (DSIR: the best ``wanted`` Gumbel keys; kNN: each task
sample's ``top_k``), never the corpus. Each returns those kept rows and the ranked lists that
:func:`iss.selection.round_robin` turns into a subset under the budget, like every other method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iss.data.corpus import iter_corpus
from iss.errors import ConfigError
from iss.retrieval.topk import TopK
from iss.selection.budget import RankedLists, hits_lists
from iss.selection.dsir import HashedNgrams, ImportanceWeights, gumbel_keys

if TYPE_CHECKING:
    from iss.config.schema import CorpusConfig, IssConfig, SelectorsConfig

CANDIDATE_SCHEMA = pa.schema(
    [("corpus_id", pa.int64()), ("text", pa.string()), ("source", pa.string()), ("bm25_score", pa.float32())]
)
Chunks = Callable[[], Iterator[pa.Table]]  # a fresh pass over the candidates each call


@dataclass(frozen=True)
class TextCandidates:
    """What a text selector ranks and against what: candidate chunks, the task's texts, settings."""

    chunks: Chunks
    targets: list[str]  # the task's training texts
    target_names: list[str]  # their names in a subset's ``chosen_by`` (``train:ID``)
    settings: SelectorsConfig
    seed: int
    wanted: int  # candidates worth keeping: a generous bound on what the budget can take
    device: str = "cpu"


def pool_chunks(pool: pa.Table, rows: int = 4096) -> Chunks:
    """The BM25 pool in chunks of ``rows``."""
    table = pool.select(CANDIDATE_SCHEMA.names).cast(CANDIDATE_SCHEMA)
    return lambda: (table.slice(start, rows) for start in range(0, table.num_rows, rows))


def corpus_chunks(corpus: CorpusConfig) -> Chunks:
    """The whole corpus (its mixture applied), streamed in its shards; empty documents left out."""

    def chunks() -> Iterator[pa.Table]:
        for batch in iter_corpus(corpus):
            table = pa.table(
                {
                    "corpus_id": pa.array(batch.ids, pa.int64()),
                    "text": batch.texts,
                    "source": batch.sources or [""] * len(batch.texts),
                    "bm25_score": pa.nulls(len(batch.texts), pa.float32()),
                },
                schema=CANDIDATE_SCHEMA,
            )
            yield table.filter(pc.greater(pc.utf8_length(table.column("text")), 0))

    return chunks


def text_candidates(
    config: IssConfig, pool: pa.Table, train: pa.Table, wanted: int, device: str = "cpu"
) -> TextCandidates:
    """A text selector's inputs in a run: the pool (or, with ``selection.over: corpus``, the whole corpus), the
    task's training texts as targets, and the kNN model (``selectors.knn.model``, else ``model.path``)."""
    over_corpus = config.selection.over == "corpus"
    settings = config.selectors
    knn = settings.knn.model_copy(update={"model": embedding_model(config)})
    settings = settings.model_copy(update={"knn": knn})
    return TextCandidates(
        corpus_chunks(config.corpus) if over_corpus else pool_chunks(pool),
        train.column("text").to_pylist(),
        [f"train:{i}" for i in train.column("id").to_pylist()],
        settings,
        config.seed,
        wanted,
        str(device),
    )


def embedding_model(config: IssConfig) -> str | None:
    """kNN's sentence-embedding checkpoint: ``selectors.knn.model``, else the run's model."""
    return config.selectors.knn.model or config.model.path


def check_knn(config: IssConfig) -> None:
    """Before any stage: kNN has an encoder checkpoint to embed with."""
    from iss.selection.knn import check_encoder

    model = embedding_model(config)
    if model is None:
        raise ConfigError("knn needs selectors.knn.model (a sentence-embedding checkpoint, e.g. all-MiniLM-L6-v2)")
    check_encoder(model)


def _check_targets(candidates: TextCandidates) -> None:
    if not any(text.strip() for text in candidates.targets):
        raise ConfigError("the task's training texts are empty: a selector has nothing to match candidates to")


def dsir_rank(candidates: TextCandidates) -> tuple[pa.Table, RankedLists]:
    """DSIR: importance weights of the candidates (target: the task's training texts; raw: the candidates
    themselves, one streaming pass), then one list in Gumbel top-k order, each document scored by its log weight."""
    _check_targets(candidates)
    settings = candidates.settings.dsir
    features = HashedNgrams(settings.ngrams, settings.buckets)
    raw = (chunk.column("text").to_pylist() for chunk in candidates.chunks())
    weights = ImportanceWeights.fit(features, candidates.targets, raw)
    kept = pa.table({name: [] for name in CANDIDATE_SCHEMA.names}, schema=CANDIDATE_SCHEMA)
    kept_keys, kept_weights = np.zeros(0), np.zeros(0)
    for chunk in candidates.chunks():
        log_weights = weights.log_weights(chunk.column("text").to_pylist())
        keys = gumbel_keys(log_weights, chunk.column("corpus_id").to_numpy(), candidates.seed)
        kept = pa.concat_tables([kept, chunk])
        kept_keys, kept_weights = np.concatenate([kept_keys, keys]), np.concatenate([kept_weights, log_weights])
        best = np.sort(_best_first(kept_keys, kept.column("corpus_id").to_numpy())[: candidates.wanted])
        kept, kept_keys, kept_weights = kept.take(best), kept_keys[best], kept_weights[best]
    order = _best_first(kept_keys, kept.column("corpus_id").to_numpy())
    kept, kept_weights = kept.take(order), kept_weights[order]
    ids = kept.column("corpus_id").to_numpy()
    lists = RankedLists(np.arange(ids.size)[None, :], kept_weights[None, :], [[]], [np.array([d]) for d in ids])
    return kept, lists


def _best_first(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions by key, highest first, ties by lower corpus id (the same whatever the chunking)."""
    return np.lexsort((ids, -keys))


def knn_rank(candidates: TextCandidates) -> tuple[pa.Table, RankedLists]:
    """Embedding nearest neighbours: each task sample's ``top_k`` candidates by cosine similarity, best first."""
    from iss.selection.knn import SentenceEncoder  # transformers and the checkpoint only where kNN runs

    _check_targets(candidates)
    settings = candidates.settings.knn
    if settings.model is None:
        raise ConfigError("knn needs selectors.knn.model (a sentence-embedding checkpoint, e.g. all-MiniLM-L6-v2)")
    encoder = SentenceEncoder(settings.model, settings.max_length, settings.batch_size, candidates.device)
    queries = encoder.embed(candidates.targets)
    top = TopK.empty(len(candidates.targets), settings.top_k)
    kept = pa.table({name: [] for name in CANDIDATE_SCHEMA.names}, schema=CANDIDATE_SCHEMA)
    for chunk in candidates.chunks():
        ids = chunk.column("corpus_id").to_numpy()
        top.update(queries @ encoder.embed(chunk.column("text").to_pylist()).T, ids)
        kept = pa.concat_tables([kept, chunk])
        kept = kept.filter(pa.array(np.isin(kept.column("corpus_id").to_numpy(), top.ids)))
    return kept, hits_lists(top.ids, top.scores, candidates.target_names)

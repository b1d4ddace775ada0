"""BM25 retrieval on Ray Data: the corpus shards counted and searched by workers, with the same hits as
the local index; and the Ray start that the influence runner shares.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from iss.config.schema import CorpusConfig, RayConfig, RetrievalConfig
from iss.data.corpus import CorpusShard, corpus_shards, read_shard
from iss.errors import DataError
from iss.retrieval.bm25 import BM25Index, shard_doc_freq
from iss.retrieval.topk import TopK, TopKCheckpoint

Progress = Callable[[int], None]
log = logging.getLogger("iss")


def start_ray(config: RayConfig) -> None:
    """Connect to the configured cluster, or start a local Ray with ``num_cpus`` CPUs."""
    import ray

    if not ray.is_initialized():
        if config.address:
            ray.init(address=config.address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shard results arrive in shard order
    context.enable_progress_bars = False  # the pipeline's own bar counts shards
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextmanager
def _worker_data_errors() -> Iterator[None]:
    """Bad input found on a worker surfaces as the same one-line DataError the local backend raises."""
    try:
        yield
    except Exception as error:
        cause: BaseException | None = error
        for _ in range(10):  # Ray wraps user errors a few levels deep
            if cause is None or isinstance(cause, DataError):
                break
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from error
        # across processes Ray may keep only the worker's traceback text
        found = re.search(re.escape(f"{DataError.__module__}.DataError: ") + "(.+)", str(error))
        if found is None:
            raise
        raise DataError(found.group(1).strip()) from error


# ------------------------------------------------------------------------------------------- retrieval


def _corpus_shard(row: dict[str, Any]) -> CorpusShard:
    """A shard description back from a Ray row (numpy scalars to Python values)."""
    values = {f.name: row[f.name] for f in dataclasses.fields(CorpusShard)}
    return CorpusShard(**{k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()})


def _count_shard(row: dict[str, Any], corpus: dict, retrieval: dict) -> dict[str, Any]:
    """Pass 1 on a worker: one shard's own vocabulary (first-seen order), document frequencies and lengths."""
    batch = read_shard(_corpus_shard(row), CorpusConfig(**corpus))
    index = BM25Index(RetrievalConfig(**retrieval), Path("."))  # a fresh vocabulary: this shard's own
    tokens = index.tokenize(batch.ids, batch.texts, grow_vocabulary=True)
    words = index.vocabulary
    return {
        "number": row["number"],
        "words": words,
        "doc_freq": shard_doc_freq(tokens, len(words)),
        "totals": np.asarray([tokens.lengths.size, int(tokens.lengths.sum())], np.int64),
    }


class _ShardSearcher:
    """Pass 2 actor: holds the global statistics and the queries; scores one corpus shard per call."""

    def __init__(self, payload: Any) -> None:
        import ray

        state = ray.get(payload)
        self.corpus = CorpusConfig(**state["corpus"])
        self.index = BM25Index(RetrievalConfig(**state["retrieval"]), Path("."))
        self.index.set_vocabulary(state["words"])
        self.index.doc_freq, self.index.n_docs, self.index.total_length = state["doc_freq"], *state["totals"]
        self.queries, self.top_k = state["queries"], state["top_k"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"number": [], "ids": [], "scores": []}
        for i, number in enumerate(batch["number"]):
            docs = read_shard(_corpus_shard({key: values[i] for key, values in batch.items()}), self.corpus)
            tokens = self.index.tokenize(docs.ids, docs.texts, grow_vocabulary=False)
            hits = self.index.shard_top_k(tokens, self.queries, self.top_k)
            out["number"].append(int(number))
            out["ids"].append(hits.ids)
            out["scores"].append(hits.scores)
        return out


def ray_bm25_search(
    index: BM25Index,
    corpus: CorpusConfig,
    queries: list[str],
    top_k: int,
    config: RayConfig,
    progress: Progress | None = None,
) -> TopK:
    """BM25 top-K per query over the corpus, both passes mapped over corpus shards by Ray workers."""
    import ray

    start_ray(config)
    shards = [{"number": n, **dataclasses.asdict(s)} for n, s in enumerate(corpus_shards(corpus))]
    retrieval = index.config.model_dump(mode="json")
    counted = ray.data.from_items(shards).map(
        _count_shard, fn_kwargs={"corpus": corpus.model_dump(mode="json"), "retrieval": retrieval}
    )
    word_ids: dict[str, int] = {}
    with _worker_data_errors():
        for row in counted.iter_rows():  # in shard order, so global ids follow first-seen order, as locally
            local_to_global = np.fromiter((word_ids.setdefault(w, len(word_ids)) for w in row["words"]), np.int64)
            doc_freq = np.bincount(local_to_global, weights=np.asarray(row["doc_freq"]), minlength=len(word_ids))
            index.add_counts(doc_freq.astype(np.int64), int(row["totals"][0]), int(row["totals"][1]))
    if index.n_docs == 0:
        raise DataError(f"corpus {', '.join(corpus.paths)}: no non-empty documents")
    index.set_vocabulary(list(word_ids))
    state = TopKCheckpoint(index.work_dir / "search-state-ray.npz", TopK.empty(len(queries), top_k))
    payload = ray.put(
        {
            "words": list(word_ids),
            "doc_freq": index.doc_freq,
            "totals": (index.n_docs, index.total_length),
            "retrieval": retrieval,
            "corpus": corpus.model_dump(mode="json"),
            "queries": index.query_matrix(queries),
            "top_k": top_k,
        }
    )
    todo = [shard for shard in shards if shard["number"] not in state.done]
    if todo:
        scored = ray.data.from_items(todo).map_batches(
            _ShardSearcher,
            fn_constructor_kwargs={"payload": payload},
            batch_size=1,
            concurrency=config.workers,
            num_cpus=config.cpus_per_worker,
        )
        for row in scored.iter_rows():
            state.add(int(row["number"]), TopK(np.asarray(row["ids"]), np.asarray(row["scores"])))
            if progress:
                progress(1)
    return state.top

"""The retrieval stage: BM25 over the corpus with the task's training texts as queries, the candidate pool
(TLM). An input stage, priced by its measured seconds (:mod:`iss.stages.inputs`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iss.config.schema import fingerprint_dump
from iss.modeling.batches import token_counts
from iss.retrieval.bm25 import BM25Index, collect_pool, read_pool, write_retrieval
from iss.retrieval.ray_bm25 import ray_bm25_search
from iss.runs.folder import StageResult
from iss.stages.context import StageContext
from iss.stages.inputs import data, read_tokenizer, task, tokenizer


def retrieval(context: StageContext) -> StageResult:
    config = context.config
    data_stage = data(context)

    def body(folder: Path, summary: dict) -> None:
        queries = task(context).texts("train")
        index = BM25Index(config.retrieval, context.run.work_dir("retrieval"))
        if config.backend == "ray":
            with context.progress(None, "BM25 on Ray (shards)", unit="shard") as bar:
                hits = ray_bm25_search(index, config.corpus, queries, config.retrieval.top_k, config.ray, bar.update)
        else:
            with context.progress(None, "BM25 index") as bar:
                index.build(config.corpus, progress=bar.update)
            with context.progress(index.n_docs, "BM25 search") as bar:
                hits = index.search(queries, config.retrieval.top_k, progress=bar.update)
        pool = collect_pool(hits, config.corpus)
        write_retrieval(folder, hits, pool)
        summary.update(
            {
                "corpus_docs": index.n_docs,
                "vocab": int(index.doc_freq.size),
                "queries": len(queries),
                "hits": int((hits.ids >= 0).sum()),
                "pool_docs": pool.num_rows,
            }
        )

    parts = {
        "retrieval": fingerprint_dump(config.retrieval),
        "data": data_stage.fingerprint,
        "corpus": context.corpus_signature(),
    }
    return context.stage("retrieval", parts, body)


def pool_token_counts(context: StageContext) -> np.ndarray:
    """Token counts of the BM25 pool's documents (computed once per pool and tokenizer, shared by variants)."""
    retrieved, tokenizer_stage = retrieval(context), tokenizer(context)
    key = (retrieved.fingerprint, tokenizer_stage.fingerprint)
    if key not in context.pool_lengths:
        texts = read_pool(retrieved.path, ["text"]).column("text").to_pylist()
        context.pool_lengths[key] = token_counts(read_tokenizer(context, tokenizer_stage.path), texts)
    return context.pool_lengths[key]

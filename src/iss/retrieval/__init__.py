"""BM25 over the corpus with the task's texts as queries (:mod:`~iss.retrieval.bm25`, bm25s), its Ray
runner (:mod:`~iss.retrieval.ray_bm25`) and the top-k-per-query structure both retrieval and influence keep
(:mod:`~iss.retrieval.topk`).
"""

from iss.retrieval.bm25 import (
    BM25Index,
    Progress,
    TokenizedShard,
    bm25_tokenizer,
    collect_pool,
    hits_table,
    pool_file,
    query_order,
    read_hits,
    read_pool,
    shard_doc_freq,
    write_retrieval,
)

__all__ = [
    "BM25Index",
    "Progress",
    "TokenizedShard",
    "bm25_tokenizer",
    "collect_pool",
    "hits_table",
    "pool_file",
    "query_order",
    "read_hits",
    "read_pool",
    "shard_doc_freq",
    "write_retrieval",
]

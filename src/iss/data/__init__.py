"""What a run reads: the task's splits and labels (:mod:`~iss.data.task`) and the general corpus, streamed,
sharded and mixed (:mod:`~iss.data.corpus`). The names of iss 0.3's ``iss.data`` module are re-exported here.
"""

from iss.data.corpus import (
    COLUMNAR_SUFFIXES,
    COMPRESSED_SUFFIXES,
    CORPUS_SUFFIXES,
    HUB_PREFIX,
    MIXTURE_STREAM,
    CorpusBatch,
    CorpusShard,
    MixtureFilter,
    corpus_files,
    corpus_shards,
    iter_corpus,
    mixture_draws,
    read_shard,
    seeded_hash,
)
from iss.data.task import SPLIT_ROLES, TASK_SUFFIXES, TaskData, load_task, read_task, sample_rows, save_task

__all__ = [
    "COLUMNAR_SUFFIXES",
    "COMPRESSED_SUFFIXES",
    "CORPUS_SUFFIXES",
    "HUB_PREFIX",
    "MIXTURE_STREAM",
    "SPLIT_ROLES",
    "TASK_SUFFIXES",
    "CorpusBatch",
    "CorpusShard",
    "MixtureFilter",
    "TaskData",
    "corpus_files",
    "corpus_shards",
    "iter_corpus",
    "load_task",
    "mixture_draws",
    "read_shard",
    "read_task",
    "sample_rows",
    "save_task",
    "seeded_hash",
]

"""The input stages: the task's splits (``data``) and the run's tokenizer (``tokenizer``).

They read files and train at most a tokenizer: no probe prices them. The estimate takes their seconds from
this machine's last run on the same corpus, and their measured seconds once they ran (:mod:`iss.estimate`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from iss.config.schema import fingerprint_dump
from iss.data.corpus import iter_corpus
from iss.data.task import TaskData, load_task, read_task, save_task
from iss.modeling.tokenizer import cached_tokenizer, load_tokenizer
from iss.runs.folder import StageResult, file_signature
from iss.stages.context import StageContext


def data(context: StageContext) -> StageResult:
    """The task's splits as the run reads them (a dev split carved from train where the task has none)."""
    config = context.config

    def body(folder: Path, summary: dict) -> None:
        task = load_task(config.task, config.seed)
        save_task(task, folder)
        summary.update({f"{role}_rows": table.num_rows for role, table in task.splits.items()})
        summary["labels"] = len(task.labels)

    parts = {"task": fingerprint_dump(config.task), "seed": config.seed}
    if Path(config.task.path).exists():
        parts["files"] = file_signature([config.task.path])
    return context.stage("data", parts, body)


def task(context: StageContext) -> TaskData:
    """The data stage's task splits."""
    return read_task(data(context).path, context.config.task.name)


def make_tokenizer(context: StageContext, task_data: TaskData) -> tuple[PreTrainedTokenizerFast, bool]:
    """The run's tokenizer: ``tokenizer.path``'s, or one trained on the task and corpus texts (from the cache
    when it was trained on them before). Returns (tokenizer, from cache). The tokenizer stage saves it; the
    time estimate, which runs before any stage, uses it directly."""
    config = context.config
    if config.tokenizer.path:
        return read_tokenizer(context, config.tokenizer.path), False

    def texts() -> Iterator[str]:
        corpus_texts = itertools.islice(
            (text for batch in iter_corpus(config.corpus) for text in batch.texts), config.tokenizer.max_corpus_docs
        )
        task_texts = (task_data.texts(role) for role in ("train", "dev") if role in task_data.splits)
        return itertools.chain(*task_texts, corpus_texts)

    return cached_tokenizer(texts, config.tokenizer, config.tokenizer.cache_dir)


def tokenizer(context: StageContext) -> StageResult:
    """The run's tokenizer, saved: the one at ``tokenizer.path`` or one trained for the run."""
    config = context.config
    data_stage = data(context)

    def body(folder: Path, summary: dict) -> None:
        made, from_cache = make_tokenizer(context, task(context))
        if not config.tokenizer.path:
            summary["from_cache"] = from_cache
        made.save_pretrained(str(folder))
        summary["vocab_size"] = len(made)

    parts = {"tokenizer": fingerprint_dump(config.tokenizer), "data": data_stage.fingerprint}
    if not config.tokenizer.path:
        parts["corpus"] = context.corpus_signature()
    return context.stage("tokenizer", parts, body)


def read_tokenizer(context: StageContext, path: str | Path | None = None):
    """The run's tokenizer (the tokenizer stage's, or the one at ``path``), ready for the model's family."""
    path = path or tokenizer(context).path
    return load_tokenizer(path, context.family, context.config.model.trust_remote_code)

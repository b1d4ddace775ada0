"""One call from Python: ``iss.select(task, corpus)`` returns the selected subset as a ``datasets.Dataset``.

The task and the corpus may be paths (as in a config), ``datasets`` objects or plain Python data; in-memory data
is written once into the run folder under a name derived from its content, so calling again with the same data
reuses every finished stage (and different data never does).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from iss.config.io import load_config
from iss.config.schema import IssConfig
from iss.errors import ConfigError
from iss.pipeline.run import Pipeline
from iss.runs.folder import RunFolder
from iss.selection.subset import read_subset

TaskInput = str | Path | datasets.Dataset | datasets.DatasetDict | Mapping[str, Any]
CorpusInput = str | Path | Sequence[str | Path] | datasets.Dataset | Sequence[str]
ROLES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}


def select(
    task: TaskInput,
    corpus: CorpusInput,
    *,
    method: str = "iss",
    budget: str | int | float | None = None,
    config: IssConfig | str | Path | None = None,
    run_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    show_progress: bool = False,
) -> datasets.Dataset:
    """Select the subset of ``corpus`` that helps ``task`` most.

    Args:
        task: A task folder, file or hub name; a ``DatasetDict`` or mapping of splits (train, dev or validation,
            optional test), each a ``Dataset``, a dict of columns or a list of rows with ``text`` and ``label``; or
            one ``Dataset`` (dev and test are then held out of it).
        corpus: Corpus path(s), a ``Dataset`` with a ``text`` column, or a list of texts.
        method: A selection method: iss, tlm, random, random-corpus, iss-bottom, dsir or knn.
        budget: ``"2000 docs"``, ``"1e6 tokens"`` or a share of the pool (``0.2``).
        config: The base config, an object or a YAML path (default: the built-in one).
        run_dir: The run folder; None runs the stages in a temporary folder removed afterwards.
        overrides: Dotted config keys on top of ``config`` (``{"influence.layer": 1}``).
        show_progress: Progress bars on stderr.

    Returns:
        The subset as a ``datasets.Dataset``: text, corpus_id, score and who chose each document.
    """
    base = config if isinstance(config, IssConfig) else load_config(config)
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="iss-") as folder:
            return _select(base, task, corpus, method, budget, Path(folder), overrides, show_progress)
    return _select(base, task, corpus, method, budget, Path(run_dir), overrides, show_progress)


def _select(
    base: IssConfig,
    task: TaskInput,
    corpus: CorpusInput,
    method: str,
    budget: str | int | float | None,
    run_dir: Path,
    overrides: Mapping[str, Any] | None,
    show_progress: bool,
) -> datasets.Dataset:
    inputs = RunFolder(run_dir).root / "inputs"  # the folder is claimed as a run folder before anything is written
    settings: dict[str, Any] = {"run_dir": str(run_dir), "selection.method": method}
    if budget is not None:
        settings["selection.budget"] = str(budget)
    settings.update(_task_settings(task, inputs))
    settings["corpus.paths"] = _corpus_paths(corpus, inputs)
    settings.update(overrides or {})
    pipeline = Pipeline(base.with_overrides(settings), show_progress=show_progress)
    selected = pipeline.select()
    return datasets.Dataset(read_subset(selected.path))


def _task_settings(task: TaskInput, inputs: Path) -> dict[str, Any]:
    if isinstance(task, (str, Path)):
        return {"task.path": str(task)}
    if isinstance(task, datasets.Dataset):
        return {"task.path": str(_store(task.data.table, inputs / "task", "task"))}
    splits = {ROLES.get(name): _table(rows) for name, rows in task.items()}
    if None in splits or "train" not in splits:
        raise ConfigError(f"task splits must be train, dev (or validation) and test; got {sorted(task)}")
    names = {role: _store(table, inputs / "task", role).stem for role, table in splits.items()}
    return {"task.path": str(inputs / "task"), "task.splits": names}


def _corpus_paths(corpus: CorpusInput, inputs: Path) -> list[str]:
    if isinstance(corpus, (str, Path)):
        return [str(corpus)]
    if isinstance(corpus, datasets.Dataset):
        return [str(_store(corpus.data.table, inputs / "corpus", "corpus"))]
    items = list(corpus)
    if items and all(isinstance(item, Path) or (isinstance(item, str) and Path(item).exists()) for item in items):
        return [str(item) for item in items]
    return [str(_store(pa.table({"text": items}), inputs / "corpus", "corpus"))]


def _table(rows: Any) -> pa.Table:
    if isinstance(rows, datasets.Dataset):
        return rows.data.table
    if isinstance(rows, Mapping):
        return pa.table(dict(rows))
    return pa.Table.from_pylist(list(rows))


def _store(table: pa.Table, folder: Path, prefix: str) -> Path:
    """Write ``table`` as parquet named by its content hash (written once: same data, same file, same mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{prefix}-{os.getpid()}.tmp"
    pq.write_table(table.combine_chunks(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
    path = folder / f"{prefix}-{digest}.parquet"
    if path.exists():
        tmp.unlink()
    else:
        os.replace(tmp, path)
    return path

"""Loading a labeled task (small, in memory): its splits from a folder, a file or the hub, standardised to
``id, text, label``, a dev split carved from train where there is none, and the label ids every stage shares.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from iss.config.schema import TaskConfig
from iss.data.corpus import _looks_like_hub_name
from iss.errors import DataError

TASK_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_ROLES = ("train", "dev", "test")


log = logging.getLogger("iss")


@dataclass(frozen=True)
class TaskData:
    """The task's splits (Arrow tables: id, text, label, label_id) and its label vocabulary."""

    name: str
    splits: dict[str, pa.Table]
    labels: list[str]

    def texts(self, split: str) -> list[str]:
        return self.splits[split].column("text").to_pylist()

    def label_ids(self, split: str) -> np.ndarray:
        return self.splits[split].column("label_id").to_numpy()


# ----------------------------------------------------------------------------------------------- tasks


def load_task(config: TaskConfig, seed: int = 0) -> TaskData:
    """Load train/dev/test from a folder of split files, one file (split seeded), or a hub dataset name."""
    path = Path(config.path)
    if path.is_dir():
        raw = _load_split_folder(path, config, seed)
    elif path.is_file():
        raw = _split_table(_read_table(path, config), config, seed, origin=path)
    elif _looks_like_hub_name(config.path):
        raw = _load_hub_task(config.path, config.splits)
    elif config.hub:
        log.info("task path %s not found: loading %s from the hub", config.path, config.hub)
        raw = _load_hub_task(config.hub, config.hub_splits)
    else:
        raise DataError(f"task path not found: {config.path}")

    labels = _label_vocabulary(raw["train"], config)
    tables = {role: (_standardise(table, config, origin), origin) for role, (table, origin) in raw.items()}
    if len(labels) < 2:
        raise DataError(
            f"{raw['train'][1]}: every train row has the label {labels[0]!r}; a task needs two classes or more "
            "(with one, every influence score is 0 and a subset would be an arbitrary tie-break)"
        )
    splits = {}
    for role, (table, origin) in tables.items():
        table = _subsample(table, getattr(config, f"max_{role}"), seed)
        splits[role] = _attach_label_ids(table, labels, origin)
    return TaskData(name=config.name, splits=splits, labels=labels)


def _load_split_folder(folder: Path, config: TaskConfig, seed: int) -> dict[str, tuple[pa.Table, Path]]:
    found = {}
    for role, stem in config.splits.items():
        files = [folder / f"{stem}{suffix}" for suffix in TASK_SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
        if files:
            found[role] = (_read_table(files[0], config), files[0])
    if "train" in found and len(found) == len(config.splits):
        return found
    data_files = sorted(p for p in folder.iterdir() if p.suffix in TASK_SUFFIXES)
    if len(data_files) == 1 and not found:
        return _split_table(_read_table(data_files[0], config), config, seed, origin=data_files[0])
    missing = sorted(set(config.splits) - set(found))
    raise DataError(
        f"{folder}: no file for split(s) {missing} (looked for "
        f"{', '.join(config.splits[m] + '.{jsonl,json,csv,tsv,parquet}' for m in missing)})"
    )


def _read_table(path: Path, config: TaskConfig) -> pa.Table:
    """Read one task file. A CSV/TSV whose first row lacks the configured column names is headerless (AG News):
    it is read again with the label column first and the text columns after it."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.suffix != ".parquet":
        _check_utf8(path)
    try:
        if path.suffix in (".jsonl", ".json"):
            return pajson.read_json(path)
        if path.suffix == ".parquet":
            return pq.read_table(path)
        delimiter = "\t" if path.suffix == ".tsv" else ","
        parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"')
        convert = pacsv.ConvertOptions(strings_can_be_null=False)
        table = pacsv.read_csv(path, parse_options=parse, convert_options=convert)
        wanted = [config.label_column, *config.text_columns]
        if not set(wanted) <= set(table.column_names) and table.num_columns == len(wanted):
            names = pacsv.ReadOptions(column_names=wanted)
            table = pacsv.read_csv(path, read_options=names, parse_options=parse, convert_options=convert)
        return table
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot parse: {error}") from error


def _check_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8 (Arrow's readers name no row, or keep the bytes silently)."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}: line {line_number}: not valid UTF-8 ({error.reason})") from error


def _split_table(table: pa.Table, config: TaskConfig, seed: int, origin: Path) -> dict[str, tuple[pa.Table, Path]]:
    """One labeled file: seeded split into train/dev/test (dev and test each ``dev_fraction``)."""
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    order = np.random.default_rng(seed).permutation(table.num_rows)
    n_held = max(1, round(config.dev_fraction * table.num_rows))
    if table.num_rows < 3 * n_held:
        raise DataError(f"{origin}: {table.num_rows} rows are too few to split with dev_fraction {config.dev_fraction}")
    parts = {"dev": order[:n_held], "test": order[n_held : 2 * n_held], "train": order[2 * n_held :]}
    return {role: (table.take(np.sort(rows)), origin) for role, rows in parts.items()}


def _load_hub_task(name: str, splits: dict[str, str]) -> dict[str, tuple[pa.Table, Path]]:
    """Load a Hugging Face dataset by name (needs network or a warm cache); ``splits`` maps role -> split."""
    import datasets

    dataset = datasets.load_dataset(name)
    return {role: (dataset[split].data.table, Path(f"hub:{name}/{split}")) for role, split in splits.items()}


def _standardise(table: pa.Table, config: TaskConfig, origin: Path) -> pa.Table:
    missing = [c for c in [*config.text_columns, config.label_column] if c not in table.column_names]
    if missing:
        raise DataError(f"{origin}: missing column(s) {missing}; it has {table.column_names}")
    texts = [table.column(c).cast(pa.string()).to_pylist() for c in config.text_columns]
    joined = [" ".join(part.strip() for part in parts if part) for parts in zip(*texts, strict=True)]
    rows = table.column("__row").to_pylist() if "__row" in table.column_names else range(table.num_rows)
    for row, text in zip(rows, joined, strict=True):
        if not text.strip():
            raise DataError(f"{origin}: row {row + 1}: empty text")
    labels = table.column(config.label_column).cast(pa.string()).to_pylist()
    for row, label in zip(rows, labels, strict=True):
        if label is None:
            raise DataError(f"{origin}: row {row + 1}: no label ({config.label_column!r} is null or missing)")
    return pa.table({"id": pa.array(list(rows), pa.int64()), "text": joined, "label": labels})


def _label_vocabulary(train: tuple[pa.Table, Path], config: TaskConfig) -> list[str]:
    table, origin = train
    if config.label_column not in table.column_names:
        raise DataError(f"{origin}: missing label column {config.label_column!r}; it has {table.column_names}")
    # a null label is named with its row by _standardise, which reads every split
    return sorted(set(table.column(config.label_column).cast(pa.string()).to_pylist()) - {None})


def _attach_label_ids(table: pa.Table, labels: list[str], origin: Path) -> pa.Table:
    index = {label: i for i, label in enumerate(labels)}
    ids = []
    for row, label in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True):
        if label not in index:
            raise DataError(f"{origin}: row {row + 1}: label {label!r} does not occur in the train split")
        ids.append(index[label])
    return table.append_column("label_id", pa.array(ids, pa.int64()))


def sample_rows(total: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded sample of ``limit`` row numbers of ``total``, in order (all rows when there are no more)."""
    if limit is None or total <= limit:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def _subsample(table: pa.Table, limit: int | None, seed: int) -> pa.Table:
    return table if limit is None or table.num_rows <= limit else table.take(sample_rows(table.num_rows, limit, seed))


def save_task(task: TaskData, folder: Path) -> None:
    for role, table in task.splits.items():
        pq.write_table(table, folder / f"{role}.parquet")
    (folder / "labels.json").write_text(json.dumps(task.labels, indent=2), encoding="utf-8")


def read_task(folder: Path, name: str) -> TaskData:
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    splits = {
        role: pq.read_table(folder / f"{role}.parquet") for role in SPLIT_ROLES if (folder / f"{role}.parquet").exists()
    }
    return TaskData(name=name, splits=splits, labels=labels)

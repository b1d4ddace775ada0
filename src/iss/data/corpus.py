"""Streaming the unlabeled corpus (large, never in memory): files, saved and hub datasets, compressed lines,
columnar shards, the seeded mixture filter, and the shards Ray and the corpus sample read.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import itertools
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from iss.config.schema import CorpusConfig, CorpusMixture
from iss.errors import DataError

log = logging.getLogger("iss")

CORPUS_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".arrow")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")  # read by row; a shard starts at a row offset
# gzip/zstandard-compressed .jsonl/.json/.txt shards (C4, Dolma, datatrove): each is read whole, one unit of work
COMPRESSED_SUFFIXES = (".gz", ".zst")
HUB_PREFIX = "hub:"  # corpus.paths entry naming a Hugging Face dataset (also: a bare name that is not a local path)


# ---------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusBatch:
    """A slice of the corpus stream: global row ids, texts and (optional) source labels."""

    ids: np.ndarray
    texts: list[str]
    sources: list[str] | None


def seeded_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of (id, seed): a seeded pseudo-random uint64 per id, independent of how ids are batched."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class MixtureFilter:
    """Applies a :class:`CorpusMixture` to the documents of the stream (every reader goes through it)."""

    def __init__(self, mixture: CorpusMixture | None) -> None:
        self.mixture = mixture
        self._shares: dict[str, float] = {}

    def share(self, key: str) -> float:
        """The share of documents with this source (or file name) that the mixture keeps: 0, 1 or between."""
        if key not in self._shares:
            mixture = self.mixture
            assert mixture is not None
            included = mixture.include is None or any(fnmatch.fnmatchcase(key, p) for p in mixture.include)
            excluded = any(fnmatch.fnmatchcase(key, p) for p in mixture.exclude)
            weight = next((w for p, w in mixture.weights.items() if fnmatch.fnmatchcase(key, p)), 1.0)
            self._shares[key] = weight if included and not excluded else 0.0
        return self._shares[key]

    def keep(self, ids: list[int], sources: list[str], file: Path) -> np.ndarray:
        """A mask over the documents (ids, their sources) of one file."""
        if self.mixture is None:
            return np.ones(len(ids), bool)
        by_file = self.mixture.by == "file"
        shares = np.array([self.share(file.name if by_file else source) for source in sources], float)
        return (shares >= 1) | (mixture_draws(np.asarray(ids, np.int64), self.mixture.seed) < shares)


MIXTURE_STREAM = 0x6D6978747572  # "mixture": the mixture's draws come from a stream of their own


def mixture_draws(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform draw in [0, 1) per document id for the mixture's shares. It must not be ``seeded_hash(ids,
    seed)`` itself: the random-corpus sample keeps the documents of smallest ``seeded_hash(ids, run seed)``, and with
    the same stream the documents a share keeps (the smallest hashes) would be exactly the ones the sample takes
    first, so the sample would come out with the whole corpus's source shares instead of the mixture's."""
    return seeded_hash(seeded_hash(ids, MIXTURE_STREAM), seed) / np.float64(2**64)


def _format(file: Path) -> str:
    """The record format of a corpus file: its suffix, under a compression suffix if there is one."""
    return Path(file.stem).suffix if file.suffix in COMPRESSED_SUFFIXES else file.suffix


def _is_corpus_file(file: Path) -> bool:
    if file.suffix in COMPRESSED_SUFFIXES:
        return _format(file) in CORPUS_SUFFIXES and _format(file) not in COLUMNAR_SUFFIXES
    return file.suffix in CORPUS_SUFFIXES


def _open_bytes(file: Path) -> BinaryIO:
    """The file's bytes, decompressed as a stream (gzip, zstandard) if it is compressed."""
    if file.suffix == ".gz":
        return gzip.open(file, "rb")
    if file.suffix == ".zst":
        # datatrove and the Pile write multi-frame streams: read_across_frames reads them all
        reader = zstandard.ZstdDecompressor().stream_reader(file.open("rb"), read_across_frames=True)
        return io.BufferedReader(reader)
    return file.open("rb")


def _lines(file: Path, handle: BinaryIO) -> Iterator[bytes]:
    """The raw lines of an open corpus file; a compressed stream that ends early or is corrupt is a DataError
    naming the file (click would take the EOFError of a cut gzip file for Ctrl-D and print only "Aborted.")."""
    try:
        yield from handle
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as error:
        raise DataError(f"{file}: compressed file cut short or corrupt ({error}); copy or download it again") from None


def _saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, in its own order."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return [folder / entry["filename"] for entry in state["_data_files"]]


def _hub_dataset_files(name: str, config: CorpusConfig) -> list[Path]:
    """A Hugging Face dataset's Arrow cache files: ``datasets`` downloads and prepares it once (its own cache),
    after which it is read like a saved dataset (by row, in shards, resumable)."""
    import datasets

    log.info("corpus: loading %s (split %s) with datasets", name, config.hub_split)
    dataset = datasets.load_dataset(name, config.hub_config, split=config.hub_split)
    return [Path(entry["filename"]) for entry in dataset.cache_files]


def corpus_files(config: CorpusConfig) -> list[Path]:
    """Every corpus file, folders expanded and sorted, so global ids are stable between runs."""
    files: list[Path] = []
    for entry in config.paths:
        path = Path(entry)
        if entry.startswith(HUB_PREFIX):
            files.extend(_hub_dataset_files(entry[len(HUB_PREFIX) :], config))
        elif (path / "state.json").is_file():
            files.extend(_saved_dataset_files(path))
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if _is_corpus_file(p) and p.is_file()))
        elif path.is_file():
            files.append(path)
        elif _looks_like_hub_name(entry):
            try:
                files.extend(_hub_dataset_files(entry, config))
            except Exception as error:  # offline, no such dataset: the user meant a local path
                raise DataError(f"corpus path not found: {entry} (nor a Hugging Face dataset: {error})") from error
        else:
            raise DataError(f"corpus path not found: {entry}")
    if not files:
        raise DataError(
            f"no corpus files ({', '.join(CORPUS_SUFFIXES)}, or .gz/.zst of text ones) under {config.paths}"
        )
    return files


def iter_corpus(config: CorpusConfig, batch_size: int | None = None) -> Iterator[CorpusBatch]:
    """Stream the corpus in batches; empty documents, and those the mixture leaves out, keep their row id."""
    batch_size = batch_size or config.shard_size
    mixture = MixtureFilter(config.mixture)
    ids: list[int] = []
    texts: list[str] = []
    sources: list[str] = []
    next_id = 0
    for file in corpus_files(config):
        if file.stat().st_size == 0:
            log.warning("%s: empty corpus file, skipped", file)
        records = _iter_file(file, config)
        if config.max_docs is not None:
            records = itertools.islice(records, max(0, config.max_docs - next_id))
        for chunk in _batched(records, 4096):
            chunk_ids = range(next_id, next_id + len(chunk))
            next_id += len(chunk)
            batch = _documents(chunk_ids, chunk, file, mixture)
            ids += batch.ids.tolist()
            texts += batch.texts
            sources += batch.sources
            while len(ids) >= batch_size:
                yield CorpusBatch(np.asarray(ids[:batch_size], np.int64), texts[:batch_size], sources[:batch_size])
                ids, texts, sources = ids[batch_size:], texts[batch_size:], sources[batch_size:]
        if config.max_docs is not None and next_id >= config.max_docs:
            break
    if ids:
        yield CorpusBatch(np.asarray(ids, np.int64), texts, sources)


def _batched(records: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _documents(
    ids: range, records: list[tuple[str | None, str | None]], file: Path, mixture: MixtureFilter
) -> CorpusBatch:
    """The non-empty documents of consecutive records of one file that the mixture keeps (the file's stem is
    the source of a record without one)."""
    pairs = [(i, text, source) for i, (text, source) in zip(ids, records, strict=True) if text and text.strip()]
    row_ids = [i for i, _, _ in pairs]
    sources = [source if source is not None else file.stem for _, _, source in pairs]
    keep = mixture.keep(row_ids, sources, file)
    kept = [i for i, flag in enumerate(keep) if flag]
    return CorpusBatch(
        np.asarray([row_ids[i] for i in kept], np.int64), [pairs[i][1] for i in kept], [sources[i] for i in kept]
    )


def _iter_file(
    file: Path, config: CorpusConfig, start: int = 0, first_line: int = 1
) -> Iterator[tuple[str, str | None]]:
    """(text, source) records of one file, from byte offset ``start`` (text files) or row ``start`` (parquet).

    Compressed files are read from their start (``start`` must be 0): a compressed stream has no byte offsets.
    """
    if file.suffix in COLUMNAR_SUFFIXES:
        yield from _iter_columnar(file, config, start)
        return
    with _open_bytes(file) as handle:
        if start:
            handle.seek(start)
        for line_number, raw in enumerate(_lines(file, handle), start=first_line):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{file}: line {line_number}: not valid UTF-8 ({error.reason})") from error
            if _format(file) == ".txt":
                yield _checked_length(line.rstrip("\n"), config, file, f"line {line_number}"), None
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file}: line {line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict) or config.text_column not in record:
                raise DataError(f"{file}: line {line_number}: no {config.text_column!r} field")
            source = record.get(config.source_column) if config.source_column else None
            yield _checked_length(record[config.text_column], config, file, f"line {line_number}"), source


def _record_batches(file: Path) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """Column names and record batches of a parquet file or an Arrow IPC stream (what ``datasets`` writes)."""
    if file.suffix == ".parquet":
        parquet = pq.ParquetFile(file)
        return parquet.schema_arrow.names, parquet.iter_batches()
    reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    return reader.schema.names, iter(reader)


def _columnar_rows(file: Path) -> int:
    if file.suffix == ".parquet":
        return pq.ParquetFile(file).metadata.num_rows
    return sum(batch.num_rows for batch in _record_batches(file)[1])


def _iter_columnar(file: Path, config: CorpusConfig, start: int) -> Iterator[tuple[str, str | None]]:
    """(text, source) records of a parquet or Arrow file from row ``start``."""
    names, batches = _record_batches(file)
    if config.text_column not in names:
        raise DataError(f"{file}: missing text column {config.text_column!r}")
    has_source = config.source_column is not None and config.source_column in names
    skip, batch_start = start, 0  # rows still to skip; file row of the record batch's first row
    for record_batch in batches:
        batch_rows = record_batch.num_rows
        if skip >= batch_rows:
            skip, batch_start = skip - batch_rows, batch_start + batch_rows
            continue
        first_row = batch_start + skip + 1  # 1-based, for error messages
        record_batch, skip, batch_start = record_batch.slice(skip), 0, batch_start + batch_rows
        text_values = record_batch.column(config.text_column).to_pylist()
        source_values = (
            record_batch.column(config.source_column).to_pylist() if has_source else [None] * len(text_values)
        )
        for row, (text, source) in enumerate(zip(text_values, source_values, strict=True), start=first_row):
            yield _checked_length(text, config, file, f"row {row}"), source


def _checked_length(text: str | None, config: CorpusConfig, file: Path, where: str) -> str | None:
    if text is not None and len(text) > config.max_doc_chars:
        raise DataError(
            f"{file}: {where}: document of {len(text):,} characters is longer than corpus.max_doc_chars "
            f"({config.max_doc_chars:,}); split or drop it, or raise the limit"
        )
    return text


@dataclass(frozen=True)
class CorpusShard:
    """Consecutive records of one corpus file that a worker can read on its own, with their global row ids."""

    file: str
    first_id: int
    rows: int
    start: int = 0  # byte offset (text files) or row offset (parquet, arrow)
    first_line: int = 1


def corpus_shards(config: CorpusConfig, rows_per_shard: int | None = None) -> list[CorpusShard]:
    """Split the corpus into shards of ``rows_per_shard`` records with the row ids `iter_corpus` gives them.

    One pass over the bytes (no JSON parsing) finds where each shard starts, so a distributed reader can seek
    straight to its shard. A compressed file is one shard, whatever its size.
    """
    rows_per_shard = rows_per_shard or config.shard_size
    shards: list[CorpusShard] = []
    next_id = 0
    for file in corpus_files(config):
        if file.suffix in COLUMNAR_SUFFIXES:
            total = _columnar_rows(file)
            for start in range(0, total, rows_per_shard):
                shards.append(CorpusShard(str(file), next_id + start, min(rows_per_shard, total - start), start))
            next_id += total
            continue
        rows, start, first_line, offset = 0, 0, 1, 0
        whole = file.suffix in COMPRESSED_SUFFIXES
        with _open_bytes(file) as handle:
            for line_number, raw in enumerate(_lines(file, handle), start=1):
                counts = _format(file) == ".txt" or bool(raw.strip())
                if counts and rows == rows_per_shard and not whole:
                    shards.append(CorpusShard(str(file), next_id, rows, start, first_line))
                    next_id, rows, start, first_line = next_id + rows, 0, offset, line_number
                rows += counts
                offset += len(raw)
        if rows:
            shards.append(CorpusShard(str(file), next_id, rows, start, first_line))
            next_id += rows
    if config.max_docs is not None:
        shards = [
            CorpusShard(s.file, s.first_id, min(s.rows, config.max_docs - s.first_id), s.start, s.first_line)
            for s in shards
            if s.first_id < config.max_docs
        ]
    return shards


def read_shard(shard: CorpusShard, config: CorpusConfig) -> CorpusBatch:
    """The non-empty documents of one shard, as `iter_corpus` would yield them."""
    file = Path(shard.file)
    records = list(itertools.islice(_iter_file(file, config, shard.start, shard.first_line), shard.rows))
    return _documents(
        range(shard.first_id, shard.first_id + len(records)), records, file, MixtureFilter(config.mixture)
    )


def _looks_like_hub_name(name: str) -> bool:
    return not name.startswith((".", "/")) and name.count("/") <= 1 and not Path(name).suffix

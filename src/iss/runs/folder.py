"""The run folder: one artifact folder per stage, a fingerprint per artifact, and a manifest.

A stage is done when its folder holds ``stage.json`` with a fingerprint equal to the one the current config
and upstream artifacts produce, and every file that record lists is still there with its size (and, for small
files, its digest). Stages write into a temporary sibling folder that is renamed into place only when complete,
so a killed stage never leaves a folder that looks finished.

A run folder is only what iss made: a marker file names it at creation, and a folder that holds anything else
is refused before a byte is written, so a stage name that happens to match a user's folder never replaces it.
One process writes a run folder at a time (a lock); an archive brought in by ``iss import`` is untrusted input.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from iss._version import CACHE_VERSION, __version__
from iss.errors import ConfigError

log = logging.getLogger("iss")
STAGE_FILE = "stage.json"
MANIFEST_FILE = "manifest.json"
EXPORT_FILE = "export.json"  # the first member of an `iss export` archive: what it holds and who made it
RUN_MARKER = ".iss-run"  # written when iss makes a run folder: only such a folder is written into
WRITER_LOCK = ".iss-run.lock"  # held by the one process that writes stages into the folder
WRITER_FILE = ".iss-run.writer"  # that process's pid, for the message that refuses a second one
# a stage name as the plan makes them (select-iss@12.5pct, pretrain-tlm-seed0): one path component, never ".."
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._+-]*")
DIGESTED_BYTES = 1 << 20  # files up to this size get a digest in stage.json; larger ones are checked by size
MAX_HEADER_BYTES = 16 << 20  # an archive's export.json larger than this is not read
RECORD_REMEDY = "delete that stage folder, or rerun the stage's command, which recomputes it"
_WRITER_LOCKS: dict[Path, FileLock] = {}  # one lock object per run folder and process: reentrant across stages
_UNCHECKED_WARNED: set[Path] = set()  # run folders whose stages predate file lists (said once per process)


def cache_root() -> Path:
    """Where iss keeps what outlives a run folder (trained tokenizers, file digests): ``$ISS_CACHE``, else
    ``~/.cache/iss``."""
    return Path(os.environ.get("ISS_CACHE", "~/.cache/iss")).expanduser()


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (configs, upstream fingerprints, file stats) and of the code's
    cache version (``iss`` major.minor), so an artifact of older code is not reused after a fix."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_signature(paths: list[str]) -> list[tuple[str, int, str]]:
    """Path, size and SHA-256 of each input file: edited inputs invalidate downstream stages, while a fresh copy of
    the same bytes (a new mtime: a re-synced data folder, a checkout) does not. A digest is cached by (path, size,
    mtime, inode) under ``cache_root()/file-hashes``, so a large corpus is read once, not at every run."""
    signature = []
    for path in paths:
        for file in sorted(_expand(Path(path))):
            resolved = file.resolve()
            signature.append((str(resolved), resolved.stat().st_size, content_digest(resolved)))
    return signature


def content_digest(file: Path, cache: Path | None = None) -> str:
    """SHA-256 of a file's bytes, from the cache (default ``cache_root()/file-hashes``) while the file's (path,
    size, mtime, inode) are unchanged."""
    stat = file.stat()
    key = json.dumps([str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino]).encode()
    entry = (cache or cache_root() / "file-hashes").expanduser() / hashlib.sha256(key).hexdigest()[:32]
    if entry.is_file():
        return entry.read_text(encoding="utf-8")
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest.hexdigest(), encoding="utf-8")
        os.replace(tmp, entry)
    except OSError as error:  # a read-only home: hash again next time
        log.debug("file hash cache not written: %s", error)
    return digest.hexdigest()


def _expand(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def atomic_savez(path: Path, **arrays: Any) -> None:
    """Save numpy arrays atomically (temp file + rename): a kill never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    names = ["torch", "transformers", "tokenizers", "bm25s", "pyarrow", "numpy", "scipy"]
    versions = {"python": platform.python_version(), "iss": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class StageResult:
    """What a finished stage left behind: its folder and the summary it recorded."""

    name: str
    path: Path
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def check_stage_name(name: str) -> str:
    """``name`` if it is a stage name as the plan makes them (one path component, no ``..``), else a ConfigError:
    a stage name becomes a folder of the run folder, so an arbitrary one could point anywhere."""
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{name!r} is not a stage name (letters, digits and @._+- only, one path component)")
    return name


def read_json(path: Path, what: str, remedy: str) -> Any:
    """The JSON at ``path``; a damaged file (truncated, not JSON, not UTF-8) is one ConfigError naming it and
    ``remedy`` (what the user can do), never a traceback."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: {what} is damaged ({type(error).__name__}: {error}); {remedy}") from None


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under a stage folder (but its record) with its size, and a digest where the file is small:
    what reuse checks, so a deleted or truncated artifact is recomputed instead of read far from the cause."""
    records = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / STAGE_FILE):
        size = file.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= DIGESTED_BYTES:
            entry["blake2b"] = _small_file_digest(file)
        records[file.relative_to(folder).as_posix()] = entry
    return records


def damaged_files(folder: Path, records: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between a stage folder and the files its record lists: one phrase per damaged file."""
    problems = []
    for relative, entry in records.items():
        file = folder / relative
        if not file.is_file():
            problems.append(f"{relative} is missing")
        elif (size := file.stat().st_size) != entry["size"]:
            problems.append(f"{relative} has {size} bytes, not {entry['size']}")
        elif "blake2b" in entry and _small_file_digest(file) != entry["blake2b"]:
            problems.append(f"{relative} was changed")
    return problems


def _small_file_digest(file: Path) -> str:
    """BLAKE2b-128 of a file read whole (only files up to DIGESTED_BYTES get one)."""
    return hashlib.blake2b(file.read_bytes(), digest_size=16).hexdigest()


def _checkout() -> Path | None:
    """The source checkout iss runs from (an editable install), if there is one: never a run folder."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def _made_by_iss(entries: list[Path], root: Path) -> bool:
    """A folder without the marker that an older iss made: its manifest, a finished stage, or only the hidden
    scratch files of a stage (a lock, a work folder) of a run killed before its first stage finished."""
    if (root / MANIFEST_FILE).is_file() or any((entry / STAGE_FILE).is_file() for entry in entries):
        return True
    return all(entry.name.startswith(".") and entry.suffix in {".lock", ".work", ".tmp", ".old"} for entry in entries)


class RunFolder:
    """A run directory holding one folder per finished stage and a manifest describing them.

    ``recompute``: a finished stage whose files are missing or changed is run again (with a warning naming the
    file); False refuses it in one line instead (``--no-recompute``).
    """

    def __init__(self, root: str | Path, recompute: bool = True) -> None:
        self.root = Path(root)
        self.recompute = recompute
        self._refuse_unsafe_root()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run folder {self.root} is a file, not a folder: give --run-dir (or run_dir) a folder")
        if not (self.root / RUN_MARKER).is_file():
            self._claim_folder()

    @classmethod
    def existing(cls, root: str | Path) -> RunFolder:
        """A run folder that must exist already (to read, report or export), refused in one line otherwise."""
        root = Path(root)
        if not (root / RUN_MARKER).is_file() and not (root / MANIFEST_FILE).is_file():
            raise ConfigError(f"{root} is not an iss run folder (no {MANIFEST_FILE})")
        return cls(root)

    def _refuse_unsafe_root(self) -> None:
        resolved = self.root.expanduser().resolve()
        checkout = _checkout()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
            raise ConfigError(
                f"run folder {self.root} is the file-system root or the home folder: give a folder of its own"
            )
        if checkout is not None and (resolved == checkout or resolved in checkout.parents):
            raise ConfigError(f"run folder {self.root} holds the iss checkout {checkout}: give a folder of its own")

    def _claim_folder(self) -> None:
        """Make the folder, or adopt one an older iss made; any other non-empty folder is refused before a byte is
        written, since stages replace subfolders named like them."""
        entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        if entries and not _made_by_iss(entries, self.root):
            shown = ", ".join(entry.name for entry in entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"{self.root} is not an iss run folder (it holds {shown}): give --run-dir (or run_dir) a new or "
                "empty folder; iss replaces subfolders named like its stages"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        marker = {"iss": __version__, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            write_json(self.root / RUN_MARKER, {**marker, "adopted": bool(entries)})
        except OSError as error:  # a read-only copy of a run folder: readable, and nothing will be written
            log.debug("run folder marker not written: %s", error)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held while this process writes stages here; a second process is refused in one line instead of
        interleaving its stages with this one's. Reentrant within a process (a stage that runs its upstream)."""
        key = self.root.resolve()
        lock = _WRITER_LOCKS.setdefault(key, FileLock(key / WRITER_LOCK, thread_local=False))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            owner = (key / WRITER_FILE).read_text(encoding="utf-8").strip() if (key / WRITER_FILE).is_file() else "?"
            raise ConfigError(
                f"{self.root}: another iss process (pid {owner}) is writing this run folder; wait for it to end, "
                "or give this run another --run-dir (--reuse-from this folder shares its finished stages)"
            ) from None
        try:
            if lock.lock_counter == 1:
                (key / WRITER_FILE).write_text(str(os.getpid()), encoding="utf-8")
            yield
        finally:
            lock.release()

    def finished(self, name: str, stage_fingerprint: str) -> StageResult | None:
        """The stage's result if it finished with this fingerprint and its files are as it left them, else None
        (a damaged stage: recomputed with a warning, or refused when ``recompute`` is off)."""
        check_stage_name(name)
        folder = self.root / name
        self._restore_swapped_out(name)
        record_path = folder / STAGE_FILE
        if not record_path.is_file():
            return None
        try:
            record = read_json(record_path, "the stage's record", RECORD_REMEDY)
        except ConfigError:
            return self._damaged(name, f"{STAGE_FILE} is damaged (not JSON)")
        made_by = record.get("versions", {}).get("iss", "unknown")
        if record.get("fingerprint") != stage_fingerprint:
            if made_by != __version__:
                log.info("stage %s: the artifact was made by iss %s; rerunning under %s", name, made_by, __version__)
            return None
        if "files" not in record:
            if self.root not in _UNCHECKED_WARNED:
                _UNCHECKED_WARNED.add(self.root)
                log.info("%s: stages made before iss 0.3.2 list no files; their files are not checked", self.root)
        elif problems := damaged_files(folder, record["files"]):
            return self._damaged(name, "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
        if made_by != __version__:
            log.warning("stage %s: reusing an artifact made by iss %s (this is %s)", name, made_by, __version__)
        return StageResult(name, folder, stage_fingerprint, record.get("summary", {}), reused=True)

    def damage(self, name: str) -> list[str]:
        """What is wrong with finished stage ``name``'s files (missing, resized, changed): empty when they are as
        its record lists them, or when an older record lists none."""
        folder = self.root / check_stage_name(name)
        record = read_json(folder / STAGE_FILE, "the stage's record", RECORD_REMEDY)
        return damaged_files(folder, record.get("files") or {})

    def _damaged(self, name: str, problem: str) -> None:
        where = self.root / name
        if not self.recompute:
            raise ConfigError(
                f"stage {name} is damaged: {problem} (in {where}); delete that folder, or run without --no-recompute "
                "to recompute it"
            )
        log.warning("stage %s is damaged: %s (in %s); recomputing it", name, problem, where)
        return None

    def _restore_swapped_out(self, name: str) -> None:
        """A kill between the two renames of a stage swap leaves the old artifact as ``.NAME.old``: put it back."""
        old, final = self.root / f".{name}.old", self.root / name
        if not final.exists() and (old / STAGE_FILE).is_file():
            os.replace(old, final)
            log.warning("stage %s: put back the artifact a killed run had moved aside", name)

    def link_stages_from(self, other: str | Path) -> list[str]:
        """Bring another run folder's finished stages in as hard links (copies across file systems), so an ablation
        of a finished run computes only the stages its changed settings reach; the rest are reused by fingerprint.

        Safe for the other run: a stage that is recomputed here is written to a temporary folder and swapped in,
        which replaces the links instead of writing through them. Stages this folder already has are kept.
        """
        source = RunFolder.existing(other)
        linked = []
        with self.writing():
            for name in source.finished_stages():
                if (self.root / name).exists():
                    continue
                shutil.copytree(source.root / name, self.root / name, copy_function=_link_or_copy)
                linked.append(name)
        return linked

    def lock(self, name: str) -> FileLock:
        """Held while one thread checks for and runs stage ``name``, so two pipelines of one process on this
        folder (threads of a notebook) never write the same stage at once: the second waits, then reuses it.
        Another process is refused by :meth:`writing` before it gets here."""
        return FileLock(self.root / f".{check_stage_name(name)}.lock")

    def work_dir(self, name: str) -> Path:
        """Scratch folder kept across kills, for stages that resume partial work (shards, checkpoints)."""
        path = self.root / f".{check_stage_name(name)}.work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def stage(self, name: str, stage_fingerprint: str, config: dict[str, Any]) -> Iterator[tuple[Path, dict]]:
        """Run a stage into a temp folder; on success record it (with its files) and swap it into place.

        Yields the folder to write into and a dict the stage fills with its summary (counts, timings).
        """
        check_stage_name(name)
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._claim_work_dir(name, stage_fingerprint)
        summary: dict[str, Any] = {}
        start = time.perf_counter()
        yield tmp, summary
        summary.setdefault("seconds", round(time.perf_counter() - start, 3))
        record = {
            "stage": name,
            "fingerprint": stage_fingerprint,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "summary": summary,
            "versions": package_versions(),
            "files": file_records(tmp),
        }
        write_json(tmp / STAGE_FILE, record)
        final = self.root / name
        if final.exists():
            old = self.root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        shutil.rmtree(self.root / f".{name}.work", ignore_errors=True)

    def _claim_work_dir(self, name: str, stage_fingerprint: str) -> None:
        """Keep partial work only if it was made for this fingerprint: a changed config starts afresh."""
        work = self.root / f".{name}.work"
        marker = work / "fingerprint"
        if work.exists() and (not marker.is_file() or marker.read_text(encoding="utf-8") != stage_fingerprint):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        marker.write_text(stage_fingerprint, encoding="utf-8")

    def finished_stages(self) -> dict[str, dict[str, Any]]:
        """Every finished stage folder's record (``stage.json``), by stage name; a damaged record is left out with
        a warning (that stage is recomputed when a run needs it)."""
        records = {}
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not (folder / STAGE_FILE).is_file():
                continue
            try:
                records[folder.name] = read_json(folder / STAGE_FILE, "the stage's record", RECORD_REMEDY)
            except ConfigError as error:
                log.warning("%s; left out", error)
        return records

    def read_manifest(self) -> dict[str, Any]:
        """The manifest (the run's config, every stage it ran); empty for a folder without one yet."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return {}
        return read_json(
            path,
            "the run's manifest",
            "rerun the run's command (`iss run CONFIG`), which rebuilds it from the stage folders",
        )

    def export(self, archive: str | Path, stages: list[str] | None = None, skip: list[str] | None = None) -> list[str]:
        """Write finished stages into one ``.tar.gz`` that ``import_archive`` takes on another machine.

        ``stages`` and ``skip`` are shell patterns of stage names (``finetune-*``, ``pretrain-*``): a run that must
        continue elsewhere carries only what its remaining stages need (say, results and selections, not models).
        The archive opens with ``export.json``: the iss version, the run's config and every stage's fingerprint.
        """
        records = self.finished_stages()
        chosen = [
            name
            for name in records
            if (not stages or any(fnmatch.fnmatchcase(name, p) for p in stages))
            and not any(fnmatch.fnmatchcase(name, p) for p in skip or [])
        ]
        if not chosen:
            raise ConfigError(f"{self.root}: no finished stage matches {stages or '*'} (less {skip or 'nothing'})")
        header = ExportHeader(
            iss=__version__,
            cache_version=CACHE_VERSION,
            config=self.read_manifest().get("config"),
            stages={name: records[name]["fingerprint"] for name in chosen},
        )
        archive = Path(archive)
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            blob = header.model_dump_json(indent=2).encode()
            info = tarfile.TarInfo(EXPORT_FILE)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            for name in chosen:
                tar.add(self.root / name, arcname=name, filter=_without_links)
        os.replace(tmp, archive)
        return chosen

    def import_archive(
        self, archive: str | Path, config: dict[str, Any] | None = None, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Bring an ``export`` archive's stages into this run folder, after checking that this code can reuse them.

        The archive is untrusted: its header must pass :class:`ExportHeader`, every member must be a plain file
        or folder under one of the stages the header lists (each of which it must hold, with the fingerprint the
        header gives), and their sizes together must fit ``max_bytes`` (default: the free space here). Anything
        else is refused in one line before a byte is written, and nothing is ever written outside this folder.

        Refused when the archive was made under another cache version (its fingerprints can never match here). With
        the local ``config`` (a dumped IssConfig) the keys where the archive's run differs are reported: stages
        they reach will not match their fingerprints and are recomputed, the others are reused. A stage this
        folder already has is kept as it is. Returns what was imported, kept and the differing keys.
        """
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                header = _read_header(tar, members, archive)
                stage_members = _checked_members(members, header, archive)
                limit = shutil.disk_usage(self.root).free if max_bytes is None else max_bytes
                total = sum(member.size for member in stage_members)
                if total > limit:
                    raise ConfigError(f"{archive}: its files hold {total} bytes, more than the {limit} allowed here")
                kept = [name for name in header.stages if (self.root / name).exists()]
                wanted = [name for name in header.stages if name not in kept]
                with self.writing(), tempfile.TemporaryDirectory(dir=self.root, prefix=".import-") as scratch:
                    chosen = [m for m in stage_members if m.name.split("/", 1)[0] in wanted]
                    tar.extractall(scratch, members=chosen, filter="data")
                    for name in wanted:
                        _check_extracted(Path(scratch) / name, header.stages[name], archive)
                    for name in wanted:
                        os.replace(Path(scratch) / name, self.root / name)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise ConfigError(f"{archive}: not an iss export archive, or a damaged one ({error})") from None
        results = [
            StageResult(name, self.root / name, record["fingerprint"], record.get("summary", {}), reused=True)
            for name, record in self.finished_stages().items()
            if name in wanted
        ]
        self.update_manifest(results, {} if (self.root / MANIFEST_FILE).is_file() else {"config": header.config})
        differing = sorted(_differences(header.config or {}, config)) if config is not None else []
        return {"imported": wanted, "kept": kept, "config_differs": differing, "made_by": header.iss}

    def update_manifest(self, results: list[StageResult], extra: dict[str, Any]) -> Path:
        """Merge stage records into ``manifest.json`` (one entry per stage name); a damaged manifest is rebuilt
        from the stage folders, with a warning."""
        path = self.root / MANIFEST_FILE
        try:
            manifest = self.read_manifest() or {"stages": {}}
        except ConfigError as error:
            log.warning("%s; rebuilding it from the stage folders", error)
            manifest = {"stages": {}}
            results = [*self._recorded_results(), *results]
        manifest.setdefault("stages", {})
        for result in results:
            manifest["stages"][result.name] = {
                "fingerprint": result.fingerprint,
                "path": result.path.name,
                "reused": result.reused,
                "summary": result.summary,
            }
        manifest.update(extra)
        manifest["versions"] = package_versions()
        manifest["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(path, manifest)
        return path

    def _recorded_results(self) -> list[StageResult]:
        return [
            StageResult(name, self.root / name, record.get("fingerprint", ""), record.get("summary", {}), reused=True)
            for name, record in self.finished_stages().items()
        ]


class ExportHeader(BaseModel):
    """``export.json``, the first member of an export archive, as an import accepts it."""

    model_config = ConfigDict(extra="forbid")

    iss: str
    cache_version: str
    config: dict[str, Any] | None = None
    stages: dict[str, str] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, str]) -> dict[str, str]:
        for name in stages:
            check_stage_name(name)
        return stages


def _without_links(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Export plain files and folders only (a hard link inside a stage is stored as the file itself)."""
    if member.islnk() or member.issym():
        raise ConfigError(f"{member.name}: a link in a stage folder; iss exports plain files only")
    return member


def _read_header(tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: str | Path) -> ExportHeader:
    found = [m for m in members if m.name == EXPORT_FILE]
    if not found or not found[0].isfile():
        raise ConfigError(f"{archive}: not an iss export archive (no {EXPORT_FILE})")
    if found[0].size > MAX_HEADER_BYTES:
        raise ConfigError(f"{archive}: its {EXPORT_FILE} is {found[0].size} bytes, too large to be a header")
    handle = tar.extractfile(found[0])
    try:
        raw = json.loads(handle.read() if handle else b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{archive}: its {EXPORT_FILE} is not JSON ({error})") from None
    if isinstance(raw, dict) and raw.get("cache_version") not in (None, CACHE_VERSION):
        raise ConfigError(
            f"{archive}: made by iss {raw.get('iss', '?')}, whose stage fingerprints iss {__version__} never "
            "matches; import it with that version, or run the stages again"
        )
    try:
        return ExportHeader.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'header'}: {e['msg']}" for e in error.errors()[:3])
        raise ConfigError(f"{archive}: its {EXPORT_FILE} is not an iss export header ({problems})") from None


def _checked_members(
    members: list[tarfile.TarInfo], header: ExportHeader, archive: str | Path
) -> list[tarfile.TarInfo]:
    """The members under the header's stages: plain files and folders with relative, normalised names. A link,
    a device, a name that leaves its stage, or a member of a stage the header does not list is refused."""
    chosen = []
    for member in members:
        if member.name == EXPORT_FILE:
            continue
        parts = member.name.split("/")
        if member.name.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in member.name:
            raise ConfigError(f"{archive}: member {member.name!r} is not a plain relative path")
        if not (member.isfile() or member.isdir()):
            raise ConfigError(f"{archive}: member {member.name!r} is a link or a device, not a file or folder")
        if parts[0] not in header.stages:
            raise ConfigError(f"{archive}: member {member.name!r} belongs to no stage its {EXPORT_FILE} lists")
        chosen.append(member)
    present = {m.name.split("/", 1)[0] for m in chosen if m.name.count("/") == 1 and m.name.endswith(f"/{STAGE_FILE}")}
    if missing := sorted(set(header.stages) - present):
        raise ConfigError(f"{archive}: its {EXPORT_FILE} lists stages it does not hold: {', '.join(missing[:5])}")
    return chosen


def _check_extracted(folder: Path, expected: str, archive: str | Path) -> None:
    """An extracted stage must carry the fingerprint the header promised (a header that lies is refused)."""
    record = read_json(folder / STAGE_FILE, "an archived stage's record", "the archive is damaged")
    if not isinstance(record, dict) or record.get("fingerprint") != expected:
        raise ConfigError(f"{archive}: stage {folder.name}'s record does not carry the fingerprint its header lists")


def _differences(first: dict[str, Any], second: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dumps."""
    keys = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key), second.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys

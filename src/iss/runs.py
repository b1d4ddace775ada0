"""The run folder: one artifact folder per stage, a fingerprint per artifact, and a manifest.

A stage is done when its folder holds ``stage.json`` with a fingerprint equal to the one the current config
and upstream artifacts produce. Stages write into a temporary sibling folder that is renamed into place only
when complete, so a killed stage never leaves a folder that looks finished.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from iss._version import CACHE_VERSION, __version__
from iss.errors import ConfigError

log = logging.getLogger("iss")
STAGE_FILE = "stage.json"
MANIFEST_FILE = "manifest.json"
EXPORT_FILE = "export.json"  # the first member of an `iss export` archive: what it holds and who made it


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


class RunFolder:
    """A run directory holding one folder per finished stage and a manifest describing them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run folder {self.root} is a file, not a folder: give --run-dir (or run_dir) a folder")
        self.root.mkdir(parents=True, exist_ok=True)

    def finished(self, name: str, stage_fingerprint: str) -> StageResult | None:
        """The stage's result if it finished with this fingerprint, else None."""
        folder = self.root / name
        record_path = folder / STAGE_FILE
        if not record_path.is_file():
            return None
        record = json.loads(record_path.read_text(encoding="utf-8"))
        made_by = record.get("versions", {}).get("iss", "unknown")
        if record.get("fingerprint") != stage_fingerprint:
            if made_by != __version__:
                log.info("stage %s: the artifact was made by iss %s; rerunning under %s", name, made_by, __version__)
            return None
        if made_by != __version__:
            log.warning("stage %s: reusing an artifact made by iss %s (this is %s)", name, made_by, __version__)
        return StageResult(name, folder, stage_fingerprint, record.get("summary", {}), reused=True)

    def link_stages_from(self, other: str | Path) -> list[str]:
        """Bring another run folder's finished stages in as hard links (copies across file systems), so an ablation
        of a finished run computes only the stages its changed settings reach; the rest are reused by fingerprint.

        Safe for the other run: a stage that is recomputed here is written to a temporary folder and swapped in,
        which replaces the links instead of writing through them. Stages this folder already has are kept.
        """
        source = Path(other)
        if not (source / MANIFEST_FILE).is_file():
            raise ConfigError(f"{source} is not a run folder (no {MANIFEST_FILE})")
        linked = []
        for folder in sorted(source.iterdir()):
            if folder.name.startswith(".") or not (folder / STAGE_FILE).is_file() or (self.root / folder.name).exists():
                continue
            shutil.copytree(folder, self.root / folder.name, copy_function=_link_or_copy)
            linked.append(folder.name)
        return linked

    def lock(self, name: str) -> FileLock:
        """Held while one process checks for and runs stage ``name``, so two runs on one folder (an ablation and
        its base, two seeds' lists) never write the same stage at once: the second waits, then reuses it."""
        return FileLock(self.root / f".{name}.lock")

    def work_dir(self, name: str) -> Path:
        """Scratch folder kept across kills, for stages that resume partial work (shards, checkpoints)."""
        path = self.root / f".{name}.work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def stage(self, name: str, stage_fingerprint: str, config: dict[str, Any]) -> Iterator[tuple[Path, dict]]:
        """Run a stage into a temp folder; on success record it and swap it into place.

        Yields the folder to write into and a dict the stage fills with its summary (counts, timings).
        """
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
        """Every finished stage folder's record (``stage.json``), by stage name."""
        return {
            folder.name: json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))
            for folder in sorted(self.root.iterdir())
            if not folder.name.startswith(".") and (folder / STAGE_FILE).is_file()
        }

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
        manifest_path = self.root / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
        header = {
            "iss": __version__,
            "cache_version": CACHE_VERSION,
            "config": manifest.get("config"),
            "stages": {name: records[name]["fingerprint"] for name in chosen},
        }
        archive = Path(archive)
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            blob = json.dumps(header, indent=2).encode()
            info = tarfile.TarInfo(EXPORT_FILE)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            for name in chosen:
                tar.add(self.root / name, arcname=name)
        os.replace(tmp, archive)
        return chosen

    def import_archive(self, archive: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Bring an ``export`` archive's stages into this run folder, after checking that this code can reuse them.

        Refused when the archive was made under another cache version (its fingerprints can never match here). With
        the local ``config`` (a dumped IssConfig) the keys where the archive's run differs are reported: stages
        they reach will not match their fingerprints and are recomputed, the others are reused. A stage this
        folder already has is kept as it is. Returns what was imported, kept and the differing keys.
        """
        try:
            with tarfile.open(archive, "r:gz") as tar:
                header_file = tar.extractfile(EXPORT_FILE) if EXPORT_FILE in tar.getnames() else None
                if header_file is None:
                    raise ConfigError(f"{archive}: not an iss export archive (no {EXPORT_FILE})")
                header = json.loads(header_file.read())
                if header["cache_version"] != CACHE_VERSION:
                    raise ConfigError(
                        f"{archive}: made by iss {header['iss']}, whose stage fingerprints iss {__version__} never "
                        "matches; import it with that version, or run the stages again"
                    )
                kept = [name for name in header["stages"] if (self.root / name).exists()]
                wanted = [name for name in header["stages"] if name not in kept]
                with tempfile.TemporaryDirectory(dir=self.root, prefix=".import-") as scratch:
                    members = [m for m in tar.getmembers() if m.name.split("/", 1)[0] in wanted]
                    tar.extractall(scratch, members=members, filter="data")
                    for name in wanted:
                        os.replace(Path(scratch) / name, self.root / name)
        except (tarfile.ReadError, EOFError) as error:
            raise ConfigError(f"{archive}: not an iss export archive ({error})") from None
        results = [
            StageResult(name, self.root / name, record["fingerprint"], record.get("summary", {}), reused=True)
            for name, record in self.finished_stages().items()
            if name in wanted
        ]
        self.update_manifest(results, {} if (self.root / MANIFEST_FILE).is_file() else {"config": header["config"]})
        differing = sorted(_differences(header.get("config") or {}, config)) if config is not None else []
        return {"imported": wanted, "kept": kept, "config_differs": differing, "made_by": header["iss"]}

    def update_manifest(self, results: list[StageResult], extra: dict[str, Any]) -> Path:
        """Merge stage records into ``manifest.json`` (one entry per stage name)."""
        path = self.root / MANIFEST_FILE
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}}
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

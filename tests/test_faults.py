"""Faults: kill -9 in the middle of retrieval, influence and pretraining (the rerun resumes and ends where an
uninterrupted run ends: same hits, same top-k lists, same weights); damaged stages, manifests and records; a
full disk; two processes on one folder; folders iss did not make; archives that try to write outside the run
folder; and every bad input of the README's promise, each ending in one line and exit 2 before the first
expensive stage. ``benchmarks/bench_faults.py`` lists every case with its outcome and time."""

from __future__ import annotations

import errno
import gzip
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from iss import cli
from iss.config.schema import IssConfig
from iss.errors import ConfigError
from iss.modeling.model import TaskModel
from iss.report.html import write_report
from iss.runs import folder as runs
from iss.runs.folder import RunFolder
from iss.selection.budget import BudgetError
from iss.stages.select import check_reach

from .conftest import CHEMPROT, CORPUS, iss_command

# small shards so that every stage checkpoints many times before it ends
SHARDS = ["--set", "corpus.shard_size=5000", "--set", "influence.shard_units=60",
          "--set", "pretrain.steps=40", "--set", "pretrain.batch_size=8", "--set", "pretrain.save_every=2"]  # fmt: skip


def _kill_when(marker: Path, args: list[str]) -> None:
    """Start ``iss ARGS``, SIGKILL it as soon as ``marker`` exists (a checkpoint was written)."""
    process = subprocess.Popen([sys.executable, "-m", "iss", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"iss {args[0]} ended (rc {process.returncode}) before {marker.name} appeared")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{marker} never appeared")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _resume(args: list[str]) -> str:
    result = iss_command(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_kill_during_retrieval_influence_and_pretraining_then_resume(config_file, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # one tokenizer for both runs (WordPiece training is not bit-reproducible across processes)
    assert iss_command("tokenizer", str(config_file), "--run-dir", str(reference), "--quiet").returncode == 0
    common = [str(config_file), *SHARDS, "--set", f"tokenizer.path={reference / 'tokenizer'}"]
    done = iss_command("pretrain", *common, "--run-dir", str(reference), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]

    run = [*common, "--run-dir", str(killed)]
    _kill_when(killed / ".retrieval.work" / "index-state.npz", ["retrieval", *run])  # pass 1: counting
    _kill_when(killed / ".retrieval.work" / "search-state.npz", ["retrieval", *run])  # pass 2: scoring
    assert not (killed / "retrieval").exists()  # a half-done stage never looks finished
    assert "BM25 search: resuming" in _resume(["retrieval", *run])
    for name in ("hits.parquet", "pool.parquet"):
        assert pq.read_table(killed / "retrieval" / name).equals(pq.read_table(reference / "retrieval" / name))

    _kill_when(killed / ".influence.work" / "topk.npz", ["influence", *run])
    assert not (killed / "influence").exists()
    assert "influence: resuming at candidate unit" in _resume(["influence", *run])
    for name in ("topk.parquet", "task_units.parquet", "pool_units.parquet"):
        assert pq.read_table(killed / "influence" / name).equals(pq.read_table(reference / "influence" / name))

    _kill_when(killed / ".pretrain-iss-seed0.work" / "checkpoint" / "state.pt", ["pretrain", *run])
    assert not (killed / "pretrain-iss-seed0").exists()
    assert "resuming at step" in _resume(["pretrain", *run])
    subset = "select-iss/subset.parquet"
    assert pq.read_table(killed / subset).equals(pq.read_table(reference / subset))
    weights = "pretrain-iss-seed0/model/model.safetensors"
    expected, resumed = load_file(str(reference / weights)), load_file(str(killed / weights))
    assert expected.keys() == resumed.keys()
    assert all((expected[name] == resumed[name]).all() for name in expected)
    curves = [
        json.loads((run / "pretrain-iss-seed0" / "stage.json").read_text())["summary"]["curve"]
        for run in (reference, killed)
    ]
    assert curves[1] == curves[0]  # the whole curve, not only the steps after the resume
    assert curves[0][0]["step"] == 2 and curves[0][-1]["step"] == 40


# ------------------------------------------------------------------ damage a run folder, one case at a time


def _finish(folder: RunFolder, name: str, files: dict[str, bytes], stage_fingerprint: str = "f1") -> None:
    with folder.stage(name, stage_fingerprint, {}) as (path, summary):
        for relative, content in files.items():
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            (path / relative).write_bytes(content)
        summary["rows"] = len(files)


@pytest.fixture()
def finished(tmp_path) -> RunFolder:
    """A run folder with one finished stage: a small file (digested) and a large one (checked by size)."""
    folder = RunFolder(tmp_path / "run")
    _finish(folder, "select-tlm", {"subset.parquet": b"small", "model/weights.bin": b"x" * (runs.DIGESTED_BYTES + 1)})
    return folder


def test_stage_record_lists_its_files_with_sizes_and_small_files_digests(finished):
    files = json.loads((finished.root / "select-tlm" / runs.STAGE_FILE).read_text())["files"]
    assert files["subset.parquet"]["size"] == 5 and "blake2b" in files["subset.parquet"]
    assert files["model/weights.bin"] == {"size": runs.DIGESTED_BYTES + 1}  # large: size only
    assert finished.finished("select-tlm", "f1").reused


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda stage: (stage / "subset.parquet").unlink(), "subset.parquet is missing"),
        (lambda stage: (stage / "subset.parquet").write_bytes(b"other"), "subset.parquet was changed"),
        (lambda stage: (stage / "model/weights.bin").write_bytes(b"x" * 10), "model/weights.bin has 10 bytes"),
        (lambda stage: (stage / runs.STAGE_FILE).write_text('{"finger'), "stage.json is damaged"),
    ],
    ids=["deleted", "changed", "truncated", "record-truncated"],
)
def test_a_damaged_stage_is_recomputed_with_a_warning_or_refused_with_no_recompute(finished, damage, said, caplog):
    damage(finished.root / "select-tlm")
    with pytest.raises(ConfigError, match=f"stage select-tlm is damaged: {said}.*--no-recompute"):
        RunFolder(finished.root, recompute=False).finished("select-tlm", "f1")
    with caplog.at_level(logging.WARNING, logger="iss"):
        assert finished.finished("select-tlm", "f1") is None  # so the engine runs it again
    assert f"is damaged: {said}" in caplog.text and "recomputing it" in caplog.text
    _finish(finished, "select-tlm", {"subset.parquet": b"small"})
    assert finished.finished("select-tlm", "f1").reused


def test_stages_of_older_iss_without_file_lists_are_reused_unchecked_said_once(finished, caplog):
    record_path = finished.root / "select-tlm" / runs.STAGE_FILE
    record = json.loads(record_path.read_text())
    del record["files"]
    record_path.write_text(json.dumps(record))
    (finished.root / "select-tlm" / "subset.parquet").unlink()
    runs._UNCHECKED_WARNED.clear()
    with caplog.at_level(logging.INFO, logger="iss"):
        assert finished.finished("select-tlm", "f1").reused
        assert finished.finished("select-tlm", "f1").reused
    assert caplog.text.count("their files are not checked") == 1


def test_a_kill_between_the_two_renames_of_a_swap_leaves_the_old_stage(finished):
    """The swap moves the old folder aside, then the new one in: killed between the two, the old one comes back."""
    os.replace(finished.root / "select-tlm", finished.root / ".select-tlm.old")
    result = finished.finished("select-tlm", "f1")
    assert result is not None and (result.path / "subset.parquet").read_bytes() == b"small"


def test_a_full_disk_while_a_stage_writes_never_leaves_a_stage_that_is_reused(finished, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs, "write_json", full)  # the stage's record cannot be written
    with pytest.raises(OSError, match="No space left"):
        _finish(finished, "select-tlm", {"subset.parquet": b"new"}, "f2")
    with pytest.raises(OSError, match="No space left"), finished.stage("warmup", "w", {}) as (path, _):
        (path / "model.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.bin"))
    monkeypatch.undo()
    assert finished.finished("select-tlm", "f2") is None and finished.finished("warmup", "w") is None
    assert not (finished.root / "warmup").exists()
    assert finished.finished("select-tlm", "f1").reused  # the old artifact is untouched


def test_a_full_disk_is_one_line_and_exit_2():
    with pytest.raises(typer.Exit) as ended, cli._one_line_errors():
        raise OSError(errno.ENOSPC, "No space left on device", "/run/influence/topk.parquet")
    assert ended.value.exit_code == 2


def test_a_truncated_manifest_is_one_line_for_readers_and_rebuilt_by_the_next_stage(finished, caplog):
    finished.update_manifest([finished.finished("select-tlm", "f1")], {"config": {}})
    manifest = finished.root / runs.MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ConfigError, match=r"manifest.json: the run's manifest is damaged.*rebuilds it"):
        finished.read_manifest()
    with caplog.at_level(logging.WARNING, logger="iss"):
        finished.update_manifest([], {})
    assert "rebuilding it from the stage folders" in caplog.text
    assert set(finished.read_manifest()["stages"]) == {"select-tlm"}


def test_a_second_process_writing_the_same_run_folder_is_refused_in_one_line(finished):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITER, str(finished.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = pytest.raises(ConfigError, match=rf"another iss process \(pid {holder.pid}\) is writing this run")
        with refused, finished.writing():
            pass
    finally:
        holder.kill()
        holder.wait()
    with finished.writing(), finished.writing():  # the holder is gone; reentrant within one process
        pass


HOLD_WRITER = """
import sys, time
from iss.runs.folder import RunFolder
with RunFolder(sys.argv[1]).writing():
    print("holding", flush=True)
    time.sleep(60)
"""


# ------------------------------------------------------------------ a run folder is only what iss made


def test_a_folder_iss_did_not_make_is_refused_before_anything_is_written(tmp_path):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "important.csv").write_text("keep me")
    with pytest.raises(ConfigError, match=r"is not an iss run folder .*holds data"):
        RunFolder(mine)
    assert sorted(p.name for p in mine.rglob("*")) == ["data", "important.csv"]


@pytest.mark.parametrize("where", ["root", "home", "checkout"])
def test_the_root_the_home_folder_and_the_checkout_are_refused(where):
    folder = {"root": Path("/"), "home": Path.home(), "checkout": Path(__file__).resolve().parents[1]}[where]
    with pytest.raises(ConfigError, match="give a folder of its own"):
        RunFolder(folder)


def test_a_run_folder_an_older_iss_made_is_adopted(finished):
    (finished.root / runs.RUN_MARKER).unlink()
    assert RunFolder(finished.root).finished("select-tlm", "f1").reused
    assert (finished.root / runs.RUN_MARKER).is_file()


# ------------------------------------------------------------------ an archive is untrusted input


def _archive(path: Path, header: dict | None, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if header is not None:
            blob = json.dumps(header).encode()
            info = tarfile.TarInfo(runs.EXPORT_FILE)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return path


def _file(name: str, content: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _record(fingerprint: str = "f1") -> tuple[tarfile.TarInfo, bytes]:
    return _file(f"select-tlm/{runs.STAGE_FILE}", json.dumps({"fingerprint": fingerprint}).encode())


ARCHIVE_CASES = ["traversal-stage", "absolute-stage", "no-cache-version", "stages-not-a-mapping", "traversal-member",
                 "absolute-member", "symlink", "hardlink", "unlisted-member", "lying-header", "lying-fingerprint",
                 "no-header"]  # fmt: skip
HEADER = {"iss": "0", "cache_version": runs.CACHE_VERSION, "config": None, "stages": {"select-tlm": "f1"}}


@pytest.mark.parametrize(
    ("header", "members", "said"),
    [
        ({**HEADER, "stages": {"../../a": "f"}}, [], "'../../a' is not a stage name"),
        ({**HEADER, "stages": {"/etc": "f"}}, [], "'/etc' is not a stage name"),
        ({k: v for k, v in HEADER.items() if k != "cache_version"}, [_record()], "cache_version: Field required"),
        ({**HEADER, "stages": []}, [_record()], "stages: Input should be a valid dictionary"),
        (HEADER, [_record(), _file("select-tlm/../../../x")], "is not a plain relative path"),
        (HEADER, [_record(), _file("/tmp/abs")], "is not a plain relative path"),
        (HEADER, [_record(), _link("select-tlm/evil", "/etc/passwd", tarfile.SYMTYPE)], "is a link"),
        (HEADER, [_record(), _link("select-tlm/hard", "/etc/passwd", tarfile.LNKTYPE)], "is a link"),
        (HEADER, [_record(), _file("other/x")], "belongs to no stage"),
        ({**HEADER, "stages": {"select-tlm": "f1", "warmup": "w"}}, [_record()], "lists stages it does not hold"),
        (HEADER, [_record("another")], "does not carry the fingerprint its header lists"),
        (None, [_record()], "not an iss export archive"),
    ],
    ids=ARCHIVE_CASES,
)
def test_an_archive_that_could_write_outside_the_run_folder_is_refused(tmp_path, header, members, said):
    beside = tmp_path / "a"
    beside.write_text("stays")
    run = tmp_path / "runs" / "w"
    archive = _archive(tmp_path / "evil.tar.gz", header, members)
    with pytest.raises(ConfigError, match=re.escape(said)):
        RunFolder(run).import_archive(archive)
    assert beside.read_text() == "stays" and not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.parent != run) == ["a", "evil.tar.gz", "runs", "w"]
    assert not any(p.name.startswith(".import-") or p.name == "select-tlm" for p in run.iterdir())


def test_an_archive_larger_than_allowed_is_refused_before_it_is_extracted(tmp_path):
    """A gzip bomb: 64 MiB of zeros in a few kB; the sizes its members declare are summed before extraction."""
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        blob = json.dumps(HEADER).encode()
        info = tarfile.TarInfo(runs.EXPORT_FILE)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        record, content = _record()
        tar.addfile(record, io.BytesIO(content))
        zeros = tarfile.TarInfo("select-tlm/zeros.bin")
        zeros.size = 64 << 20
        tar.addfile(zeros, io.BytesIO(bytes(zeros.size)))
    assert bomb.stat().st_size < 1 << 20
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="more than the 1048576 allowed"):
        RunFolder(run).import_archive(bomb, max_bytes=1 << 20)
    assert not (run / "select-tlm").exists()


def test_an_honest_archive_round_trips(finished, tmp_path):
    finished.update_manifest([finished.finished("select-tlm", "f1")], {"config": {"seed": 0}})
    archive = tmp_path / "carry.tar.gz"
    assert finished.export(archive) == ["select-tlm"]
    other = RunFolder(tmp_path / "other")
    assert other.import_archive(archive)["imported"] == ["select-tlm"]
    assert other.finished("select-tlm", "f1").reused  # its file list travelled with it and checks out


# ------------------------------------------------------------------ bad inputs: one line, exit 2, early


def _chemprot_copy(folder: Path, edit) -> Path:
    """The first 60 ChemProt rows of each split, train rows passed through ``edit``."""
    folder.mkdir()
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (CHEMPROT / f"{split}.jsonl").open(encoding="utf-8")][:60]
        rows = edit(rows) if split == "train" else rows
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


def _cut_corpus(folder: Path) -> Path:
    whole = gzip.compress(CORPUS.read_bytes()[: 2 << 20])
    (folder / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    return folder / "cut.jsonl.gz"


def _lying_archive(folder: Path) -> Path:
    return _archive(folder / "a.tar.gz", {**HEADER, "stages": {"../../a": "f"}}, [])


# case: (the command's arguments, made in a fresh folder d with the small config c; what its one line says)
BAD_INPUTS = {
    "config-section-is-a-number": (lambda d, c: ["select", _yaml(d, "corpus: 5\n")], "corpus: must be a section"),
    "config-section-is-a-list": (lambda d, c: ["select", _yaml(d, "corpus: [a, b]\n")], "corpus: must be a section"),
    "config-empty": (lambda d, c: ["select", _yaml(d, "")], "the config is empty"),
    "task-label-null": (
        lambda d, c: ["data", c, "--set", f"task.path={_chemprot_copy(d / 'task', _null_label)}"],
        "row 3: no label",
    ),
    "task-one-class": (
        lambda d, c: ["data", c, "--set", f"task.path={_chemprot_copy(d / 'task', _one_class)}"],
        "a task needs two classes or more",
    ),
    "model-path-missing": (lambda d, c: ["select", c, "--set", "model.path=/nonexistent"], "model not found"),
    "corpus-gz-cut-short": (
        lambda d, c: ["tokenizer", c, "--set", f"corpus.paths=[{_cut_corpus(d)}]"],
        "compressed file cut short or corrupt",
    ),
    "run-dir-not-iss": (lambda d, c: ["data", c, "--run-dir", str(_foreign(d))], "is not an iss run folder"),
    "run-dir-root": (lambda d, c: ["data", c, "--run-dir", "/"], "is the file-system root"),
    "archive-traversal": (lambda d, c: ["import", str(_lying_archive(d))], "is not a stage name"),
}


def _yaml(folder: Path, text: str) -> str:
    (folder / "config.yaml").write_text(text, encoding="utf-8")
    return str(folder / "config.yaml")


def _null_label(rows: list[dict]) -> list[dict]:
    return [{**row, "label": None} if i == 2 else row for i, row in enumerate(rows)]


def _one_class(rows: list[dict]) -> list[dict]:
    return [{**row, "label": "INHIBITOR"} for row in rows]


def _foreign(folder: Path) -> Path:
    (folder / "mine" / "data").mkdir(parents=True)
    (folder / "mine" / "data" / "important.csv").write_text("keep me")
    return folder / "mine"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_ends_in_one_line_and_exit_2_before_any_expensive_stage(case, tmp_path, config_file):
    make, said = BAD_INPUTS[case]
    args = make(tmp_path, str(config_file))
    args += [] if "--run-dir" in args else ["--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(cli.app, args if args[0] == "import" else [*args, "--quiet"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and said in lines[0], lines
    run = tmp_path / "run"
    made = [p.name for p in run.iterdir() if not p.name.startswith(".")] if run.exists() else []
    assert set(made) <= {"data", "manifest.json"}, made  # at most the task: no tokenizer, retrieval or training
    if case == "run-dir-not-iss":
        assert (tmp_path / "mine" / "data" / "important.csv").read_text() == "keep me"


def test_a_model_whose_weights_are_cut_short_is_one_config_error(tiny_model, tmp_path):
    tiny_model.lm.save_pretrained(str(tmp_path / "model"))
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="the model's weights cannot be read"):
        TaskModel.load(tmp_path / "model", num_labels=2)


def test_a_docs_budget_the_influence_lists_cannot_reach_is_refused_before_warmup():
    config = IssConfig().with_overrides({"influence.top_k": 2, "selection.budget": "500 docs"})
    check_reach(config, task_samples=250, docs=500)  # 250 x 2 = 500: reachable
    with pytest.raises(BudgetError, match=r"more than the influence lists can reach .* raise influence.top_k"):
        check_reach(config, task_samples=249, docs=500)


def test_report_refuses_a_run_folder_whose_subset_was_deleted_instead_of_leaving_the_method_out(finished, tmp_path):
    finished.update_manifest([finished.finished("select-tlm", "f1")], {"config": {}})
    (finished.root / "select-tlm" / "subset.parquet").unlink()
    with pytest.raises(ConfigError, match=r"stage select-tlm is damaged: subset\.parquet is missing"):
        write_report(finished.root)
    mine = tmp_path / "mine"
    (mine / "keep.txt").parent.mkdir()
    (mine / "keep.txt").write_text("keep me")
    _finish(finished, "select-tlm", {"subset.parquet": b"small"})
    with pytest.raises(ConfigError, match="holds no report"):  # --out never replaces a folder of the user's
        write_report(finished.root, mine)
    assert (mine / "keep.txt").read_text() == "keep me"

"""The run folder: a stage runs once per fingerprint, is reused after, and says when older code made it."""

from __future__ import annotations

import json
import logging
import os

import pytest

from iss.errors import ConfigError
from iss.runs import folder as runs
from iss.runs.folder import RunFolder, fingerprint


def _run_stage(folder: RunFolder, name: str, stage_fingerprint: str, calls: list[str]) -> None:
    with folder.stage(name, stage_fingerprint, {"k": 1}) as (path, summary):
        calls.append(name)
        (path / "out.txt").write_text("done", encoding="utf-8")
        summary["rows"] = 3


def test_finished_stage_is_reused_only_under_its_fingerprint(tmp_path):
    folder, calls = RunFolder(tmp_path), []
    assert folder.finished("select", "aaa") is None
    _run_stage(folder, "select", "aaa", calls)
    reused = folder.finished("select", "aaa")
    assert reused is not None and reused.reused and reused.summary["rows"] == 3
    assert (reused.path / "out.txt").read_text(encoding="utf-8") == "done"
    assert folder.finished("select", "bbb") is None  # another config: not reused
    _run_stage(folder, "select", "bbb", calls)
    assert calls == ["select", "select"] and folder.finished("select", "aaa") is None


def test_killed_stage_leaves_nothing_that_looks_finished(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(KeyboardInterrupt), folder.stage("influence", "aaa", {}) as (path, _):
        (path / "partial.txt").write_text("half", encoding="utf-8")
        raise KeyboardInterrupt
    assert folder.finished("influence", "aaa") is None and not (tmp_path / "influence").exists()


def test_an_ablation_reuses_linked_stages_and_never_writes_into_the_base_run(tmp_path):
    base, calls = RunFolder(tmp_path / "base"), []
    _run_stage(base, "warmup", "w1", calls)
    _run_stage(base, "finetune", "f1", calls)
    base.update_manifest([base.finished("warmup", "w1"), base.finished("finetune", "f1")], {})
    killed = tmp_path / "base" / ".pretrain.tmp"  # a stage killed just before its rename is not brought along
    killed.mkdir()
    (killed / runs.STAGE_FILE).write_text(json.dumps({"fingerprint": "p1"}), encoding="utf-8")

    ablation = RunFolder(tmp_path / "ablation")
    assert ablation.link_stages_from(tmp_path / "base") == ["finetune", "warmup"]
    assert ablation.finished("warmup", "w1").reused  # same fingerprint: reused, not recomputed
    assert (tmp_path / "ablation" / "warmup" / "out.txt").samefile(tmp_path / "base" / "warmup" / "out.txt")
    assert not (tmp_path / "ablation" / ".pretrain.tmp").exists()

    assert ablation.finished("finetune", "f2") is None  # the ablation's change reaches fine-tuning only
    with ablation.stage("finetune", "f2", {}) as (path, _):
        (path / "out.txt").write_text("ablated", encoding="utf-8")
    assert (tmp_path / "base" / "finetune" / "out.txt").read_text(encoding="utf-8") == "done"
    assert base.finished("finetune", "f1") is not None and ablation.finished("finetune", "f2") is not None
    assert ablation.link_stages_from(tmp_path / "base") == []  # what the ablation has is kept
    with pytest.raises(ConfigError, match="not an iss run folder"):
        ablation.link_stages_from(tmp_path / "nowhere")


def test_fingerprints_change_with_the_cache_version(monkeypatch):
    before = fingerprint("select", {"k": 1})
    monkeypatch.setattr(runs, "CACHE_VERSION", "99.0")
    assert fingerprint("select", {"k": 1}) != before


def test_reusing_an_artifact_of_another_version_says_so(tmp_path, caplog):
    folder = RunFolder(tmp_path)
    _run_stage(folder, "warmup", "aaa", [])
    record_path = tmp_path / "warmup" / runs.STAGE_FILE
    record = json.loads(record_path.read_text(encoding="utf-8"))
    assert record["versions"]["iss"] == runs.__version__
    record["versions"]["iss"] = "0.0.1"
    record_path.write_text(json.dumps(record), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="iss"):
        assert folder.finished("warmup", "aaa") is not None
    assert "made by iss 0.0.1" in caplog.text


def test_input_signature_follows_the_bytes_not_the_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ISS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "task"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    before = runs.file_signature([str(data)])
    os.utime(data / "train.jsonl", ns=(1, 1))  # a re-synced copy: same bytes, new mtime
    assert runs.file_signature([str(data)]) == before
    assert len(list((tmp_path / "cache" / "file-hashes").iterdir())) == 2  # hashed once per (path, size, mtime, inode)
    (data / "train.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")  # same size, new bytes
    after = runs.file_signature([str(data)])
    assert after[0][1] == before[0][1] and after != before


def test_a_cached_digest_is_used_while_the_file_is_unchanged(tmp_path):
    file, cache = tmp_path / "corpus.jsonl", tmp_path / "hashes"
    file.write_bytes(b"x" * 10)
    digest = runs.content_digest(file, cache)
    (entry,) = cache.iterdir()
    entry.write_text("from-cache", encoding="utf-8")
    assert runs.content_digest(file, cache) == "from-cache" != digest  # read from the cache, not rehashed


def test_require_shared_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    from _pytest.outcomes import Failed, Skipped

    from . import conftest

    monkeypatch.setattr(conftest, "CORPUS", tmp_path / "absent.jsonl")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="CI=true"):
        conftest.require_shared()
    monkeypatch.delenv("CI")
    with pytest.raises(Skipped, match="shared data not found"):
        conftest.require_shared()

"""kill -9 in the middle of retrieval, influence and pretraining; the rerun resumes and ends where an
uninterrupted run ends (same hits, same top-k lists, same weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from .conftest import iss_command

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

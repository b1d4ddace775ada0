"""Data-parallel training: shares of a global batch add up to its gradient, and `accelerate launch` with two
CPU processes (gloo: `--multi_gpu` on a machine without GPUs) pretrains and fine-tunes as one process does."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from iss.config.schema import ModelConfig
from iss.modeling.batches import labelled_batch, language_batch, per_sample_lm_loss, per_sample_task_loss
from iss.modeling.model import TaskModel
from iss.runs.processes import Processes

from .conftest import iss_command
from .test_faults import _kill_when
from .test_pipeline import _small_config


def _gradients(model: TaskModel, tokenizer, texts: list[str], group: Processes, total_rows: np.ndarray) -> dict:
    model.zero_grad(set_to_none=True)
    rows = group.share(total_rows)
    batch = labelled_batch(tokenizer, [texts[i] for i in rows], np.zeros(len(rows), np.int64), 48)
    batch = language_batch(model, tokenizer, batch, 0.15, 0, rows)
    loss = group.mean(per_sample_lm_loss(model, batch), total_rows)
    loss = loss + group.mean(per_sample_task_loss(model, batch), total_rows)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_the_shares_of_a_global_batch_sum_to_its_gradient(tokenizer, corpus_texts):
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=48, dropout=0)
    model = TaskModel.from_scratch(config, tokenizer, num_labels=3)
    rows = np.array([5, 17, 2, 40, 33, 8, 21])  # 7 rows: shares of 4 and 3
    whole = _gradients(model, tokenizer, corpus_texts, Processes(), rows)
    shares = [_gradients(model, tokenizer, corpus_texts, Processes(rank, 2), rows) for rank in (0, 1)]
    for name, gradient in whole.items():
        torch.testing.assert_close(shares[0][name] + shares[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    # An epoch's last batch may hold fewer rows than there are processes: the ones without rows run a stand-in
    # row at weight 0, so the shares still add up to the batch's gradient (and every process runs the collectives).
    single = np.array([11])
    whole = _gradients(model, tokenizer, corpus_texts, Processes(), single)
    shares = [_gradients(model, tokenizer, corpus_texts, Processes(rank, 2), single) for rank in (0, 1)]
    assert all(torch.count_nonzero(g) == 0 for g in shares[1].values())
    for name, gradient in whole.items():
        torch.testing.assert_close(shares[0][name] + shares[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(folder) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _tiny_run_config(tmp_path, tokenizer, pretrain: dict) -> Path:
    """A config file for a tiny run (dropout off: each process draws its own dropout masks)."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "one",
        task={"max_test": 16},
        tokenizer={"path": str(tmp_path / "tok")},
        model={"dropout": 0.0},
        pretrain={"batch_size": 8, "rho1": 3, "packing": True, **pretrain},
        finetune={"epochs": 2, "batch_size": 8, "seeds": [0]},
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return config_file


def _launch_two(*args: str) -> subprocess.CompletedProcess:
    """``iss ARGS`` in two processes through accelerate's launcher (gloo on this CPU machine)."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "iss", *args,
    ]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _copy_selection(source: Path, target: Path) -> None:
    """The same selected subset for both runs: a copy of the run folder without its training stages."""
    training = shutil.ignore_patterns("pretrain-*", "finetune-*", ".pretrain-*", "manifest.json")
    shutil.copytree(source, target, ignore=training)


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_processes_pretrain_and_fine_tune_as_one_does(tmp_path, tokenizer):
    config_file = _tiny_run_config(tmp_path, tokenizer, {"steps": 6, "save_every": 2})
    single = iss_command("finetune", str(config_file), "--quiet")
    assert single.returncode == 0, single.stderr
    two = tmp_path / "two"
    _copy_selection(tmp_path / "one", two)
    _launch_two("finetune", str(config_file), "--run-dir", str(two), "--quiet")
    _assert_same_weights(tmp_path / "one/pretrain-iss-seed0/model", two / "pretrain-iss-seed0/model")
    scores = [yaml.safe_load((run / "finetune-iss-seed0/scores.json").read_text()) for run in (tmp_path / "one", two)]
    assert scores[0]["dev"] == pytest.approx(scores[1]["dev"], abs=1e-6)
    assert scores[0]["task_loss"] == pytest.approx(scores[1]["task_loss"], rel=1e-3)
    assert not list(two.glob(".*.tmp"))  # the second process wrote nothing into the run folder


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_two_processes(tmp_path, tokenizer):
    config_file = _tiny_run_config(tmp_path, tokenizer, {"steps": 40, "save_every": 2})
    assert iss_command("pretrain", str(config_file), "--quiet").returncode == 0
    resumed = tmp_path / "resumed"
    _copy_selection(tmp_path / "one", resumed)
    _kill_when(resumed / ".pretrain-iss-seed0.work" / "checkpoint" / "state.pt",
               ["pretrain", str(config_file), "--run-dir", str(resumed), "--quiet"])  # fmt: skip
    assert not (resumed / "pretrain-iss-seed0").exists()
    log = _launch_two("pretrain", str(config_file), "--run-dir", str(resumed)).stderr
    assert "resuming at step" in log
    _assert_same_weights(tmp_path / "one/pretrain-iss-seed0/model", resumed / "pretrain-iss-seed0/model")

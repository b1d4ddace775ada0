"""Loading never runs code from a checkpoint or a config unless the user says so."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from iss.config.io import load_config
from iss.config.schema import OptimizerConfig
from iss.modeling.model import TaskModel
from iss.training.loop import LoopSettings, train_loop

SRC = Path(__file__).resolve().parents[1] / "src" / "iss"

EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("code-ran").write_text("yes")
from transformers import BertConfig as EvilConfig, BertForMaskedLM as EvilModel
"""


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((path.name, keywords.get("weights_only")))
    assert calls, "expected the checkpoint loaders to use torch.load"
    assert all(value == "True" for _, value in calls), calls


def test_checkpoint_with_custom_code_is_refused_unless_trusted(tiny_model, tmp_path):
    folder = tmp_path / "model"
    tiny_model.lm.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForMaskedLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(EVIL_MODULE)
    # a known architecture: the library's own class is used and the shipped code is ignored
    assert type(TaskModel.load(folder, num_labels=2).lm).__name__ == "BertForMaskedLM"
    # an architecture only the shipped code defines: refused
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "evil-bert"}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        TaskModel.load(folder, num_labels=2)
    assert not list(tmp_path.rglob("code-ran"))  # the shipped module was never imported


def test_pickled_weights_are_refused_by_the_checkpoint_loader(tmp_path):
    """A resumed training loop loads its checkpoint's state without running pickled code in it."""
    model = torch.nn.Linear(2, 2)
    settings = LoopSettings(OptimizerConfig(), total_steps=4, save_every=2)

    def step_loss(step: int, micro: int):
        return model(torch.ones(1, 2)).sum(), {}

    checkpoint = tmp_path / "checkpoint"
    train_loop(model, LoopSettings(OptimizerConfig(), total_steps=2, save_every=2), step_loss, 0, checkpoint, False)
    assert (checkpoint / "state.pt").is_file()

    class Payload:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("yes",))

    torch.save({"step": 1, "payload": Payload()}, checkpoint / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        train_loop(model, settings, step_loss, 0, checkpoint, False)
    assert not (tmp_path / "pwned").exists()


def test_config_files_are_parsed_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(f"run_dir: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n", encoding="utf-8")
    with pytest.raises(Exception, match="python/object"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()

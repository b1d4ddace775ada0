"""Stage fingerprints are a contract: a refactor that changes one makes every run folder on disk recompute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_TRAINING, require_shared
from .fingerprint_walk import REPO, stage_fingerprints

GOLDEN = Path(__file__).parent / "golden" / "fingerprints.json"


@pytest.mark.parametrize("config", list(json.loads(GOLDEN.read_text(encoding="utf-8"))))
def test_shipped_configs_keep_their_stage_fingerprints(config, tmp_path, monkeypatch):
    """Every stage of a shipped config (ISS default, gate, causal) has the fingerprint recorded before the stage
    redesign (issue 42). Regenerate the golden file only with a deliberate cache break (a version bump)."""
    require_shared()
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[config]
    assert stage_fingerprints(REPO / config, tmp_path / "run", monkeypatch) == golden


def overrides_of(arguments: list[str]) -> dict:
    """``--set key=value`` command-line arguments as the overrides dict the CLI makes of them."""
    pairs = (item.split("=", 1) for item in arguments if item != "--set")
    return {key: yaml.safe_load(value) for key, value in pairs}


def assert_walk_matches_run(config_file: Path, run_dir: Path, monkeypatch) -> None:
    """The fingerprint walk is faithful: on a run folder `iss run` made, it names the same stages with the same
    fingerprints as the manifest (so the golden file above is about real run folders)."""
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    walked = stage_fingerprints(config_file, run_dir, monkeypatch, overrides_of(TINY_TRAINING), portable=False)
    recorded = {name: stage["fingerprint"] for name, stage in manifest["stages"].items() if name in walked}
    assert len(walked) >= 15 and recorded == walked

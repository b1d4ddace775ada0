"""Every stage fingerprint a config's ``iss run`` would make, computed without running a stage body.

The engine is replaced by one that records each stage's fingerprint and returns a result with an empty summary,
so the walk reaches every stage of the run plan in the order `iss run` does. Absolute paths (the checkout and
``../shared`` differ between machines) are written as ``<repo>`` and ``<shared>`` before hashing, so the golden file
holds on any clone; on one machine a changed fingerprint here is a changed fingerprint of a real run folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from iss.config.io import load_config
from iss.pipeline.run import Pipeline
from iss.runs import engine
from iss.runs.folder import StageResult, fingerprint
from iss.stages.plan import RunPlan

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared").resolve()


def _portable(value: Any) -> Any:
    text = json.dumps(value, sort_keys=True, default=str)
    text = text.replace(str(SHARED), "<shared>").replace(str(REPO), "<repo>")
    return json.loads(text)


class _RecordingEngine:
    """A stand-in for :class:`iss.engine.StageEngine` that fingerprints stages and runs nothing."""

    recorded: ClassVar[dict[str, str]] = {}
    portable = True

    def __init__(self, run, results, numerics=None) -> None:
        self.results = results

    def run(self, name, parts, body, data_parallel=False, manifest=None) -> StageResult:
        stage_fingerprint = fingerprint(name, _portable(parts) if self.portable else parts)
        self.recorded[name] = stage_fingerprint
        summary: dict[str, Any] = defaultdict(int)
        result = StageResult(name, Path("/nonexistent") / name, stage_fingerprint, summary)
        self.results[name] = result
        return result


def stage_fingerprints(
    config_path: Path, run_dir: Path, monkeypatch, overrides: dict | None = None, portable: bool = True
) -> dict[str, str]:
    """Stage name -> fingerprint of every stage of ``config_path``'s run (selection, pretraining, fine-tuning);
    ``portable=False`` keeps absolute paths, as a real run on this machine hashes them."""
    config = load_config(config_path).with_overrides({**(overrides or {}), "run_dir": str(run_dir)})
    _RecordingEngine.recorded, _RecordingEngine.portable = {}, portable
    monkeypatch.setattr(engine, "StageEngine", _RecordingEngine)
    monkeypatch.setattr("iss.stages.context.StageEngine", _RecordingEngine)
    monkeypatch.setattr("iss.stages.select.preflight", lambda context, budgets=None: None)  # reads the pool
    pipeline = Pipeline(config, show_progress=False)
    for run in RunPlan(config).runs:
        variant = pipeline.method_variant(run.method, run.budget, run.tag)
        variant.finetune(run.seed, pretrained=run.pretrained, pretrain_seed=run.pretrain_seed)
    return dict(sorted(_RecordingEngine.recorded.items()))

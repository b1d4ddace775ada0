"""Carry a long benchmark run's finished results across machines that keep only the git checkout.

Usage: python benchmarks/carry.py out RUN_DIR   (copy finished results into benchmarks/results/carry/, commit it)
       python benchmarks/carry.py in RUN_DIR    (bring them back before the run resumes)
       python benchmarks/carry.py check RUN_DIR (recomputed stages must match the carried summaries)

A run folder (``runs/``) is not committed: its models are too large. A fine-tune or mechanism-check stage leaves
only small files (``stage.json``, ``scores.json``), and its fingerprint is made from the config, not from its
upstream files, so a machine that recomputes the upstream stages (mlm-head, warm-up, influence, pretraining)
reuses the carried results and runs only what is left. That is sound only if the recomputed upstream stages
are the ones the carried results were made from: ``out`` also records every stage's summary, and ``check``
fails if a stage recomputed under the same fingerprint has a different summary: counts (documents, tokens,
steps), names and flags must repeat exactly, measured floats (losses, F1) to within ``FLOAT_TOLERANCE``, since
the same computation on another CPU (other BLAS and bf16 kernels) agrees to about 1e-5, not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

CARRY = Path(__file__).resolve().parent / "results" / "carry"
CARRIED = ("finetune-", "mechanism-")  # stages whose files are results (a few KiB), not models
SUMMARIES = "summaries.json"
MANIFEST = "manifest.json"
FLOAT_TOLERANCE = 1e-3  # relative, and absolute below 1 (F1, accuracy): float noise, not another computation


def carry_dir(run_dir: Path, root: Path = CARRY) -> Path:
    """Where a run folder's results are carried: its path under ``runs/``, e.g. evidence/further/chemprot."""
    parts = run_dir.resolve().parts
    inside = parts[parts.index("runs") + 1 :] if "runs" in parts else parts[-2:]
    return root.joinpath(*inside)


def carried_stages(run_dir: Path) -> list[Path]:
    """The run's finished stage folders whose files are results, not models."""
    return sorted(
        folder for folder in run_dir.iterdir() if folder.name.startswith(CARRIED) and (folder / "stage.json").is_file()
    )


def stage_summaries(run_dir: Path) -> dict[str, dict]:
    """Every stage's fingerprint and summary in the run's manifest, less its timing (which differs from machine to
    machine)."""
    manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    return {
        name: {
            "fingerprint": stage["fingerprint"],
            "summary": {key: value for key, value in stage.get("summary", {}).items() if key != "seconds"},
        }
        for name, stage in manifest["stages"].items()
    }


def _fingerprint(folder: Path) -> str | None:
    record = folder / "stage.json"
    return json.loads(record.read_text(encoding="utf-8"))["fingerprint"] if record.is_file() else None


def carry_out(run_dir: Path, root: Path = CARRY) -> list[str]:
    """Copy the run's result stages and every stage's summary into the carry folder; the names copied. Refuses
    while a recomputed stage differs from its carried summary (see :func:`mismatches`)."""
    check(run_dir, root)
    target = carry_dir(run_dir, root)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in carried_stages(run_dir):
        if _fingerprint(target / folder.name) != _fingerprint(folder):  # new, or remade under a changed config
            shutil.rmtree(target / folder.name, ignore_errors=True)
            shutil.copytree(folder, target / folder.name)
            copied.append(folder.name)
    recorded = recorded_summaries(target)
    (target / SUMMARIES).write_text(
        json.dumps(recorded | stage_summaries(run_dir), indent=1, sort_keys=True), encoding="utf-8"
    )
    return copied


def carry_in(run_dir: Path, root: Path = CARRY) -> list[str]:
    """Copy carried result stages the run folder lacks into it; the names copied."""
    source = carry_dir(run_dir, root)
    if not source.is_dir():
        return []
    run_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in carried_stages(source):
        if not (run_dir / folder.name).exists():
            shutil.copytree(folder, run_dir / folder.name)
            copied.append(folder.name)
    return copied


def recorded_summaries(target: Path) -> dict[str, dict]:
    path = target / SUMMARIES
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def deviation(carried: Any, recomputed: Any) -> float:
    """The largest difference between two summaries' floats, relative (absolute below 1); ``inf`` where a count,
    a name, a flag or the shape differs, since those repeat exactly when the computation does."""
    if isinstance(carried, dict) and isinstance(recomputed, dict):
        if carried.keys() != recomputed.keys():
            return math.inf
        return max((deviation(carried[key], recomputed[key]) for key in carried), default=0.0)
    if isinstance(carried, list) and isinstance(recomputed, list):
        if len(carried) != len(recomputed):
            return math.inf
        return max((deviation(a, b) for a, b in zip(carried, recomputed, strict=True)), default=0.0)
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (carried, recomputed))
    if numbers and (isinstance(carried, float) or isinstance(recomputed, float)):
        return abs(carried - recomputed) / max(abs(carried), abs(recomputed), 1.0)
    return 0.0 if carried == recomputed else math.inf


def deviations(run_dir: Path, root: Path = CARRY) -> dict[str, float]:
    """For each stage recomputed under a carried stage's fingerprint, how far its summary is from the carried one
    (:func:`deviation`). A stage remade under a changed config has another fingerprint, and its carried results
    are not reused anyway."""
    recorded = recorded_summaries(carry_dir(run_dir, root))
    current = stage_summaries(run_dir)
    return {
        name: deviation(recorded[name]["summary"], current[name]["summary"])
        for name in sorted(recorded.keys() & current.keys())
        if recorded[name]["fingerprint"] == current[name]["fingerprint"]
    }


def mismatches(run_dir: Path, root: Path = CARRY) -> list[str]:
    """Recomputed stages whose summaries are beyond float noise of the carried ones: the computation did not
    repeat, so carried results built on them are not results of this run's upstream stages."""
    return [name for name, off in deviations(run_dir, root).items() if off > FLOAT_TOLERANCE]


def check(run_dir: Path, root: Path = CARRY) -> None:
    """Stop if a recomputed stage differs from its carried summary."""
    if differ := mismatches(run_dir, root):
        raise SystemExit(f"recomputed stages differ from the carried summaries: {', '.join(differ)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["out", "in", "check"])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    if args.action == "out":
        print(f"carried out: {len(carry_out(args.run_dir))} new stages -> {carry_dir(args.run_dir)}")
    elif args.action == "in":
        print(f"carried in: {len(carry_in(args.run_dir))} stages")
    else:
        check(args.run_dir)
        largest = max(deviations(args.run_dir).values(), default=0.0)
        print(f"carried summaries match the run's (largest float difference {largest:.1e})")


if __name__ == "__main__":
    main()

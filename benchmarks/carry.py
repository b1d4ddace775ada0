"""Carry a long benchmark run's finished results across machines that keep only the git checkout.

Usage: python benchmarks/carry.py out RUN_DIR   (copy finished results into benchmarks/results/carry/, commit it)
       python benchmarks/carry.py in RUN_DIR    (bring them back before the run resumes)
       python benchmarks/carry.py check RUN_DIR (recomputed stages must match the carried summaries)
       python benchmarks/carry.py drop RUN_DIR  (forget the carried results a mismatch makes stale: the run
                                                 computes them again)

A run folder (``runs/``) is not committed: its models are too large. A fine-tune or mechanism-check stage leaves
only small files (``stage.json``, ``scores.json``), and its fingerprint is made from the config, not from its
upstream files, so a machine that recomputes the upstream stages (mlm-head, warm-up, influence, pretraining)
reuses the carried results and runs only what is left. Selections travel too (about 1 MB each: the subset's
ids and text): ISS's top documents hang on the warm-up's last digits (a warm-up repeated on another CPU swapped
a few of ChemProt's 1,000), so a carried selection pins the subset its carried fine-tunes were pretrained on.

That is sound only if the recomputed upstream stages are the ones the carried results were made from: ``out``
also records every stage's summary, and ``check`` fails if a carried result was built on a stage recomputed
under the same fingerprint with a different summary: counts (documents, tokens, steps), names and flags must
repeat exactly, measured floats (losses, F1) to within ``FLOAT_TOLERANCE``, since the same computation on
another CPU (other BLAS and bf16 kernels) agrees to about 1e-5, not bit for bit. What a result was built on is
read from the fingerprints its ``stage.json`` names.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

CARRY = Path(__file__).resolve().parent / "results" / "carry"
CARRIED = ("select-", "finetune-", "mechanism-")  # stages whose files are results (KiB to 1 MB), not models
SUMMARIES = "summaries.json"
MANIFEST = "manifest.json"
FLOAT_TOLERANCE = 1e-3  # relative, and absolute below 1 (F1, accuracy): float noise, not another computation
FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # how a stage's recorded config names the stages it was computed from


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


def _record(folder: Path) -> dict | None:
    path = folder / "stage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def carry_out(run_dir: Path, root: Path = CARRY) -> list[str]:
    """Copy the run's result stages and every stage's summary into the carry folder; the names copied. Refuses
    while a carried result is stale (see :func:`stale_results`)."""
    check(run_dir, root)
    target = carry_dir(run_dir, root)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in carried_stages(run_dir):
        if _record(target / folder.name) != _record(folder):  # new, or made again here
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


def _fingerprints_in(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_fingerprints_in, value.values()))
    if isinstance(value, list):
        return set().union(*map(_fingerprints_in, value))
    return {value} if isinstance(value, str) and FINGERPRINT.fullmatch(value) else set()


def _records(run_dir: Path) -> dict[str, dict]:
    """Every finished stage's ``stage.json`` in the run folder, by stage name."""
    return {folder.name: record for folder in run_dir.iterdir() if (record := _record(folder)) is not None}


def built_on(run_dir: Path, name: str, records: dict[str, dict] | None = None) -> set[str] | None:
    """Every stage of the run folder that stage ``name`` was computed from, followed through the fingerprints each
    ``stage.json`` names; None while one of them is not in the folder (not recomputed yet: it may be any).
    ``records`` (:func:`_records`) saves reading the folder again when asking for many stages."""
    records = _records(run_dir) if records is None else records
    by_fingerprint = {record["fingerprint"]: stage for stage, record in records.items()}
    found: set[str] = set()
    todo = [name]
    while todo:
        for upstream_fingerprint in _fingerprints_in(records[todo.pop()].get("config", {})):
            upstream = by_fingerprint.get(upstream_fingerprint)
            if upstream is None:
                return None
            if upstream not in found:
                found.add(upstream)
                todo.append(upstream)
    return found


def stale_results(run_dir: Path, root: Path = CARRY) -> dict[str, list[str]]:
    """Carried results in the run folder built on a recomputed stage beyond float noise of its carried summary,
    each with those stages: the computation did not repeat, so they are not results of this run's upstream
    stages. A result whose upstream is not all recomputed yet counts as built on every such stage."""
    off = sorted(name for name, distance in deviations(run_dir, root).items() if distance > FLOAT_TOLERANCE)
    if not off:
        return {}
    source = carry_dir(run_dir, root)
    records = _records(run_dir)
    stale = {}
    for folder in carried_stages(run_dir):
        if records[folder.name] != _record(source / folder.name):  # made here, not carried
            continue
        upstream = built_on(run_dir, folder.name, records)
        if on := [name for name in off if upstream is None or name in upstream]:
            stale[folder.name] = on
    return stale


def _stale_upstream(stale: dict[str, list[str]]) -> list[str]:
    return sorted({name for names in stale.values() for name in names})


def mismatches(run_dir: Path, root: Path = CARRY) -> list[str]:
    """Recomputed stages that differ from their carried summaries and that a carried result was built on."""
    return _stale_upstream(stale_results(run_dir, root))


def check(run_dir: Path, root: Path = CARRY) -> None:
    """Stop if a carried result was built on a stage that did not repeat here."""
    if stale := stale_results(run_dir, root):
        raise SystemExit(
            f"recomputed stages differ from the carried summaries: {', '.join(_stale_upstream(stale))}; "
            f"carried results built on them: {', '.join(stale)} "
            f"(`python benchmarks/carry.py drop {run_dir}` forgets them, and the run computes them again)"
        )


def drop(run_dir: Path, root: Path = CARRY) -> list[str]:
    """Remove the stale carried results (:func:`stale_results`) from the run folder and the carry folder, so the
    run computes them again on this machine's upstream stages; the names removed."""
    stale = list(stale_results(run_dir, root))
    for name in stale:
        shutil.rmtree(run_dir / name)
        shutil.rmtree(carry_dir(run_dir, root) / name, ignore_errors=True)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["out", "in", "check", "drop"])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    if args.action == "out":
        print(f"carried out: {len(carry_out(args.run_dir))} new stages -> {carry_dir(args.run_dir)}")
    elif args.action == "in":
        print(f"carried in: {len(carry_in(args.run_dir))} stages")
    elif args.action == "drop":
        print(f"dropped: {', '.join(drop(args.run_dir)) or 'nothing'}")
    else:
        check(args.run_dir)
        distances = deviations(args.run_dir)
        noise = max((d for d in distances.values() if d <= FLOAT_TOLERANCE), default=0.0)
        remade = [name for name, d in distances.items() if d > FLOAT_TOLERANCE]
        print(f"no carried result is stale; recomputed stages repeat to {noise:.1e}", end="")
        print(f"; made otherwise here, with no carried result built on them: {', '.join(remade)}" if remade else "")


if __name__ == "__main__":
    main()

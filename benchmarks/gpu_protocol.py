"""The GPU protocol of issue 28: one config's whole comparison inside a time budget on one accelerator.

Usage: python benchmarks/gpu_protocol.py CONFIG [--minutes 8] [--run-dir DIR] [--dry-run] [--results DIR]

Prints the estimate first (iss.estimate, probed on this machine's device), then, if it is over ``--minutes``,
lowers ``pretrain.steps`` so that the estimate fits and says so; runs ``iss run`` in this process and writes
benchmarks/results/gpu_protocol_<task>.json: the device, the estimate before and after fitting, the measured wall
time per stage kind, the results table and the paired differences with their positive control. ``--dry-run`` runs
the same path at toy scale on any machine (a tiny model, a slice of the corpus, a few steps) and writes the JSON
under the run folder instead: the check that the script works before device time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from iss.config.io import load_config
from iss.config.schema import IssConfig
from iss.pipeline.estimate import ESTIMATE_FILE, estimate_run
from iss.pipeline.run import Pipeline
from iss.runs.folder import write_json
from iss.stages.plan import RunPlan

RESULTS = Path(__file__).resolve().parent / "results"
DRY_RUN = {
    "corpus.max_docs": 3000,
    "task.max_train": 64,
    "task.max_dev": 32,
    "task.max_test": 32,
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.intermediate_size": 64,
    "model.max_length": 48,
    "warmup.epochs": 1,
    "influence.top_k": 100,
    "selection.budget": "3000 tokens",
    "pretrain.steps": 6,
    "pretrain.batch_size": 8,
    "pretrain.rho1": 3,
    "pretrain.save_every": 0,
    "finetune.epochs": 1,
    "finetune.seeds": [0, 1],
    "precision": "fp32",
}


def fit_steps(config: IssConfig, estimate, minutes: float) -> int:
    """Pretraining steps that bring the estimate within ``minutes`` (pretraining is what scales with them)."""
    budget, pretraining = minutes * 60, estimate.seconds.get("pretraining", 0.0)
    fixed = estimate.total - pretraining
    if estimate.total <= budget or pretraining <= 0:
        return config.pretrain.steps
    if fixed >= budget:
        raise SystemExit(
            f"the stages other than pretraining are estimated at {fixed / 60:.1f} min, over the {minutes:g}-minute "
            "budget: lower the methods, seeds or fine-tuning epochs"
        )
    return max(1, math.floor(config.pretrain.steps * (budget - fixed) / pretraining))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--minutes", type=float, default=8.0, help="Time budget for the whole run.")
    parser.add_argument("--run-dir", type=Path, help="Run folder (default: the config's).")
    parser.add_argument("--dry-run", action="store_true", help="Toy scale on any machine (CPU), same code path.")
    parser.add_argument(
        "--results", type=Path, help="Folder of the JSON (default: benchmarks/results; the run folder with --dry-run)."
    )
    args = parser.parse_args()
    overrides: dict = dict(DRY_RUN) if args.dry_run else {}
    if args.run_dir:
        overrides["run_dir"] = str(args.run_dir)
    config = load_config(args.config).with_overrides(overrides)
    start = time.perf_counter()
    pipeline = Pipeline(config, show_progress=not args.dry_run)
    device = str(pipeline.device)
    if pipeline.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(pipeline.device)})"
    first = estimate_run(pipeline)  # before any stage
    print(f"device {device}; {first.describe()}", flush=True)
    probes = first.seconds_per_token
    pooled = estimate_run(pipeline, with_pool=True, seconds_per_token=probes)  # the budget is fitted on the real pool
    print(pooled.describe(), flush=True)
    steps, final = fit_steps(config, pooled, args.minutes), pooled
    if steps != config.pretrain.steps:
        print(f"over the {args.minutes:g}-minute budget: pretrain.steps {config.pretrain.steps} -> {steps}", flush=True)
        config = config.with_overrides({"pretrain.steps": steps})
        pipeline = Pipeline(config, show_progress=not args.dry_run)
        final = estimate_run(pipeline, with_pool=True, seconds_per_token=probes)
        print(f"fitted: {final.describe()}", flush=True)
    final.save(pipeline.run.root / ESTIMATE_FILE)
    results = json.loads((pipeline.run_all().path / "results.json").read_text(encoding="utf-8"))
    manifest = json.loads((pipeline.run.root / "manifest.json").read_text(encoding="utf-8"))
    control = next((r for r in results["differences"] if r["comparison"] == "tlm - random-corpus"), None)
    record = {
        "config": str(args.config),
        "dry_run": args.dry_run,
        "device": device,
        "minutes_budget": args.minutes,
        "pretrain_steps": steps,
        "estimate_first": first.total,
        "estimate": final.total,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "seconds_by_kind": final.against(manifest, RunPlan(config)),
        "positive_control": control,
        **results,
    }
    folder = args.results or (pipeline.run.root if args.dry_run else RESULTS)
    out = folder / f"gpu_protocol_{config.task.name}.json"
    write_json(out, record)
    print(f"wrote {out} ({record['wall_seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()

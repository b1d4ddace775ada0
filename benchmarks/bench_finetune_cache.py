"""Fine-tuning with the frozen lower blocks cached (``finetune.cache_frozen_blocks``) vs run again at every step.

Usage: python benchmarks/bench_finetune_cache.py [--config configs/further/acl_arc.yaml] [--epochs 3] [--repeats 2]
Fine-tunes the config's starting model (no pretraining: the shared encoder with a fresh head) on its task, cached
and plain in turn (A B A B ...), each in a fresh run folder; prints a Markdown table and writes
benchmarks/results/finetune_cache_<task>.json. The two differ in more than speed: the cached run has no dropout in
the frozen blocks, so its scores are shown too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from iss.comparison.tables import markdown_rows
from iss.config.io import load_config
from iss.pipeline.run import Pipeline

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fine_tune_once(config_path: Path, cache: bool, epochs: int, seed: int) -> dict:
    """One fine-tuning stage in a fresh run folder; its own timing from the stage record."""
    with tempfile.TemporaryDirectory() as folder:
        overrides = {
            "run_dir": folder,
            "finetune.cache_frozen_blocks": cache,
            "finetune.epochs": epochs,
            "finetune.seeds": [seed],
        }
        config = load_config(config_path).with_overrides(overrides)
        summary = Pipeline(config, show_progress=False).finetune(seed, pretrained=False).summary
    return {k: summary[k] for k in ("seconds", "best_epoch", "dev", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIGS / "further" / "acl_arc.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config)
    runs: dict[str, list[dict]] = {"plain": [], "cached": []}
    for _ in range(args.repeats):
        for name, cache in (("cached", True), ("plain", False)):
            runs[name].append(fine_tune_once(args.config, cache, args.epochs, args.seed))
    median = {name: statistics.median(run["seconds"] for run in rows) for name, rows in runs.items()}
    rows = [
        {
            "fine-tuning": name,
            "median_seconds": round(median[name], 1),
            "seconds": ", ".join(f"{run['seconds']:.1f}" for run in runs[name]),
            "best_epoch": runs[name][0]["best_epoch"],
            "dev_f1": round(100 * runs[name][0]["dev"], 2),
            "test_f1": round(100 * runs[name][0]["test"], 2),
        }
        for name in ("plain", "cached")
    ]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "config": str(args.config.resolve().relative_to(CONFIGS.parent)),
        "task": config.task.name,
        "trainable_blocks": config.finetune.trainable_blocks,
        "epochs": args.epochs,
        "runs": runs,
        "rows": rows,
        "plain_over_cached": round(median["plain"] / median["cached"], 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"finetune_cache_{config.task.name}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(markdown_rows(rows))
    print(f"\nplain / cached (median seconds): {result['plain_over_cached']}")


if __name__ == "__main__":
    main()

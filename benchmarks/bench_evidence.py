"""Evidence: does the subset matter here, and does ISS beat BM25 (TLM) and random where it does?

Usage: python benchmarks/bench_evidence.py [--settings further scratch] [--tasks acl_arc scierc chemprot]
                                           [--runs-root runs/evidence] [--force]

For each setting (``further``: further pretraining of the shared all-MiniLM-L6-v2 encoder, configs/further/;
``scratch``: a tiny BERT from scratch with TLM's joint objective, configs/scratch/) and task, runs ``iss run CONFIG`` in
a child process (wall time and peak RSS via wait4) with the methods iss (dot), iss-cosine, tlm, random,
random-corpus (positive control), iss-bottom (negative control) and none, the mechanism check and 5 seeds,
then merges its results into benchmarks/results/evidence.{json,md}. Each (setting, task) is committed to the
JSON as it finishes; a rerun skips those already there (``--force`` reruns them; finished stages in the run
folder are reused either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import pyarrow.parquet as pq
from measure import run_measured

from iss.config import load_config
from iss.model import load_tokenizer
from iss.pipeline import Pipeline
from iss.report import markdown, markdown_rows, results_table
from iss.training import unigram_entropy

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = {"further": CONFIGS / "further", "scratch": CONFIGS / "scratch"}


def run_one(setting: str, task: str, runs_root: Path) -> dict:
    """`iss run` of one (setting, task) in a child process; its results.json plus wall time and peak RSS."""
    run_dir = runs_root / setting / task
    config = SETTINGS[setting] / f"{task}.yaml"
    command = [sys.executable, "-m", "iss", "run", str(config), "--run-dir", str(run_dir), "--quiet"]
    measured = run_measured(command, f"iss run {config}")
    results = json.loads((run_dir / "results" / "results.json").read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    stage_seconds = {name: stage.get("summary", {}).get("seconds") for name, stage in manifest["stages"].items()}
    return {
        "setting": setting,
        "task": task,
        "config": str(config.relative_to(CONFIGS.parent)),
        "wall_seconds": measured.wall_seconds,
        "peak_rss_gib": measured.peak_rss_gib,
        "stage_seconds_total": round(sum(s for s in stage_seconds.values() if s), 1),
        "pretraining": pretraining_rows(run_dir, manifest),
        **results,
    }


def pretraining_rows(run_dir: Path, manifest: dict) -> list[dict]:
    """Per pretrained subset: the MLM loss at the end (and its curve) against the subset's unigram level, the
    loss of a model that knows word frequencies only; a curve that stays above it has learned little."""
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    rows = []
    for name, stage in manifest["stages"].items():
        if not name.startswith("pretrain-"):
            continue
        selection = name.removeprefix("pretrain-").rsplit("-seed", 1)[0]
        subset = pq.read_table(run_dir / f"select-{selection}" / "subset.parquet", columns=["text"])
        summary = stage["summary"]
        rows.append(
            {
                "subset": selection,
                "steps": summary["steps"],
                "final_mlm": summary.get("mlm"),
                "final_task_mlm": summary.get("task_mlm"),
                "unigram_level": round(unigram_entropy(tokenizer, subset.column("text").to_pylist()), 4),
                "curve": summary.get("curve"),
            }
        )
    return rows


def token_budget_mechanism(setting: str, task: str, runs_root: Path, docs_entry: dict) -> dict:
    """The mechanism check again at an equal-token budget (the equal-document subsets differ in length).

    The budget is the mean token count of the equal-document subsets, so both comparisons buy the same amount of
    text on average; retrieval, warm-up and influence are reused from the run folder.
    """
    config = load_config(SETTINGS[setting] / f"{task}.yaml").with_overrides(
        {"run_dir": str(runs_root / setting / task)}
    )
    tokens = int(sum(row["tokens"] for row in docs_entry["subsets"]) / len(docs_entry["subsets"]))
    pipeline = Pipeline(config, show_progress=False)
    rows = []
    for name in config.evaluation.methods:
        if name == "none":
            continue
        variant = pipeline.method_variant(name, f"{tokens} tokens", "@tokens")
        selected, check = variant.select().summary, variant.mechanism().summary
        rows.append(
            {
                "method": name,
                "budget": f"{tokens} tokens",
                "docs": selected["docs"],
                "mean_tokens": selected["mean_tokens"],
                **{k: v for k, v in check.items() if k.startswith("test_") or k.startswith("dev_")},
            }
        )
    return {"budget_tokens": tokens, "mechanism": rows}


def render(entries: list[dict]) -> str:
    """The evidence tables, one section per (setting, task)."""
    parts = ["# Evidence: ISS vs BM25 vs random, with controls\n"]
    for entry in entries:
        title = {"further": "further pretraining of all-MiniLM-L6-v2", "scratch": "from scratch (TLM objective)"}
        parts.append(f"\n## {entry['task']} — {title.get(entry['setting'], entry['setting'])}\n")
        parts.append(
            f"\n`iss run {entry['config']}`: {entry['wall_seconds']} s wall, peak RSS {entry['peak_rss_gib']} GiB "
            f"(2 CPU cores). Test F1 x 100 at the best dev epoch, mean ± std over seeds.\n\n"
        )
        parts.append(markdown(results_table(entry["runs"])))
        for key, title in (
            ("differences", "Paired differences (x100) with 95% bootstrap CIs"),
            ("subsets", "Subsets (mean length in WordPiece tokens)"),
            ("mechanism", "Mechanism check (no fine-tuning; test split)"),
            ("pretraining", "Pretraining: MLM loss (smoothed) at the last step vs the subset's unigram level"),
        ):
            rows = [
                {k: v for k, v in row.items() if (k not in ("task", "budget") or v) and k != "curve"}
                for row in entry.get(key, [])
            ]
            if rows:
                parts.append(f"\n### {title}\n\n{markdown_rows(rows)}")
        tokens = entry.get("equal_tokens")
        if tokens:
            title = f"Mechanism check at an equal-token budget ({tokens['budget_tokens']} tokens per subset)"
            parts.append(f"\n### {title}\n\n{markdown_rows(tokens['mechanism'])}")
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["further", "scratch"])
    parser.add_argument("--tasks", nargs="+", default=["acl_arc", "scierc", "chemprot"])
    parser.add_argument("--runs-root", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--force", action="store_true", help="Rerun (setting, task) pairs already in the JSON.")
    args = parser.parse_args()
    path = RESULTS / "evidence.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"entries": []}
    entries = {(e["setting"], e["task"]): e for e in done["entries"]}
    for setting in args.settings:
        for task in args.tasks:
            if (setting, task) in entries and not args.force:
                print(f"{setting}/{task}: in {path.name} already (--force reruns it)", file=sys.stderr)
                continue
            if not (SETTINGS[setting] / f"{task}.yaml").is_file():
                print(f"{setting}/{task}: no config, skipped", file=sys.stderr)
                continue
            print(f"iss run {setting}/{task} ...", file=sys.stderr, flush=True)
            entry = run_one(setting, task, args.runs_root)
            if entry.get("mechanism"):
                entry["equal_tokens"] = token_budget_mechanism(setting, task, args.runs_root, entry)
            entries[(setting, task)] = entry
            RESULTS.mkdir(exist_ok=True)
            machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
            path.write_text(json.dumps({"machine": machine, "entries": list(entries.values())}, indent=2))
            (RESULTS / "evidence.md").write_text(render(list(entries.values())), encoding="utf-8")
    print((RESULTS / "evidence.md").read_text(encoding="utf-8") if entries else "nothing run")


if __name__ == "__main__":
    main()

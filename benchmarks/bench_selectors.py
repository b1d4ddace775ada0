"""Every selector on one pool, on this machine, in one run: docs/s, peak RSS and how much their subsets overlap.

Usage: python benchmarks/bench_selectors.py [--config configs/bench/selectors-chemprot.yaml] [--knn-corpus-docs N]

Each step is one cold `iss select` in a child process (wall time and that child's peak RSS via wait4), the later
ones reusing the earlier ones' stages in the same run folder: BM25 retrieval (TLM; its docs/s over the corpus
read), ISS (warm-up and influence, docs/s over the pool), random, DSIR and kNN on the pool, then DSIR and kNN over
the whole corpus (``selection.over: corpus``; kNN over the first ``--knn-corpus-docs`` documents of the corpus
when given: it embeds every document, so its whole-corpus time is that rate extrapolated, and said so). Writes
benchmarks/results/selectors.{md,json} with the Jaccard overlap matrix of the subsets at the config's budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from measure import run_measured

from iss.comparison.tables import markdown_rows
from iss.config.io import load_config
from iss.selection.subset import jaccard, read_subset_ids
from iss.stages.plan import influence_stage, select_stage

RESULTS = Path(__file__).resolve().parent / "results"


def select(config: Path, method: str, run_dir: Path, *overrides: str, reuse: Path | None = None) -> dict:
    """One `iss select` in a child process: its wall time, peak RSS and the summaries of the stages it ran."""
    command = [sys.executable, "-m", "iss", "select", str(config), "--method", method, "--run-dir", str(run_dir),
               "--quiet", "--json"]  # fmt: skip
    command += ["--reuse-from", str(reuse)] if reuse else []
    for item in overrides:
        command += ["--set", item]
    measured = run_measured(command, f"iss select --method {method} {' '.join(overrides)}")
    return {"wall_seconds": measured.wall_seconds, "peak_rss_gib": measured.peak_rss_gib,
            "stages": json.loads(measured.stdout)}  # fmt: skip


def rate(docs: int, seconds: float) -> float:
    return round(docs / seconds, 1) if seconds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/bench/selectors-chemprot.yaml"))
    parser.add_argument("--runs-root", type=Path, default=Path("runs/bench"))
    parser.add_argument("--knn-corpus-docs", type=int, default=None, help="kNN over the first N corpus documents.")
    args = parser.parse_args()
    config = load_config(args.config)
    pool_dir, corpus_dir = args.runs_root / "selectors-pool", args.runs_root / "selectors-corpus"
    rows, subsets = [], {}

    def record(name: str, result: dict, stage: str, docs_key: str, docs: int | None = None, note: str = "") -> dict:
        summary = result["stages"][stage]
        docs = docs if docs is not None else summary[docs_key]
        row = {"selector": name, "work": stage, "docs": docs, "seconds": summary.get("seconds", 0)}
        row |= {"docs/s": rate(docs, row["seconds"]), "peak RSS GiB": result["peak_rss_gib"], "note": note}
        rows.append(row)
        return summary

    tlm = select(args.config, "tlm", pool_dir)
    retrieval = record("BM25 (TLM's pool)", tlm, "retrieval", "corpus_docs", note="indexes and searches the corpus")
    pool_docs = retrieval["pool_docs"]
    subsets["tlm"] = read_subset_ids(pool_dir / select_stage("tlm"))
    iss = select(args.config, "iss", pool_dir)
    record("ISS warm-up", iss, "warmup", "", docs=config.task.max_train or 0, note="task training texts, 1 epoch")
    record("ISS influence", iss, influence_stage(config.influence), "", docs=pool_docs, note="per document")
    subsets["iss"] = read_subset_ids(pool_dir / select_stage("iss"))
    select(args.config, "random", pool_dir)
    subsets["random"] = read_subset_ids(pool_dir / select_stage("random"))
    for method in ("dsir", "knn"):
        record(f"{method} (pool)", select(args.config, method, pool_dir), select_stage(method), "", docs=pool_docs)
        subsets[method] = read_subset_ids(pool_dir / select_stage(method))
    dsir = select(args.config, "dsir", corpus_dir, "selection.over=corpus", reuse=pool_dir)
    corpus_docs = retrieval["corpus_docs"]
    record("dsir (whole corpus)", dsir, select_stage("dsir"), "", docs=corpus_docs, note="two passes: fit, score")
    subsets["dsir (corpus)"] = read_subset_ids(corpus_dir / select_stage("dsir"))
    knn_dir, knn_overrides, note = corpus_dir, ["selection.over=corpus"], ""
    if args.knn_corpus_docs:
        knn_dir = args.runs_root / "selectors-corpus-slice"
        knn_overrides.append(f"corpus.max_docs={args.knn_corpus_docs}")
        note = f"first {args.knn_corpus_docs} corpus documents (of the mixture's reads); own BM25 pool for the budget"
    knn = select(args.config, "knn", knn_dir, *knn_overrides, reuse=None if args.knn_corpus_docs else pool_dir)
    knn_docs = knn["stages"]["retrieval"]["corpus_docs"] if "retrieval" in knn["stages"] else corpus_docs
    record("knn (whole corpus)", knn, select_stage("knn"), "", docs=knn_docs, note=note)
    if not args.knn_corpus_docs:
        subsets["knn (corpus)"] = read_subset_ids(corpus_dir / select_stage("knn"))

    chosen = {name: set(ids.tolist()) for name, ids in subsets.items()}
    overlap = [{"subset": a, **{b: round(jaccard(chosen[a], chosen[b]), 3) for b in chosen}} for a in chosen]
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    sizes = {name: int(np.size(ids)) for name, ids in subsets.items()}
    report = {"config": str(args.config), "machine": machine, "pool_docs": pool_docs, "corpus_docs": corpus_docs}
    report |= {"budget": str(config.selection.budget), "subset_docs": sizes, "rows": rows, "overlap": overlap}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "selectors.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    text = (
        f"# Selectors on one pool ({args.config})\n\nPool: {pool_docs} documents (BM25 top {config.retrieval.top_k} "
        f"of {config.task.max_train} ChemProt training queries) from {corpus_docs} corpus documents; budget "
        f"{config.selection.budget}; {machine['cpus']} CPU cores, {machine['torch_threads']} torch threads.\n\n"
        f"## Throughput\n\n{markdown_rows(rows)}\n## Jaccard overlap of the subsets\n\n{markdown_rows(overlap)}"
    )
    (RESULTS / "selectors.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

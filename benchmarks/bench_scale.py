"""Peak memory and throughput of `iss select` as the corpus grows from 1x to 10x the shared corpus.

The larger corpora are the shared corpus's file streamed repeatedly (a folder of links to it: real text, no
synthetic words), so every size holds the same documents, repeated. Each size runs cold in its own process.

Usage: python benchmarks/bench_scale.py [--config configs/chemprot.yaml] [--sizes 1 3 10] [--method iss]
                                       [--backend local|ray]
Prints a Markdown table and writes benchmarks/results/scale_<task>[_ray].json. With Ray, peak RSS is the
driver process's (workers are separate processes started by Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from bench_select import RESULTS, run_select

from iss.config import load_config
from iss.data import corpus_files

# a smaller task sample keeps the 10x run in minutes on 2 cores; the corpus is what grows
SMALL_TASK = ("task.max_train=1000", "task.max_dev=300", "warmup.epochs=1")


def repeated_corpus(files: list[Path], times: int, folder: Path) -> Path:
    """A folder that streams ``files`` ``times`` times over (symbolic links, in order)."""
    folder.mkdir(parents=True)
    for copy in range(times):
        for number, file in enumerate(files):
            (folder / f"copy{copy:03d}-{number:03d}{file.suffix}").symlink_to(file.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/chemprot.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--method", default="iss")
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    args = parser.parse_args()
    config = load_config(args.config)
    files = corpus_files(config.corpus)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            corpus = repeated_corpus(files, size, Path(scratch) / f"corpus-{size}x")
            keys = (*SMALL_TASK, f"corpus.paths=[{corpus}]", f"backend={args.backend}", "ray.num_cpus=2")
            overrides = [item for key in keys for item in ("--set", key)]
            run = run_select(args.config, args.method, Path(scratch) / f"run-{size}x", tuple(overrides))
            retrieval = run["stages"]["retrieval"]
            rows.append(
                {
                    "size": f"{size}x",
                    "corpus_docs": retrieval["corpus_docs"],
                    "pool_docs": retrieval["pool_docs"],
                    "peak_rss_gib": run["peak_rss_gib"],
                    "wall_seconds": run["wall_seconds"],
                    "retrieval_seconds": retrieval["seconds"],
                    "retrieval_docs_per_s": round(retrieval["corpus_docs"] / retrieval["seconds"]),
                    "select_docs_per_s": round(retrieval["corpus_docs"] / run["wall_seconds"]),
                    "stage_seconds": run["stage_seconds"],
                }
            )
            print(f"{size}x done: {rows[-1]['peak_rss_gib']} GiB, {rows[-1]['wall_seconds']} s", flush=True)
    base = rows[0]["peak_rss_gib"]
    lines = ["| corpus | docs | pool | peak RSS GiB | vs 1x | wall s | retrieval s | retrieval docs/s | docs/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['corpus_docs']:,} | {row['pool_docs']:,} | {row['peak_rss_gib']} | "
            f"{row['peak_rss_gib'] / base:.2f} | {row['wall_seconds']} | {row['retrieval_seconds']:.1f} | "
            f"{row['retrieval_docs_per_s']:,} | {row['select_docs_per_s']:,} |"
        )
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    report = {
        "config": str(args.config),
        "method": args.method,
        "backend": args.backend,
        "task_overrides": SMALL_TASK,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": rows,
        "peak_rss_ratio_max_over_1x": round(max(r["peak_rss_gib"] for r in rows) / base, 3),
        "table": lines,
    }
    suffix = "" if args.backend == "local" else f"_{args.backend}"
    (RESULTS / f"scale_{config.task.name}{suffix}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

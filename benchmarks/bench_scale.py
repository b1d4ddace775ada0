"""Peak memory and throughput of `iss select` as the corpus grows.

Two kinds of growth, each size cold in its own process:
- repeated (default): the config's corpus streamed 1x, 3x, 10x over (a folder of links to its files: real text,
  the same documents repeated);
- ``--shards DIR``: the first 1, 3, 10 shards of a real sharded corpus (``../shared/data/corpus/large``: ten
  ``.jsonl.gz`` shards of 37k whole abstracts, articles, reviews and paragraphs each), distinct documents.

Usage: python benchmarks/bench_scale.py [--config configs/chemprot.yaml] [--sizes 1 3 10] [--method iss]
                                       [--backend local|ray] [--shards ../shared/data/corpus/large]
Prints a Markdown table and writes benchmarks/results/scale_<task>[_large][_ray].json. With Ray, peak RSS is the
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

from iss.config.io import load_config
from iss.data.corpus import corpus_files

# a smaller task sample keeps the 10x run in minutes on 2 cores; the corpus is what grows
SMALL_TASK = ("task.max_train=1000", "task.max_dev=300", "warmup.epochs=1")


def repeated_corpus(files: list[Path], times: int, folder: Path) -> Path:
    """A folder that streams ``files`` ``times`` times over (symbolic links, in order)."""
    folder.mkdir(parents=True)
    for copy in range(times):
        for number, file in enumerate(files):
            (folder / f"copy{copy:03d}-{number:03d}{file.suffix}").symlink_to(file.resolve())
    return folder


def first_shards(folder: Path, count: int, target: Path) -> Path:
    """A folder of links to the first ``count`` corpus shards of ``folder`` (by name)."""
    shards = sorted(p for p in folder.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")))
    if count > len(shards):
        raise SystemExit(f"{folder} has {len(shards)} shards, not {count}")
    target.mkdir(parents=True)
    for shard in shards[:count]:
        (target / shard.name).symlink_to(shard.resolve())
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/chemprot.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--method", default="iss")
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--shards", type=Path, help="Grow by the first N shards of this corpus folder instead.")
    args = parser.parse_args()
    config = load_config(args.config)
    files = corpus_files(config.corpus)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            folder = Path(scratch) / f"corpus-{size}x"
            corpus = first_shards(args.shards, size, folder) if args.shards else repeated_corpus(files, size, folder)
            keys = (*SMALL_TASK, f"corpus.paths=[{corpus}]", f"backend={args.backend}", "ray.num_cpus=2")
            overrides = [item for key in keys for item in ("--set", key)]
            run = run_select(args.config, args.method, Path(scratch) / f"run-{size}x", tuple(overrides))
            retrieval = run["stages"]["retrieval"]
            rows.append(
                {
                    "size": f"{size} shards" if args.shards else f"{size}x",
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
    lines = ["| corpus | docs | pool | peak RSS GiB | vs smallest | wall s | retrieval s | retrieval docs/s | docs/s |",
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
        "corpus": str(args.shards) if args.shards else "repeated config corpus",
        "task_overrides": SMALL_TASK,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": rows,
        "peak_rss_ratio_max_over_1x": round(max(r["peak_rss_gib"] for r in rows) / base, 3),
        "table": lines,
    }
    suffix = ("_large" if args.shards else "") + ("" if args.backend == "local" else f"_{args.backend}")
    (RESULTS / f"scale_{config.task.name}{suffix}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

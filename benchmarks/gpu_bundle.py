"""One folder that lets a lent GPU machine run the GPU protocol: wheels, data and a run.sh, under 60 MiB.

Usage: python benchmarks/gpu_bundle.py OUT_DIR [--max-docs N] [--minutes M]

The device machine has no network, no ``../shared`` and takes the checkout plus at most 8 carried paths, 64 MiB
in all (issue 39). This builds, on a CPU machine with the package registry:

- ``wheels/``: the packages iss needs that the device image lacks (:data:`MISSING`), at the versions installed
  here, for CPython 3.12 on manylinux x86-64; ``run.sh`` installs them with ``pip --no-index --no-deps --target``.
- ``tasks/``: the ChemProt and SciERC splits; ``tokenizer/``: the all-MiniLM-L6-v2 tokenizer files (no weights:
  the GPU configs train a model from scratch with that vocabulary).
- ``corpus/general.jsonl.zst``: the general mixture of the large corpus (``configs/mixtures/general.yaml``),
  materialised: the documents the mixture keeps, in corpus order, with their sources. The device runs BM25 and
  the random-corpus sample on it, so the pool and the control are drawn from the same documents as here (their
  corpus ids are positions in this file).
- ``configs/``: ``configs/gpu/{chemprot,scierc}.yaml`` pointed at the bundle's files.
- ``run.sh``: installs the wheels, then runs ``benchmarks/gpu_protocol.py`` on both gate tasks and writes their
  JSON under ``$OUT`` (``--dry-run``: the same path at toy scale, as the CPU simulation test runs it).

It prints the one ``device`` call to make. ``--max-docs`` cuts the corpus (tests).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
import zstandard

from iss.config.io import load_config
from iss.data.corpus import iter_corpus

REPO = Path(__file__).resolve().parents[1]
TASKS = ("chemprot", "scierc")
# What iss imports that the device image does not hold (the device tool's KINDS.md lists what it does hold).
MISSING = (
    "bm25s",
    "datasets",
    "dill",
    "multiprocess",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "zstandard",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
LIMIT_MIB = 60
DEVICE_PYTHON = "3.12"
BUNDLE_NAME = "gpu-bundle"  # where the bundle lies in the checkout (ignored by git) when it travels
RUN_SH = """#!/usr/bin/env bash
# Runs the GPU protocol on both gate tasks from this bundle (made by benchmarks/gpu_bundle.py).
# Usage: bash gpu-bundle/run.sh [--dry-run] [--minutes M] [--tasks "chemprot scierc"]   (JSON goes to $OUT)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${OUT:-$HERE/out}"
MINUTES=__MINUTES__
TASKS="__TASKS__"
DRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --minutes) MINUTES="$2"; shift ;;
    --tasks) TASKS="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
SITE="$(mktemp -d)/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$HERE"/wheels/*.whl
export PYTHONPATH="$SITE:$REPO/src:$REPO/benchmarks" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ISS_CACHE="$SITE/../cache"
mkdir -p "$OUT"
for task in $TASKS; do
  python3 "$REPO/benchmarks/gpu_protocol.py" "$HERE/configs/$task.yaml" --minutes "$MINUTES" $DRY \\
    --run-dir "$SITE/../runs/$task" --results "$OUT" 2>&1 | tee "$OUT/gpu_protocol_$task.log"
done
"""


def download_wheels(folder: Path, python_version: str = DEVICE_PYTHON) -> list[str]:
    """The missing packages at this environment's versions, as manylinux x86-64 (or pure Python) wheels for
    CPython ``python_version`` (the device's 3.12; the CPU simulation test asks for its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(folder)]  # fmt: skip
    command += pins
    subprocess.run(command, check=True)
    return pins


def write_corpus(path: Path, max_docs: int | None) -> int:
    """The general mixture's documents, in corpus order, as one zstd-compressed JSONL file; returns their count."""
    corpus = load_config(REPO / "configs" / "gpu" / "chemprot.yaml").corpus
    if max_docs is not None:
        corpus = corpus.model_copy(update={"max_docs": max_docs})
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("wb") as raw, zstandard.ZstdCompressor(level=19, threads=-1).stream_writer(raw) as out:
        for batch in iter_corpus(corpus):
            for text, source in zip(batch.texts, batch.sources or [""] * len(batch.texts), strict=True):
                if text:
                    out.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode())
                    count += 1
    return count


def write_configs(folder: Path) -> None:
    """configs/gpu/TASK.yaml pointed at the bundle: tasks, tokenizer and the materialised corpus (no mixture:
    the file holds the mixture's documents already)."""
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        raw = yaml.safe_load((REPO / "configs" / "gpu" / f"{task}.yaml").read_text(encoding="utf-8"))
        raw["task"]["path"] = f"../tasks/{task}"
        raw["corpus"] = {"paths": ["../corpus/general.jsonl.zst"]}
        raw["tokenizer"]["path"] = "../tokenizer"
        raw.pop("run_dir", None)
        header = f"# configs/gpu/{task}.yaml for the device bundle (benchmarks/gpu_bundle.py): paths in the bundle\n"
        (folder / f"{task}.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


def build(out: Path, max_docs: int | None = None, minutes: float = 3.5, python_version: str = DEVICE_PYTHON) -> dict:
    """Make the bundle in ``out`` (emptied first); returns what it holds and its size."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pins = download_wheels(out / "wheels", python_version)
    for task in TASKS:
        config = load_config(REPO / "configs" / "gpu" / f"{task}.yaml")
        shutil.copytree(config.task.path, out / "tasks" / task, ignore=shutil.ignore_patterns("*.md", "SHA256SUMS"))
    tokenizer = Path(load_config(REPO / "configs" / "gpu" / "chemprot.yaml").tokenizer.path)
    (out / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer / name, out / "tokenizer" / name)
    documents = write_corpus(out / "corpus" / "general.jsonl.zst", max_docs)
    write_configs(out / "configs")
    script = RUN_SH.replace("__MINUTES__", f"{minutes:g}").replace("__TASKS__", " ".join(TASKS))
    (out / "run.sh").write_text(script, encoding="utf-8")
    (out / "run.sh").chmod(0o755)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    manifest = {"wheels": pins, "tasks": list(TASKS), "corpus_documents": documents, "bytes": size}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help=f"Bundle folder (put it at the checkout's root as {BUNDLE_NAME}/).")
    parser.add_argument("--max-docs", type=int, help="Read at most this many corpus documents (tests).")
    parser.add_argument("--minutes", type=float, default=3.5, help="Each task's time budget on the device.")
    parser.add_argument("--python-version", default=DEVICE_PYTHON, help="The wheels' CPython (the device's: 3.12).")
    args = parser.parse_args()
    manifest = build(args.out, args.max_docs, args.minutes, args.python_version)
    mib = manifest["bytes"] / 2**20
    print(
        f"{args.out}: {mib:.1f} MiB ({manifest['corpus_documents']} corpus documents, {len(manifest['wheels'])} wheels)"
    )
    if mib > LIMIT_MIB:
        raise SystemExit(f"the bundle is {mib:.1f} MiB, over {LIMIT_MIB} MiB: it will not travel with the checkout")
    carried = args.out.resolve().relative_to(REPO) if args.out.resolve().is_relative_to(REPO) else BUNDLE_NAME
    print(
        "device call: run(command="
        + json.dumps(f"bash {carried}/run.sh")
        + f", carry=[{json.dumps(str(carried))}], timeout_s=540)"
    )


if __name__ == "__main__":
    main()

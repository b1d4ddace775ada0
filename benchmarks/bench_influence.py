"""Influence-stage throughput: per-sample autograd loop, torch.func vmap(grad), iss's hook path, forward-only floor.

Usage: python benchmarks/bench_influence.py [--config configs/chemprot.yaml] [--run-dir DIR] [--limit N]

The candidate pool is the config's BM25 pool over the shared corpus, the task bank its dev split, the layer the
config's (default: the last block), sequences up to the config's max_length (128). Every method scores candidates
against the same bank (gradient dot products), except the forward-only floor, which computes the MLM loss and
nothing else. Each method runs in a child process so its peak RSS is its own (wait4). Also: BM25 index build
docs/s and queries/s, the error of random projections against exact scores, and pretraining throughput on a
slice of the pool with and without packing (real, non-padding tokens per second). The ratios the targets are
stated in (iss/forward <= 1.3, loop/iss >= 20) are written under ``ratios``.
Prints a Markdown table and writes benchmarks/results/influence_<task>[_<setting>].json (setting: the config's
folder under configs/, e.g. further).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from measure import run_measured
from scipy.stats import spearmanr
from torch.func import functional_call, grad, vmap

from iss.config.io import load_config
from iss.config.schema import IssConfig
from iss.influence.gradients import autograd_gradient
from iss.influence.scorer import InfluenceScorer
from iss.modeling.batches import candidate_batch, per_sample_lm_loss
from iss.modeling.family import IGNORE
from iss.modeling.model import TaskModel, parameter_group
from iss.modeling.precision import forward_autocast, precision
from iss.pipeline.run import Pipeline
from iss.retrieval.bm25 import BM25Index, read_pool
from iss.training.pretraining import pretrain

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("forward", "iss", "iss-defaults", "iss-matched", "vmap", "loop", "projection", "bm25", "pretrain")


@dataclass
class Setup:
    """Everything a method needs, loaded from the finished stages of the run folder."""

    config: IssConfig
    pipeline: Pipeline
    model: TaskModel
    group: torch.nn.Module
    tokenizer: object
    pool_texts: list[str]
    pool_keys: np.ndarray
    task_texts: list[str]
    task_labels: np.ndarray

    @classmethod
    def load(
        cls, config: IssConfig, limit: int | None, untrained: bool = False, bank_limit: int | None = None
    ) -> Setup:
        """With ``untrained`` the checkpoint with a fresh task head stands in for the warmed-up model (speed does
        not depend on the weights; a 135 M model's warm-up is hours on CPU); ``bank_limit`` caps the task bank."""
        pipeline = Pipeline(config, show_progress=False)
        retrieval, task = pipeline.retrieval(), pipeline.task()
        tokenizer = pipeline.read_tokenizer()
        if untrained:
            model = pipeline.initial_model(task, tokenizer, config.seed).eval()
        else:
            model = TaskModel.load(pipeline.warmup().path / "model").eval()
        _, group = parameter_group(model, config.influence.layer)
        pool = read_pool(retrieval.path, ["corpus_id", "text"])
        # A seeded shuffle, so the first N candidates the slower methods time are a random sample of the pool.
        order = np.random.default_rng(config.seed).permutation(pool.num_rows)[:limit]
        pool = pool.take(order)
        split = config.influence.task_split
        return cls(
            config,
            pipeline,
            model,
            group,
            tokenizer,
            pool.column("text").to_pylist(),
            pool.column("corpus_id").to_numpy(),
            task.texts(split)[:bank_limit],
            task.label_ids(split)[:bank_limit],
        )

    def candidates(self, start: int, stop: int):
        influence = self.config.influence
        return candidate_batch(
            self.model,
            self.tokenizer,
            self.pool_texts[start:stop],
            self.pool_keys[start:stop],
            influence.mlm_probability,
            self.config.seed,
            self.config.model.max_length,
        )

    def scorer(self, projection_dim: int | None = None, task_batch: int = 1, pool_batch: int = 1) -> InfluenceScorer:
        """The library's scorer (per sample on both sides unless B_t / B_p are given), fitted on the task split."""
        settings = self.config.influence.model_copy(
            update={"projection_dim": projection_dim, "task_batch": task_batch, "pool_batch": pool_batch}
        )
        scorer = InfluenceScorer(
            self.model, self.tokenizer, settings, seed=self.config.seed, max_length=self.config.model.max_length
        )
        return scorer.fit(self.task_texts, self.task_labels, candidate_probe=self.pool_texts)

    def batches(self, n: int):
        size = self.config.influence.compute_batch
        for start in range(0, n, size):
            yield start, self.candidates(start, min(n, start + size))


def _timed(function) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def run_forward(setup: Setup, n: int) -> dict:
    def forward() -> None:
        with torch.no_grad():
            for _, batch in setup.batches(n):
                with forward_autocast(batch.input_ids.device):  # the config's precision, as iss's forward runs
                    per_sample_lm_loss(setup.model, batch)

    _, seconds = _timed(forward)
    return {"docs": n, "seconds": seconds}


def run_iss(setup: Setup, n: int, task_batch: int = 1, pool_batch: int = 1) -> dict:
    """The influence stage's own scorer; B_t / B_p > 1 is mini-batch matching (samples per bank row / unit)."""
    scorer, bank_seconds = _timed(lambda: setup.scorer(task_batch=task_batch, pool_batch=pool_batch))
    _, seconds = _timed(lambda: scorer.score(setup.pool_texts[:n], setup.pool_keys[:n]))
    return {
        "docs": n,
        "seconds": seconds,
        "task_batch": task_batch,
        "pool_batch": pool_batch,
        "bank_seconds": bank_seconds,
        "bank_rows": len(scorer.bank),
        "low_rank": list(scorer.low_rank_modules),
    }


def _exact_scores(setup: Setup, scorer: InfluenceScorer, n: int) -> torch.Tensor:
    """[n, task units] scores of each candidate on its own (no top-k), from the scorer's formula."""
    return torch.cat(
        [scorer.candidate_scores(batch, [np.array([i]) for i in range(len(batch.input_ids))])
         for _, batch in setup.batches(n)]
    )  # fmt: skip


def _agreement(scores: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest score error relative to the largest exact score magnitude."""
    return float((scores - exact).abs().max() / exact.abs().max())


def _time_baseline(setup: Setup, n: int, scores_of) -> dict:
    """Time a baseline scoring n candidates against the explicit [task, D] bank; check it against iss's scores."""
    scorer = setup.scorer()
    flat_bank = scorer.grads.flatten(scorer.bank)
    scores, seconds = _timed(lambda: scores_of(flat_bank))
    return {
        "docs": n,
        "seconds": seconds,
        "max_rel_error_vs_iss": _agreement(scores, _exact_scores(setup, scorer, n)),
    }


def run_loop(setup: Setup, n: int) -> dict:
    def loop(flat_bank: torch.Tensor) -> torch.Tensor:
        rows = []
        for _, batch in setup.batches(n):
            for row in range(batch.input_ids.shape[0]):
                single = type(batch)(
                    batch.input_ids[row : row + 1], batch.attention_mask[row : row + 1], batch.lm_labels[row : row + 1]
                )
                rows.append(autograd_gradient(setup.model, setup.group, per_sample_lm_loss, single) @ flat_bank.T)
        return torch.stack(rows)

    return _time_baseline(setup, n, loop)


def run_vmap(setup: Setup, n: int) -> dict:
    """vmap(grad) over the chosen block and the MLM head; the frozen layers below run once, batched.

    HF's mask preparation branches on data, so the whole model cannot be vmapped; the block alone can.
    """
    if setup.config.influence.layer == "embeddings":
        raise SystemExit("the vmap baseline covers transformer blocks, not the embeddings")
    block, head = setup.group, setup.model.mlm_head
    blocks = list(setup.model.encoder.encoder.layer)
    if block is not blocks[-1]:
        raise SystemExit("the vmap baseline covers the last block (the layer below the MLM head)")
    params = {name: p.detach() for name, p in block.named_parameters()}

    def one_loss(params, hidden, mask, positions, targets, weights):
        out = functional_call(block, params, (hidden[None], mask[None]))
        out = out[0] if isinstance(out, tuple) else out
        token_loss = torch.nn.functional.cross_entropy(head(out[0][positions]), targets, reduction="none")
        return (token_loss * weights).sum() / weights.sum()

    per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0, 0, 0, 0))
    captured: dict = {}

    def capture(module, args, kwargs):
        captured["args"] = args

    def run(flat_bank: torch.Tensor) -> torch.Tensor:
        rows = []
        for _, batch in setup.batches(n):
            handle = block.register_forward_pre_hook(capture, with_kwargs=True)
            with torch.no_grad():
                setup.model.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            handle.remove()
            hidden, mask = captured["args"][0], captured["args"][1]
            masked = batch.lm_labels != IGNORE
            width = int(masked.sum(1).max())
            positions = torch.zeros(len(masked), width, dtype=torch.long)
            targets = torch.zeros(len(masked), width, dtype=torch.long)
            weights = torch.zeros(len(masked), width)
            for row in range(len(masked)):
                where = masked[row].nonzero()[:, 0]
                positions[row, : len(where)] = where
                targets[row, : len(where)] = batch.lm_labels[row, where]
                weights[row, : len(where)] = 1
            grads_by_name = per_sample(params, hidden, mask, positions, targets, weights)
            flat = torch.cat([grads_by_name[name].reshape(len(masked), -1) for name in params], dim=1)
            rows.append(flat @ flat_bank.T)
        return torch.cat(rows)

    return _time_baseline(setup, n, run)


def run_projection(setup: Setup, n: int, dims: list[int], k: int = 10) -> dict:
    """Projected scores against exact ones on the same candidates: relative error, rank agreement, top-k overlap."""
    exact = _exact_scores(setup, setup.scorer(), n)
    rows = []
    for dim in dims:
        scorer = setup.scorer(dim)
        scores, seconds = _timed(lambda scorer=scorer: _exact_scores(setup, scorer, n))
        rho = [spearmanr(scores[:, j], exact[:, j]).statistic for j in range(exact.shape[1])]
        top_exact, top_projected = exact.topk(k, dim=0).indices, scores.topk(k, dim=0).indices
        overlap = [
            len(set(top_exact[:, j].tolist()) & set(top_projected[:, j].tolist())) / k for j in range(exact.shape[1])
        ]
        rows.append(
            {
                "dim": int(scorer.bank.dense.shape[1]),
                "requested_dim": dim,
                "relative_frobenius_error": float((scores - exact).norm() / exact.norm()),
                "mean_spearman": float(np.nanmean(rho)),
                f"top{k}_overlap": float(np.mean(overlap)),
                "docs_per_second": n / seconds,
            }
        )
    return {"docs": n, "exact_dim": sum(p.numel() for p in setup.group.parameters()), "rows": rows}


def run_bm25(setup: Setup) -> dict:
    config = setup.config
    queries = setup.pipeline.task().texts("train")
    with tempfile.TemporaryDirectory() as work:
        index = BM25Index(config.retrieval, Path(work))
        _, build_seconds = _timed(lambda: index.build(config.corpus))
        _, search_seconds = _timed(lambda: index.search(queries, config.retrieval.top_k))
    return {
        "docs": index.n_docs,
        "index_docs_per_second": index.n_docs / build_seconds,
        "queries": len(queries),
        "queries_per_second": len(queries) / search_seconds,
    }


def run_pretrain(setup: Setup, docs: int, steps: int) -> dict:
    """Pretraining steps on the first ``docs`` pool candidates, with and without packing: the same steps and
    batch shape, so real (non-padding) tokens per second is what packing changes."""
    config, task = setup.config, setup.pipeline.task()
    rows = {}
    for packing in (False, True):
        settings = config.pretrain.model_copy(update={"steps": steps, "packing": packing, "save_every": 0})
        model = copy.deepcopy(setup.model)
        summary, seconds = _timed(
            lambda settings=settings, model=model: pretrain(
                model, setup.tokenizer, setup.pool_texts[:docs], task, settings, config.model.max_length,
                config.seed, torch.device("cpu"), show_progress=False,
            )
        )  # fmt: skip
        rows["packed" if packing else "unpacked"] = {
            "seconds": seconds,
            "steps_per_second": steps / seconds,
            "real_tokens": summary["real_tokens"],
            "real_tokens_per_second": summary["real_tokens"] / seconds,
            "final_mlm": summary.get("mlm"),
        }
    return {"docs": docs, "steps": steps, "batch_size": config.pretrain.batch_size, **rows}


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    config = load_config(args.config).with_overrides({"run_dir": str(args.run_dir)})
    setup = Setup.load(config, args.limit, args.untrained, args.bank_limit)
    n = len(setup.pool_texts)
    methods = {
        "forward": lambda: run_forward(setup, n),
        "iss": lambda: run_iss(setup, n),
        "iss-defaults": lambda: run_iss(setup, n, setup.config.influence.task_batch, setup.config.influence.pool_batch),
        "iss-matched": lambda: run_iss(setup, n, args.matched_task_batch),
        "vmap": lambda: run_vmap(setup, min(n, args.vmap_docs)),
        "loop": lambda: run_loop(setup, min(n, args.loop_docs)),
        "projection": lambda: run_projection(setup, min(n, args.projection_docs), args.projection_dims),
        "bm25": lambda: run_bm25(setup),
        "pretrain": lambda: run_pretrain(setup, min(n, args.pretrain_docs), args.pretrain_steps),
    }
    with precision(config.precision):  # as the pipeline's stages run
        results = methods[args.child]()
    print(json.dumps(results))


def run_child(args: argparse.Namespace, method: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--config",
        str(args.config),
        "--run-dir",
        str(args.run_dir),
    ]
    if args.untrained:
        command.append("--untrained")
    for flag in (
        "bank_limit", "limit", "vmap_docs", "loop_docs", "projection_docs", "matched_task_batch", "pretrain_docs",
        "pretrain_steps",
    ):  # fmt: skip
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--projection-dims", *map(str, args.projection_dims)]
    measured = run_measured(command, method)
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    result["peak_rss_gib"] = measured.peak_rss_gib
    return result


SPEED_ROWS = ("loop", "vmap", "iss", "iss-defaults", "iss-matched", "forward")


def docs_per_second(runs: dict) -> dict[str, float]:
    return {m: runs[m]["docs"] / runs[m]["seconds"] for m in SPEED_ROWS if m in runs}


def ratios(runs: dict) -> dict[str, float]:
    """Time per document of one method over another's: the figures the targets are stated in."""
    rate = docs_per_second(runs)
    pairs = {
        "iss/forward": ("forward", "iss"),  # target <= 1.3
        "iss-defaults/forward": ("forward", "iss-defaults"),
        "iss-matched/forward": ("forward", "iss-matched"),
        "loop/iss": ("iss", "loop"),  # target >= 20
        "vmap/iss": ("iss", "vmap"),
    }
    return {name: round(rate[a] / rate[b], 3) for name, (a, b) in pairs.items() if {a, b} <= rate.keys()}


def table(runs: dict) -> list[str]:
    rate = docs_per_second(runs)

    def matching(method: str) -> str:
        return f"B_p={runs.get(method, {}).get('pool_batch')}, B_t={runs.get(method, {}).get('task_batch')}"

    labels = {
        "loop": "(a) per-sample backward loop",
        "vmap": "(b) torch.func vmap(grad)",
        "iss": "(c) iss hook path, B_p=B_t=1",
        "iss-defaults": f"(c'') iss, Table A.1 {matching('iss-defaults')}",
        "iss-matched": f"(c') iss, {matching('iss-matched')}",
        "forward": "(d) forward only (floor)",
    }
    lines = ["| method | docs | docs/s | peak RSS GiB | max rel. error vs (c) |", "| --- | ---: | ---: | ---: | ---: |"]
    for method in SPEED_ROWS:
        if method in runs:
            run = runs[method]
            error = run.get("max_rel_error_vs_iss")
            lines.append(
                f"| {labels[method]} | {run['docs']} | {rate[method]:.1f} | {run['peak_rss_gib']} | "
                f"{'' if error is None else f'{error:.1e}'} |"
            )
    targets = {"iss/forward": " (target <= 1.3)", "loop/iss": " (target >= 20)"}
    lines.append("")
    lines += [f"{name} time per doc: {value:.2f}{targets.get(name, '')}" for name, value in ratios(runs).items()]
    for method in ("iss", "iss-defaults", "iss-matched"):
        if method in runs:
            run = runs[method]
            lines.append(f"{labels[method]}: task bank {run['bank_rows']} rows in {run['bank_seconds']:.1f} s; "
                         f"token-factored weights: {', '.join(run['low_rank']) or 'none'}")  # fmt: skip
    if "projection" in runs:
        projection = runs["projection"]
        lines += [
            f"\nRandom projection vs exact scores ({projection['docs']} candidates, "
            f"exact dim {projection['exact_dim']}):",
            "| dim | rel. Frobenius error | mean Spearman | top-10 overlap | docs/s |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in projection["rows"]:
            lines.append(
                f"| {row['dim']} | {row['relative_frobenius_error']:.3f} | {row['mean_spearman']:.3f} | "
                f"{row['top10_overlap']:.2f} | {row['docs_per_second']:.1f} |"
            )
    if "pretrain" in runs:
        run = runs["pretrain"]
        lines += [
            f"\nPretraining, {run['steps']} steps x {run['batch_size']} rows on {run['docs']} pool documents "
            f"(peak RSS {run['peak_rss_gib']} GiB):",
            "| batches | steps/s | real tokens | real tokens/s |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in ("unpacked", "packed"):
            row = run[name]
            rate = f"{row['real_tokens_per_second']:.0f}"
            lines.append(f"| {name} | {row['steps_per_second']:.2f} | {row['real_tokens']} | {rate} |")
        speedup = run["packed"]["real_tokens_per_second"] / run["unpacked"]["real_tokens_per_second"]
        lines.append(f"packed/unpacked real tokens/s: {speedup:.2f}")
    if "bm25" in runs:
        bm25 = runs["bm25"]
        lines.append(
            f"\nBM25: index build {bm25['index_docs_per_second']:.0f} docs/s over {bm25['docs']} docs; "
            f"search {bm25['queries_per_second']:.0f} queries/s ({bm25['queries']} queries); "
            f"peak RSS {bm25['peak_rss_gib']} GiB"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/chemprot.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-influence"))
    parser.add_argument("--limit", type=int, help="Score only the first N pool candidates.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--vmap-docs", type=int, default=512)
    parser.add_argument("--loop-docs", type=int, default=512)
    parser.add_argument("--matched-task-batch", type=int, default=16, help="B_t of the mini-batch matching row.")
    parser.add_argument("--projection-docs", type=int, default=1024)
    parser.add_argument("--projection-dims", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--pretrain-docs", type=int, default=4000, help="Pool candidates the pretraining row uses.")
    parser.add_argument("--pretrain-steps", type=int, default=40)
    parser.add_argument("--untrained", action="store_true", help="Time the checkpoint itself, without warm-up.")
    parser.add_argument("--bank-limit", type=int, help="Task samples in the bank (default: the whole split).")
    parser.add_argument("--output", type=Path, help="JSON path (default: results/influence_<task>[_<setting>].json).")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    config = load_config(args.config).with_overrides({"run_dir": str(args.run_dir)})
    if not args.untrained:
        Pipeline(config).warmup()  # build (or reuse) the stages every method reads
    Pipeline(config).retrieval()
    runs = {}
    for method in args.methods:
        print(f"running {method} ...", file=sys.stderr, flush=True)
        runs[method] = run_child(args, method)
    lines = table(runs)
    print("\n".join(lines))
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    report = {
        "config": str(args.config),
        "layer": str(config.influence.layer),
        "precision": config.precision,
        "machine": machine,
        "runs": runs,
        "ratios": ratios(runs),
    }
    report["table"] = lines
    RESULTS.mkdir(exist_ok=True)
    setting = "" if args.config.parent.name == "configs" else f"_{args.config.parent.name}"  # configs/further/...
    output = args.output or RESULTS / f"influence_{config.task.name}{setting}.json"
    report["untrained"], report["bank_limit"] = args.untrained, args.bank_limit
    output.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

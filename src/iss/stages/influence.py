"""The influence stage: every pool document's influence on each task sample, from the warmed-up model's
gradients at one layer (:class:`iss.influence.InfluenceScorer`), kept as each task sample's top candidates."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from iss.config.schema import fingerprint_dump
from iss.influence.ray_scoring import ray_score_pool
from iss.influence.scorer import InfluenceScorer
from iss.retrieval.bm25 import query_order, read_hits, read_pool
from iss.runs.folder import StageResult
from iss.stages.context import StageContext
from iss.stages.inputs import task, tokenizer
from iss.stages.plan import influence_stage
from iss.stages.price import FORWARD_SHARE, Price, Workload
from iss.stages.retrieval import retrieval
from iss.stages.warmup import warmup

# influence per candidate in forward passes (bench_influence on the default model): 3.41 per document, 2.06 at
# Table A.1's B_p = 4 / B_t = 8, where a unit's gradient is shared by its documents
INFLUENCE_SHARE = {"per document": 3.4 * FORWARD_SHARE, "batched": 2.1 * FORWARD_SHARE}


def influence(context: StageContext) -> StageResult:
    config = context.config
    settings = config.influence
    context.check_layer()
    retrieved, warmed_up, tokenizer_stage = retrieval(context), warmup(context), tokenizer(context)
    name = influence_stage(settings)

    def body(folder: Path, summary: dict) -> None:
        task_data = task(context)
        scorer = InfluenceScorer.from_pretrained(
            warmed_up.path / "model", tokenizer_stage.path, settings,
            seed=config.seed, max_length=config.model.max_length, device=context.device,
        )  # fmt: skip
        pool = read_pool(retrieved.path, ["corpus_id", "text"])
        pool_texts = pool.column("text").to_pylist()
        split = settings.task_split
        task_texts = task_data.texts(split)
        with context.progress(len(task_texts), "task gradients") as bar:
            scorer.fit(
                task_texts,
                task_data.label_ids(split),
                task_data.splits[split].column("id").to_pylist(),
                candidate_probe=pool_texts,
                progress=bar.update,
            )
        pool_ids = pool.column("corpus_id").to_numpy()
        order = None
        if settings.pool_batch > 1 and settings.pool_grouping == "query":
            order = query_order(read_hits(retrieved.path), pool_ids)
        with context.progress(pool.num_rows, "influence") as bar:
            runner = partial(ray_score_pool, config=config.ray) if config.backend == "ray" else None
            result = scorer.score(
                pool_texts, pool_ids, context.run.work_dir(name) / "topk.npz", bar.update, runner, order
            )
        result.save(folder)
        summary.update({**scorer.summary(), **result.summary(), "pool_docs": pool.num_rows})

    parts = {
        "influence": fingerprint_dump(settings),
        "precision": config.precision,
        "seed": config.seed,
        "max_length": config.model.max_length,
        "retrieval": retrieved.fingerprint,
        "warmup": warmed_up.fingerprint,
    }
    return context.stage(name, parts, body)


def price(work: Workload) -> Price:
    """Each influence stage the plan reads: the pool's candidate passes (per document or batched) and one
    forward pass over the task's dev split (its gradients)."""
    settings = work.plan.influence_settings()
    tokens = sum(
        int(work.pool_lengths.sum()) * INFLUENCE_SHARE["batched" if each.pool_batch > 1 else "per document"]
        + work.split_tokens["dev"]
        for each in settings
    )
    return Price("influence", len(settings), {"joint": tokens})

"""Influence scoring on Ray Data: the pool's shards scored by workers that each hold the fitted
scorer, merged into the same top-k as a local run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iss.config.schema import RayConfig
from iss.influence.scorer import InfluenceScorer, Progress, ScorerRecipe
from iss.modeling.precision import precision
from iss.retrieval.ray_bm25 import start_ray
from iss.retrieval.topk import TopK

# ------------------------------------------------------------------------------------------- influence


class _PoolShardScorer:
    """Actor holding the warmed-up model, the gradient machinery and the task bank; scores pool shards."""

    def __init__(self, recipe: ScorerRecipe, bank: Any, pool: Any, threads: int) -> None:
        import ray

        torch.set_num_threads(threads)
        self.precision = recipe.precision
        self.scorer = InfluenceScorer.from_recipe(recipe, ray.get(bank))
        self.texts, self.ids, self.units = ray.get(pool)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"start": []}
        for start in batch["start"]:
            with precision(self.precision):
                top = self.scorer.score_shard(self.texts, self.ids, self.units, int(start))
            out["start"].append(int(start))
            for name, values in top.state().items():
                out.setdefault(name, []).append(values)
        return out


def ray_score_pool(
    scorer: InfluenceScorer,
    texts: list[str],
    ids: np.ndarray,
    units: list[np.ndarray],
    checkpoint: Path | None,
    config: RayConfig,
    progress: Progress | None = None,
) -> TopK:
    """Influence top-k per task unit, pool shards scored by Ray actors rebuilt from the scorer's recipe and
    merged here (resumable per shard)."""
    import ray

    start_ray(config)
    checkpoint = checkpoint.with_name(f"{checkpoint.stem}-ray{checkpoint.suffix}") if checkpoint else None
    state = scorer.checkpoint(checkpoint, units, progress)
    starts = [start for start in scorer.shard_starts(len(units)) if start not in state.done]
    if not starts:
        return state.top
    scored = ray.data.from_items([{"start": start} for start in starts]).map_batches(
        _PoolShardScorer,
        fn_constructor_kwargs={
            # an actor with a GPU of its own scores on it, whatever device the driver uses
            "recipe": replace(scorer.recipe(), device="cuda") if config.gpus_per_worker else scorer.recipe(),
            "bank": ray.put(scorer.bank),
            "pool": ray.put((texts, ids, units)),
            "threads": max(1, int(config.cpus_per_worker)),
        },
        batch_size=1,
        concurrency=config.workers,
        num_cpus=config.cpus_per_worker,
        num_gpus=config.gpus_per_worker or None,
    )
    shard = scorer.settings.shard_units
    for row in scored.iter_rows():
        start = int(row["start"])
        state.add(start, TopK.from_state({name: np.asarray(value) for name, value in row.items() if name != "start"}))
        if progress:
            progress(int(sum(len(g) for g in units[start : start + shard])))
    return state.top

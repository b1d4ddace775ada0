"""ISS's influence of corpus samples on task samples (Eq. 6 of the paper, with mini-batch matching), as one object.

``InfluenceScorer`` is built from a (warmed-up) model, the parameter group to measure at and the influence
settings. ``fit`` takes the task samples and keeps the gradients of their task loss, B_t samples to a unit
(the "bank"); ``score`` streams candidate documents, B_p to a unit, takes the gradient of their MLM loss and keeps,
for every task unit, the k candidate units whose gradients align best (an :class:`InfluenceResult`). The two
losses and the similarity are methods of the scorer, so changing the influence formula touches one place;
``gradients`` holds the per-sample gradient math only. The Ray backend rebuilds the scorer on each worker from
:meth:`InfluenceScorer.recipe` (paths and settings), so a worker scores exactly as the local backend does.

    scorer = InfluenceScorer.from_pretrained("runs/x/warmup/model", "runs/x/tokenizer", InfluenceConfig(top_k=50))
    result = scorer.fit(task_texts, task_labels).score(pool_texts, pool_ids)
    result.save("runs/x/influence")
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch
from transformers import PreTrainedTokenizerFast

from iss.config.schema import InfluenceConfig
from iss.influence.gradients import GradientFeatures, GroupGradients, LowRank, group_mean_scores
from iss.modeling.batches import Batch, candidate_batch, labelled_batch, per_sample_lm_loss, per_sample_task_loss
from iss.modeling.model import TaskModel, parameter_group
from iss.modeling.precision import current_precision
from iss.modeling.tokenizer import load_tokenizer
from iss.retrieval.topk import TopK, TopKCheckpoint

log = logging.getLogger("iss")
Progress = Callable[[int], None]
# scores a pool's shards somewhere else and merges them: (scorer, texts, ids, units, checkpoint, progress=) -> TopK
ShardRunner = Callable[..., TopK]


def seeded_groups(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Mini-batches for matching: consecutive chunks of a seeded permutation of 0..n-1."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[start : start + size] for start in range(0, n, size)]


def _group_chunks(groups: list[np.ndarray], compute_batch: int) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
    """Whole groups packed into compute batches: (first group index, rows, groups re-indexed into rows)."""
    start = 0
    while start < len(groups):
        stop, size = start, 0
        while stop < len(groups) and (size == 0 or size + len(groups[stop]) <= compute_batch):
            size += len(groups[stop])
            stop += 1
        rows = np.concatenate(groups[start:stop])
        offsets = np.cumsum([0] + [len(g) for g in groups[start:stop]])
        local = [np.arange(offsets[i], offsets[i + 1]) for i in range(stop - start)]
        yield start, rows, local
        start = stop


@dataclass
class InfluenceResult:
    """The top-k candidate units per task unit, with what the units are made of; owns the artifact format.

    ``top.ids[t]`` are task unit t's best candidate units (best first), ``top.scores[t]`` their influence;
    ``task_units[t]`` the task sample ids of unit t, ``pool_units[u]`` the corpus ids of candidate unit u, and
    ``unit_means[u]`` unit u's mean score over all task units (NaN if never scored).
    """

    top: TopK
    task_units: list[list]
    pool_units: list[list[int]]
    unit_means: np.ndarray

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        k = self.top.k
        pq.write_table(
            pa.table(
                {
                    "scores": pa.FixedSizeListArray.from_arrays(self.top.scores.ravel(), k),
                    "units": pa.FixedSizeListArray.from_arrays(self.top.ids.ravel(), k),
                }
            ),
            folder / "topk.parquet",
        )
        pq.write_table(
            pa.table({"task_unit": range(len(self.task_units)), "task_ids": self.task_units}),
            folder / "task_units.parquet",
        )
        pq.write_table(
            pa.table({"unit": range(len(self.pool_units)), "corpus_ids": self.pool_units}),
            folder / "pool_units.parquet",
        )
        pq.write_table(
            pa.table({"unit": range(len(self.unit_means)), "mean_score": self.unit_means}),
            folder / "unit_scores.parquet",
        )

    @classmethod
    def load(cls, folder: str | Path) -> InfluenceResult:
        folder = Path(folder)
        top = pq.read_table(folder / "topk.parquet")
        ids = np.asarray(top.column("units").to_pylist(), np.int64)
        scores = np.asarray(top.column("scores").to_pylist(), np.float32)
        means = folder / "unit_scores.parquet"
        pool_units = pq.read_table(folder / "pool_units.parquet").column("corpus_ids").to_pylist()
        return cls(
            TopK(ids.reshape(len(ids), -1), scores.reshape(len(scores), -1)),
            pq.read_table(folder / "task_units.parquet").column("task_ids").to_pylist(),
            pool_units,
            pq.read_table(means).column("mean_score").to_numpy()
            if means.is_file()
            else np.full(len(pool_units), np.nan),
        )

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / "topk.parquet").is_file()

    def best_scores(self) -> dict[int, float]:
        """First corpus id of each ranked candidate unit -> its best kept score over all task units."""
        kept = self.top.ids >= 0
        best = np.full(len(self.pool_units), -np.inf)
        np.maximum.at(best, self.top.ids[kept], self.top.scores[kept].astype(np.float64))
        return {self.pool_units[unit][0]: float(best[unit]) for unit in np.flatnonzero(np.isfinite(best))}

    def summary(self) -> dict[str, Any]:
        return {
            "task_units": len(self.task_units),
            "pool_units": len(self.pool_units),
            "distinct_candidates_ranked": int(np.unique(self.top.ids[self.top.ids >= 0]).size),
        }


@dataclass(frozen=True)
class ScorerRecipe:
    """What rebuilds an :class:`InfluenceScorer` anywhere (paths and settings, no objects): the Ray workers' copy."""

    model_path: str
    tokenizer_path: str
    settings: dict[str, Any]
    seed: int
    max_length: int
    device: str
    low_rank: tuple[str, ...] = field(default=())
    precision: str = "fp32"


@runtime_checkable
class InfluenceObjective(Protocol):
    """What influence differentiates, as kronfluence's ``Task`` supplies it: a per-sample loss for candidates and
    one for task samples, each a [batch] tensor the scorer takes per-sample gradients of. Give your own to
    :class:`InfluenceScorer` for another model head or task loss (a regression task, a margin loss, ...)."""

    def candidate_loss(self, model: TaskModel, batch: Batch) -> torch.Tensor: ...

    def task_loss(self, model: TaskModel, batch: Batch) -> torch.Tensor: ...


class LanguageModelObjective:
    """The paper's objective, for both families: a candidate's language-modelling loss (MLM for an encoder,
    next-token for a causal LM: what pretraining on it descends) against a task sample's classification loss."""

    def candidate_loss(self, model: TaskModel, batch: Batch) -> torch.Tensor:
        return per_sample_lm_loss(model, batch)

    def task_loss(self, model: TaskModel, batch: Batch) -> torch.Tensor:
        return per_sample_task_loss(model, batch)


class InfluenceScorer:
    """Influence of candidate documents (their LM loss) on task samples (their task loss) at one parameter group;
    ``objective`` swaps both losses (:class:`InfluenceObjective`)."""

    def __init__(
        self,
        model: TaskModel,
        tokenizer: PreTrainedTokenizerFast,
        settings: InfluenceConfig | None = None,
        *,
        seed: int = 0,
        max_length: int = 128,
        device: str | torch.device = "cpu",
        paths: tuple[str, str] | None = None,
        objective: InfluenceObjective | None = None,
    ) -> None:
        self.settings = settings or InfluenceConfig()
        self.objective = objective or LanguageModelObjective()
        self.tokenizer = tokenizer
        self.seed = seed
        self.max_length = max_length
        self.device = torch.device(device)
        self.paths = paths  # (model, tokenizer) folders it was loaded from: what a Ray worker reloads
        self.model = model.to(self.device).eval()
        self.group_name, group = parameter_group(self.model, self.settings.layer)
        self.grads = GroupGradients(self.model, group)
        if self.settings.projection_dim:
            self.grads.project(self.settings.projection_dim, self.settings.projection, seed)
        self.bank: GradientFeatures | None = None
        self.task_units: list[list] = []

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        tokenizer_path: str | Path | None = None,
        settings: InfluenceConfig | None = None,
        **options: Any,
    ) -> InfluenceScorer:
        """A scorer over a saved iss model (``TaskModel.save``) and tokenizer (default: the model folder)."""
        tokenizer_path = tokenizer_path or model_path
        model = TaskModel.load(str(model_path))
        tokenizer = load_tokenizer(tokenizer_path, model.family)
        return cls(model, tokenizer, settings, paths=(str(model_path), str(tokenizer_path)), **options)

    @classmethod
    def from_recipe(cls, recipe: ScorerRecipe, bank: GradientFeatures) -> InfluenceScorer:
        settings = InfluenceConfig(**recipe.settings)
        scorer = cls.from_pretrained(
            recipe.model_path, recipe.tokenizer_path, settings,
            seed=recipe.seed, max_length=recipe.max_length, device=recipe.device,
        )  # fmt: skip
        scorer.grads.low_rank = {m for name, m in scorer.grads.group.named_modules() if name in recipe.low_rank}
        scorer.bank = bank
        return scorer

    def recipe(self) -> ScorerRecipe:
        if self.paths is None:
            raise ValueError("a scorer built from an in-memory model cannot be rebuilt elsewhere: use from_pretrained")
        if not isinstance(self.objective, LanguageModelObjective):
            raise ValueError("a scorer with its own objective scores in this process: use the local backend")
        return ScorerRecipe(
            *self.paths,
            settings=self.settings.model_dump(mode="json"),
            seed=self.seed,
            max_length=self.max_length,
            device=str(self.device),
            low_rank=self.low_rank_modules,
            precision=current_precision(),
        )

    @property
    def low_rank_modules(self) -> tuple[str, ...]:
        return tuple(sorted(n for n, m in self.grads.group.named_modules() if m in self.grads.low_rank))

    # ----------------------------------------------------------------- the influence formula, in one place

    def task_features(self, batch: Batch, groups: list[np.ndarray]) -> GradientFeatures:
        """Task-loss gradients of B_t-sample units (cosine: each sample normalised before the unit mean)."""
        features = self.grads.compute(self.objective.task_loss, batch.to(self.device))
        if self.settings.similarity == "cosine":
            features = features.normalised()
        return features if all(len(g) == 1 for g in groups) else features.group_mean(groups)

    def candidate_scores(self, batch: Batch, groups: list[np.ndarray]) -> torch.Tensor:
        """[candidate units, task units] influence: each candidate sample's gradient against the bank (divided by
        its norm for cosine), averaged over the B_p samples of a unit (= the unit's mean gradient)."""
        features = self.grads.compute(self.objective.candidate_loss, batch.to(self.device))
        scores = features.dot(self.bank)
        if self.settings.similarity == "cosine":
            scores /= features.norms().clamp(min=1e-12).unsqueeze(1)
        return scores if all(len(g) == 1 for g in groups) else group_mean_scores(scores, groups)

    # ----------------------------------------------------------------------------------------- fit, score

    def fit(
        self,
        texts: list[str],
        labels: np.ndarray | list[int],
        ids: list | None = None,
        candidate_probe: list[str] | None = None,
        progress: Progress | None = None,
        layout: Literal["auto", "dense", "low_rank"] = "auto",
    ) -> InfluenceScorer:
        """Keep the task-loss gradients of the task samples, B_t to a unit, in memory (the bank).

        Linear weight gradients are kept as token factors where that makes candidate x task dot products cheaper
        (``layout="auto"``, measured on ``candidate_probe``, a few candidate texts, default the task texts) or
        all dense / all factored (tests, benchmarks); the scores are exact in every layout.
        """
        settings, labels = self.settings, np.asarray(labels, np.int64)
        if not texts:
            raise ValueError("no task samples to take gradients of")
        groups = seeded_groups(len(texts), settings.task_batch, self.seed)
        if layout == "auto":
            probe = slice(0, settings.compute_batch)
            probe_texts = (candidate_probe or texts)[probe]
            self.grads.choose_low_rank(
                labelled_batch(self.tokenizer, texts[probe], labels[probe], self.max_length).to(self.device),
                candidate_batch(
                    self.model, self.tokenizer, probe_texts, np.arange(len(probe_texts)), settings.mlm_probability,
                    self.seed, self.max_length,
                ).to(self.device),
                settings.task_batch,
            )  # fmt: skip
        else:
            self.grads.low_rank = set() if layout == "dense" else set(self.grads.linears) - set(self.grads.projections)
        dense: torch.Tensor | None = None  # filled in place: peak memory is the bank plus one compute batch
        sparse_parts: list[list[sp.csr_matrix]] = []
        low_rank_parts: list[list[LowRank]] = []
        for first, rows, local in _group_chunks(groups, settings.compute_batch):
            batch = labelled_batch(self.tokenizer, [texts[i] for i in rows], labels[rows], self.max_length)
            features = self.task_features(batch, local)
            if dense is None:
                dense = features.dense.new_empty(len(groups), features.dense.shape[1])
            dense[first : first + len(local)] = features.dense
            sparse_parts.append(features.sparse)
            low_rank_parts.append(features.low_rank)
            if progress:
                progress(len(rows))
        assert dense is not None
        self.bank = GradientFeatures(
            dense,
            [sp.vstack(ms, format="csr") for ms in zip(*sparse_parts, strict=True)],
            [LowRank.stack(list(ms)) for ms in zip(*low_rank_parts, strict=True)],
        )
        ids = list(range(len(texts))) if ids is None else list(ids)
        self.task_units = [[ids[i] for i in group] for group in groups]
        return self

    def candidate_units(self, n: int, order: np.ndarray | None = None) -> list[np.ndarray]:
        """Candidate rows grouped B_p to a unit (the unit numbering every score refers to): consecutive rows of
        ``order`` (neighbours, e.g. BM25 order), or of a seeded permutation without one."""
        if order is None:
            return seeded_groups(n, self.settings.pool_batch, self.seed + 1)
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError("the candidate order must list every candidate row once")
        size = self.settings.pool_batch
        return [order[start : start + size] for start in range(0, n, size)]

    def score(
        self,
        texts: list[str],
        ids: np.ndarray | list[int],
        checkpoint: Path | None = None,
        progress: Progress | None = None,
        runner: ShardRunner | None = None,
        order: np.ndarray | None = None,
    ) -> InfluenceResult:
        """The top-k candidate units per task unit. A candidate's MLM mask is keyed by its id, so scores do not
        depend on batching. With a ``checkpoint`` path the running top-k is saved after each shard of
        ``shard_units`` units and a rerun skips the shards already merged; a ``runner`` scores the shards elsewhere
        (``iss.distributed.ray_score_pool``: on Ray workers).
        ``order`` (a permutation of the rows) makes units of neighbours under B_p > 1 (:meth:`candidate_units`).
        """
        if self.bank is None:
            raise ValueError("call fit(task texts, labels) before score()")
        ids = np.asarray(ids, np.int64)
        units = self.candidate_units(len(texts), order)
        if runner is not None:
            top = runner(self, texts, ids, units, checkpoint, progress=progress)
        else:
            state = self.checkpoint(checkpoint, units, progress)
            for start in self.shard_starts(len(units)):
                if start not in state.done:
                    state.add(start, self.score_shard(texts, ids, units, start, progress))
            top = state.top
        return InfluenceResult(top, self.task_units, [ids[u].tolist() for u in units], top.column_means(len(units)))

    def checkpoint(self, path: Path | None, units: list[np.ndarray], progress: Progress | None) -> TopKCheckpoint:
        """The running top-k (resumed from ``path`` if a previous run saved one; its units count as progress)."""
        state = TopKCheckpoint(path, self._running_top(len(units)))
        if state.done:
            shard = self.settings.shard_units
            scored = sum(len(g) for start in state.done for g in units[start : start + shard])
            log.info("influence: resuming at candidate unit %d of %d", scored, len(units))
            if progress:
                progress(int(scored))
        return state

    def _running_top(self, n_units: int) -> TopK:
        """An empty top-k list per task unit, k capped by the pool's units, keeping every unit's mean score."""
        return TopK.empty(len(self.bank), min(self.settings.top_k, n_units), track_means=True)

    def shard_starts(self, n_units: int) -> list[int]:
        """First unit of every shard: the resume points, and the work items of the Ray backend."""
        return list(range(0, n_units, self.settings.shard_units))

    def score_shard(
        self,
        texts: list[str],
        ids: np.ndarray,
        units: list[np.ndarray],
        shard_start: int,
        progress: Progress | None = None,
        merge_units: int = 512,
    ) -> TopK:
        """Top-k of one shard's candidate units (global unit ids) for every task unit; score blocks are merged
        at least ``merge_units`` units at a time, and at least 4 k (one top-k and sort of the k kept per block,
        not per compute batch: with k = 1000 and a 2,427-row bank, merging every 512 units took a sixth of the
        stage)."""
        settings = self.settings
        shard = units[shard_start : shard_start + settings.shard_units]
        top = self._running_top(len(units))
        merge_units = max(merge_units, 4 * top.k)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        for first, rows, local in _group_chunks(shard, settings.compute_batch):
            first += shard_start
            batch = candidate_batch(
                self.model, self.tokenizer, [texts[i] for i in rows], ids[rows], settings.mlm_probability, self.seed,
                self.max_length,
            )  # fmt: skip
            pending.append((self.candidate_scores(batch, local).cpu().numpy(), np.arange(first, first + len(local))))
            if sum(len(unit_ids) for _, unit_ids in pending) >= merge_units:
                top.update(*_stack(pending))
                pending = []
            if progress:
                progress(len(rows))
        if pending:
            top.update(*_stack(pending))
        return top

    def summary(self) -> dict[str, Any]:
        group = self.grads.group
        return {
            "layer": self.group_name,
            "group_parameters": sum(p.numel() for p in group.parameters()),
            "low_rank_modules": list(self.low_rank_modules),
            "projected_modules": sorted(n for n, m in group.named_modules() if m in self.grads.projections),
        }


def _stack(pending: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """[task units, candidate units] scores and the candidate unit ids of several score blocks."""
    return np.concatenate([scores for scores, _ in pending]).T, np.concatenate([ids for _, ids in pending])

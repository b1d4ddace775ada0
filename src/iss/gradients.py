"""Per-sample gradients at one parameter group, from one batched forward + backward, and their dot products.

The per-sample gradient of a Linear layer is the sum over tokens of outer(grad_output, input); of a LayerNorm,
the sums of grad_output * normalised input and of grad_output; of an Embedding, grad_output scattered onto the
rows of the token ids. Forward hooks keep each module's input and output, ``torch.autograd.grad`` gives the
gradient of the summed per-sample losses w.r.t. those outputs (rows of a batch do not interact, so row i of
that gradient is sample i's own), and the formulas above turn them into per-sample parameter gradients.
Only the chosen group's parameters require grad, so backward never goes below it.

Embedding gradients touch only the rows of the tokens a sample contains, so they are kept as sparse matrices;
everything else is dense. Influence (Eq. 6 of the paper) is then a sum of dense and sparse dot products.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from iss.model import Batch, TaskMLMModel, encode, mask_tokens, per_sample_mlm_loss, per_sample_task_loss

LossFn = Callable[[TaskMLMModel, Batch], torch.Tensor]
SUPPORTED = (nn.Linear, nn.LayerNorm, nn.Embedding)


@dataclass
class GradientFeatures:
    """Gradients of n samples (or sample groups) at one parameter group.

    ``dense`` holds the Linear/LayerNorm parameters flattened in ``named_parameters`` order, ``sparse`` one
    CSR matrix of shape [n, num_embeddings * dim] per Embedding module.
    """

    dense: torch.Tensor
    sparse: list[sp.csr_matrix]

    def __len__(self) -> int:
        return self.dense.shape[0]

    def dot(self, other: GradientFeatures) -> torch.Tensor:
        """Matrix of dot products, shape [len(self), len(other)]."""
        scores = self.dense @ other.dense.T
        for mine, theirs in zip(self.sparse, other.sparse, strict=True):
            scores += torch.from_numpy((mine @ theirs.T).toarray()).to(scores)
        return scores

    def group_mean(self, groups: list[np.ndarray]) -> GradientFeatures:
        """Gradients of batch-mean losses: the mean of the member samples' gradients, one row per group."""
        averager = _averaging_matrix(groups, len(self))
        dense_averager = torch.from_numpy(averager.toarray()).to(self.dense)
        return GradientFeatures(dense_averager @ self.dense, [(averager @ m).tocsr() for m in self.sparse])

    def flat(self) -> torch.Tensor:
        """Dense [n, D] copy of everything (for tests and small groups only)."""
        blocks = [self.dense] + [torch.from_numpy(m.toarray()).to(self.dense) for m in self.sparse]
        return torch.cat(blocks, dim=1)


def _averaging_matrix(groups: list[np.ndarray], n: int) -> sp.csr_matrix:
    rows = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    cols = np.concatenate(groups)
    weights = np.concatenate([np.full(len(g), 1.0 / len(g), dtype=np.float32) for g in groups])
    return sp.csr_matrix((weights, (rows, cols)), shape=(len(groups), n))


def group_mean_scores(scores: torch.Tensor, groups: list[np.ndarray]) -> torch.Tensor:
    """Average score rows over groups: the influence of a group's mean gradient is the mean of its rows'."""
    averager = torch.from_numpy(_averaging_matrix(groups, scores.shape[0]).toarray()).to(scores)
    return averager @ scores


class _Record:
    __slots__ = ("inputs", "output")

    def __init__(self) -> None:
        self.inputs: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


class GroupGradients:
    """Computes per-sample gradients of a loss at the parameters of one module (and its children)."""

    def __init__(self, model: TaskMLMModel, group: nn.Module) -> None:
        self.model = model
        self.group = group
        self.modules = [m for m in group.modules() if any(True for _ in m.parameters(recurse=False))]
        for module in self.modules:
            if not isinstance(module, SUPPORTED):
                raise ValueError(f"per-sample gradients are not supported for {type(module).__name__} parameters")
            if isinstance(module, nn.LayerNorm) and module.weight is None:
                raise ValueError("LayerNorm without affine parameters has nothing to differentiate")
        self._records = {module: _Record() for module in self.modules}
        self._batch_size = 0

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        previous = {p: p.requires_grad for p in self.model.parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for parameter in self.group.parameters():
            parameter.requires_grad_(True)
        handles = [m.register_forward_hook(self._capture) for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for parameter, flag in previous.items():
                parameter.requires_grad_(flag)

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        record = self._records[module]
        if record.output is not None:
            raise RuntimeError(f"{type(module).__name__} ran twice in one forward; per-sample hooks need one call")
        record.inputs = inputs[0].detach()
        if isinstance(module, nn.Embedding) and output.shape[0] == 1 and self._batch_size > 1:
            # BERT looks up positions once for the whole batch and broadcasts; expand so rows stay separate.
            record.inputs = record.inputs.expand(self._batch_size, *record.inputs.shape[1:])
            output = output.expand(self._batch_size, *output.shape[1:])
            record.output = output
            return output
        record.output = output
        return None

    def compute(self, loss_fn: LossFn, batch: Batch) -> GradientFeatures:
        """Per-sample gradients of ``loss_fn`` (which returns one loss per row) for every row of ``batch``."""
        for record in self._records.values():
            record.inputs = record.output = None
        self._batch_size = batch.input_ids.shape[0]
        with self._hooks(), torch.enable_grad():
            losses = loss_fn(self.model, batch)
            outputs = [self._records[m].output for m in self.modules]
            if any(o is None for o in outputs):
                raise RuntimeError("a module of the chosen group did not run in the forward pass")
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        dense, sparse = [], []
        for module, grad in zip(self.modules, grads, strict=True):
            record = self._records[module]
            grad = torch.zeros_like(record.output) if grad is None else grad
            if isinstance(module, nn.Embedding):
                sparse.append(_embedding_grads(module, record.inputs, grad))
            else:
                dense.extend(_dense_grads(module, record.inputs, grad))
            record.inputs = record.output = None
        return GradientFeatures(torch.cat(dense, dim=1).float(), sparse)


def _dense_grads(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample [B, numel] gradients of a Linear or LayerNorm, in ``named_parameters`` order."""
    batch = grad.shape[0]
    grad = grad.reshape(batch, -1, grad.shape[-1])
    inputs = inputs.reshape(batch, -1, inputs.shape[-1])
    if isinstance(module, nn.Linear):
        parts = [torch.einsum("bto,bti->boi", grad, inputs).reshape(batch, -1)]
    else:
        normalised = nn.functional.layer_norm(inputs, module.normalized_shape, eps=module.eps)
        parts = [(grad * normalised).sum(1)]
    if module.bias is not None:
        parts.append(grad.sum(1))
    return parts


def _embedding_grads(module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor) -> sp.csr_matrix:
    """Per-sample embedding gradients as CSR [B, num_embeddings * dim] (padding rows get no gradient)."""
    batch, dim = grad.shape[0], grad.shape[-1]
    ids = ids.reshape(batch, -1)
    grad = grad.reshape(batch, -1, dim)
    rows = torch.arange(batch).unsqueeze(1).expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    keys = rows[keep] * module.num_embeddings + ids[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.numel(), dim, dtype=torch.float32).index_add_(0, inverse, grad[keep].float())
    sample = (unique // module.num_embeddings).numpy()
    token = (unique % module.num_embeddings).numpy()
    cols = (token[:, None] * dim + np.arange(dim)[None, :]).ravel()
    indptr = np.searchsorted(sample, np.arange(batch + 1)) * dim
    return sp.csr_matrix((summed.numpy().ravel(), cols, indptr), shape=(batch, module.num_embeddings * dim))


# ------------------------------------------------------------------------------------ influence scoring


@dataclass
class TopK:
    """Running top-k candidate units per task unit; memory is [task units, k] whatever the pool size."""

    scores: torch.Tensor
    units: torch.Tensor

    @classmethod
    def empty(cls, n_task_units: int, k: int) -> TopK:
        return cls(torch.full((n_task_units, k), -torch.inf), torch.full((n_task_units, k), -1, dtype=torch.long))

    def update(self, scores: torch.Tensor, unit_ids: torch.Tensor) -> None:
        """Merge a [candidate units, task units] score block into the running lists."""
        all_scores = torch.cat([self.scores, scores.T.to(self.scores)], dim=1)
        all_units = torch.cat([self.units, unit_ids.expand(self.units.shape[0], -1)], dim=1)
        k = self.scores.shape[1]
        top = torch.topk(all_scores, min(k, all_scores.shape[1]), dim=1)
        self.scores = torch.full_like(self.scores, -torch.inf)
        self.units = torch.full_like(self.units, -1)
        self.scores[:, : top.values.shape[1]] = top.values
        self.units[:, : top.values.shape[1]] = torch.gather(all_units, 1, top.indices)


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


def task_gradient_bank(
    grads: GroupGradients,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    label_ids: np.ndarray,
    groups: list[np.ndarray],
    compute_batch: int,
    max_length: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> GradientFeatures:
    """Task-loss gradients of every task group (B_t samples; one row per group), held in memory.

    The dense bank is filled in place, so peak memory is the bank plus one compute batch, not twice the bank.
    """
    dense: torch.Tensor | None = None
    sparse_parts: list[list[sp.csr_matrix]] = []
    for first, rows, local in _group_chunks(groups, compute_batch):
        batch = encode(tokenizer, [texts[i] for i in rows], max_length)
        batch.labels = torch.from_numpy(label_ids[rows])
        features = grads.compute(per_sample_task_loss, batch.to(device))
        if not all(len(g) == 1 for g in local):
            features = features.group_mean(local)
        if dense is None:
            dense = features.dense.new_empty(len(groups), features.dense.shape[1])
        dense[first : first + len(local)] = features.dense
        sparse_parts.append(features.sparse)
        if progress:
            progress(len(rows))
    if dense is None:
        raise ValueError("no task samples to take gradients of")
    sparse = [sp.vstack(ms, format="csr") for ms in zip(*sparse_parts, strict=True)]
    return GradientFeatures(dense, sparse)


def score_pool(
    grads: GroupGradients,
    tokenizer: PreTrainedTokenizerFast,
    bank: GradientFeatures,
    pool_texts: list[str],
    pool_keys: np.ndarray,
    unit_groups: list[np.ndarray],
    top_k: int,
    compute_batch: int,
    mlm_probability: float,
    seed: int,
    max_length: int,
    device: torch.device,
    state_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
    checkpoint_seconds: float = 30.0,
) -> TopK:
    """Stream candidate units (B_p documents each) against the task bank, keeping the top-k per task unit.

    A candidate's MLM mask is keyed by ``pool_keys`` (its corpus id), so scores do not depend on batching.
    With ``state_path`` the running top-k is saved every ``checkpoint_seconds`` (and at the end), and a rerun
    resumes from the last save.
    """
    top = TopK.empty(len(bank), min(top_k, len(unit_groups)))
    resume_from, saved_at = 0, time.monotonic()
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        top, resume_from = TopK(state["scores"], state["units"]), int(state["next_unit"])
        if progress:
            progress(int(sum(len(g) for g in unit_groups[:resume_from])))
    for first, rows, local in _group_chunks(unit_groups[resume_from:], compute_batch):
        first += resume_from
        batch = encode(tokenizer, [pool_texts[i] for i in rows], max_length)
        batch = mask_tokens(batch, tokenizer, mlm_probability, seed, pool_keys[rows].tolist())
        features = grads.compute(per_sample_mlm_loss, batch.to(device))
        scores = features.dot(bank)
        if not all(len(g) == 1 for g in local):
            scores = group_mean_scores(scores, local)
        top.update(scores.cpu(), torch.arange(first, first + len(local)))
        done = first + len(local)
        if state_path is not None and (time.monotonic() - saved_at > checkpoint_seconds or done == len(unit_groups)):
            tmp = state_path.with_suffix(".tmp")
            torch.save({"scores": top.scores, "units": top.units, "next_unit": done}, tmp)
            os.replace(tmp, state_path)
            saved_at = time.monotonic()
        if progress:
            progress(len(rows))
    return top

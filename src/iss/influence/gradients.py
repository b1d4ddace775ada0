"""Per-sample gradients at one parameter group, from one batched forward + backward, and their dot products.

The per-sample gradient of a Linear layer (or GPT-2's Conv1D, its transpose) is the sum over tokens of
outer(grad_output, input); of a LayerNorm or RMSNorm, the sums of grad_output * normalised input (and of
grad_output for a bias); of an Embedding, grad_output scattered onto the rows of the token ids. Forward hooks
keep each module's input and output, ``torch.autograd.grad`` gives the gradient of the summed per-sample losses
w.r.t. those outputs (rows of a batch do not interact, so row i of that gradient is sample i's own), and the
formulas above turn them into per-sample parameter gradients.
Only the chosen group's parameters require grad, so backward never goes below it.

Embedding gradients touch only the rows of the tokens a sample contains, so they are kept as sparse matrices;
everything else is dense. Influence (Eq. 6 of the paper) is then a sum of dense and sparse dot products.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from iss.errors import ConfigError
from iss.modeling.batches import Batch, per_sample_lm_loss, per_sample_task_loss
from iss.modeling.model import TaskModel
from iss.modeling.precision import forward_autocast

log = logging.getLogger("iss")
LossFn = Callable[[TaskModel, Batch], torch.Tensor]
LINEAR = (nn.Linear, Conv1D)  # Conv1D (GPT-2) is a Linear layer with its weight stored as [in, out]
RANK_ONE_TOLERANCE = 1e-5  # relative residual under which a head's gradient block counts as rank one


@dataclass
class LowRank:
    """Per-sample gradients of one Linear weight kept as token factors.

    Sample i's gradient is the sum, over the rows r with ``owner[r] == i``, of outer(grad_out[r], inputs[r]).
    Only tokens with a non-zero output gradient are kept: the task loss reads [CLS] alone, so in the last block's
    feed-forward and output layers a task sample has one row, and a candidate one row per masked token. A dot
    product then costs rows x rows x (in + out) instead of in x out, and is still exact.
    """

    grad_out: torch.Tensor
    inputs: torch.Tensor
    owner: torch.Tensor
    n: int
    head: torch.Tensor | None = None  # per row: the attention head whose block of grad_out holds it, -1 = all
    head_size: int = 0

    @classmethod
    def from_tokens(cls, inputs: torch.Tensor, grad: torch.Tensor) -> LowRank:
        batch = grad.shape[0]
        grad = grad.reshape(batch, -1, grad.shape[-1]).float()
        inputs = inputs.reshape(batch, -1, inputs.shape[-1]).float()
        keep = grad.ne(0).any(-1)
        owner = torch.arange(batch, device=grad.device).unsqueeze(1).expand_as(keep)[keep]
        return cls(grad[keep], inputs[keep], owner, batch)

    @classmethod
    def from_head_blocks(cls, inputs: torch.Tensor, grad: torch.Tensor, heads: int) -> LowRank:
        """Factors of an attention key or value projection: one row per head where that is exact, else per token.

        When a loss reads one position of a block's output ([CLS] for the task loss), the key and value gradients
        of head h come through that one query row: dK_h = outer(u_h, v_h) over the sequence (softmax gradient
        times the query for keys, attention probability times the context gradient for values). The weight
        gradient of head h's output rows is then outer(v_h, X^T u_h): one row per head instead of one per token.
        Each (sample, head) block is factored from its largest row and checked; a sample whose blocks are not
        rank one to float32 rounding (a candidate with several masked tokens, a lower block) keeps its token
        rows, so the result is exact either way.
        """
        batch, out = grad.shape[0], grad.shape[-1]
        grad = grad.reshape(batch, -1, out).float()
        inputs = inputs.reshape(batch, -1, inputs.shape[-1]).float()
        head_size = out // heads
        blocks = grad.reshape(batch, -1, heads, head_size).transpose(1, 2)  # [batch, heads, tokens, head_size]
        pivot = blocks.norm(dim=-1).argmax(-1)
        direction = blocks.gather(2, pivot[..., None, None].expand(-1, -1, 1, head_size)).squeeze(2)
        direction_norm = direction.pow(2).sum(-1, keepdim=True)
        weights = (blocks @ direction.unsqueeze(-1)).squeeze(-1) / direction_norm.clamp(min=torch.finfo().tiny)
        residual = (blocks - weights.unsqueeze(-1) * direction.unsqueeze(-2)).pow(2).sum((-2, -1))
        energy = blocks.pow(2).sum((-2, -1))
        rank_one = (residual <= RANK_ONE_TOLERANCE**2 * energy).all(1)
        head_out = grad.new_zeros(batch, heads, heads, head_size)
        head_out[:, torch.arange(heads), torch.arange(heads)] = direction  # head h's rows of the output only
        keep_heads = rank_one.unsqueeze(1) & energy.gt(0)
        keep_tokens = ~rank_one.unsqueeze(1) & grad.ne(0).any(-1)
        keep = torch.cat([keep_heads, keep_tokens], 1)  # per sample: heads first, then tokens (owner order holds)
        rows_out = torch.cat([head_out.reshape(batch, heads, out), grad], 1)[keep]
        rows_in = torch.cat([weights @ inputs, inputs], 1)[keep]
        owner = torch.arange(batch, device=grad.device).unsqueeze(1).expand_as(keep)[keep]
        row_head = torch.cat([torch.arange(heads), torch.full((keep.shape[1] - heads,), -1)]).to(grad.device)
        return cls(rows_out, rows_in, owner, batch, row_head.expand_as(keep)[keep], head_size)

    @classmethod
    def stack(cls, parts: list[LowRank]) -> LowRank:
        offsets = np.cumsum([0] + [p.n for p in parts])
        headed = any(p.head is not None for p in parts)
        return cls(
            torch.cat([p.grad_out for p in parts]),
            torch.cat([p.inputs for p in parts]),
            torch.cat([p.owner + int(o) for p, o in zip(parts, offsets, strict=False)]),
            int(offsets[-1]),
            torch.cat([p.row_heads() for p in parts]) if headed else None,
            max(p.head_size for p in parts),
        )

    def row_heads(self) -> torch.Tensor:
        return torch.full_like(self.owner, -1) if self.head is None else self.head

    def dot(self, other: LowRank, chunk_rows: int = 8192) -> torch.Tensor:
        """[self.n, other.n] dot products: sum over row pairs of (a . a') * (x . x'). A row of one head's block
        is multiplied on that block only (head_size of the output columns, not all of them)."""
        if self.head is not None and other.head is None:
            return other.dot(self, chunk_rows).T
        scores = self.grad_out.new_zeros(self.n, other.n)
        for rows, columns in other._row_parts(chunk_rows):
            products = (self.grad_out[:, columns] @ other.grad_out[rows, columns].T) * (
                self.inputs @ other.inputs[rows].T
            )
            per_sample = products.new_zeros(self.n, products.shape[1]).index_add_(0, self.owner, products)
            scores.index_add_(1, other.owner[rows], per_sample)
        return scores

    def _row_parts(self, chunk_rows: int) -> Iterator[tuple[slice | torch.Tensor, slice]]:
        """Chunks of at most ``chunk_rows`` rows, each with the output columns its rows can be non-zero in."""
        if self.head is None:
            for start in range(0, self.owner.numel(), chunk_rows):
                yield slice(start, start + chunk_rows), slice(None)
            return
        for head in self.head.unique().tolist():
            rows = (self.head == head).nonzero().squeeze(1)
            columns = slice(None) if head < 0 else slice(head * self.head_size, (head + 1) * self.head_size)
            for start in range(0, rows.numel(), chunk_rows):
                yield rows[start : start + chunk_rows], columns

    def group_mean(self, groups: list[np.ndarray]) -> LowRank:
        """Factors of the groups' mean gradients: member rows re-owned by their group, scaled by 1/size."""
        group_of, weight = np.zeros(self.n, np.int64), np.zeros(self.n, np.float32)
        for index, members in enumerate(groups):
            group_of[members], weight[members] = index, 1.0 / len(members)
        owner = self.owner.cpu().numpy()
        scale = torch.from_numpy(weight[owner]).to(self.grad_out).unsqueeze(1)
        return replace(
            self, grad_out=self.grad_out * scale, owner=torch.from_numpy(group_of[owner]).to(self.owner), n=len(groups)
        )

    def squared_norms(self) -> torch.Tensor:
        """[n] squared Frobenius norms of the samples' gradients, from the factors: sum over each sample's row
        pairs of (a . a') * (x . x'). Rows are grouped by owner (they come in owner order)."""
        norms = self.grad_out.new_zeros(self.n)
        bounds = torch.searchsorted(self.owner, torch.arange(self.n + 1, device=self.owner.device)).tolist()
        for sample, (start, stop) in enumerate(itertools.pairwise(bounds)):
            if stop > start:
                grad, inputs = self.grad_out[start:stop], self.inputs[start:stop]
                norms[sample] = ((grad @ grad.T) * (inputs @ inputs.T)).sum()
        return norms

    def scale_rows(self, factors: torch.Tensor) -> LowRank:
        """Each sample's gradient times its factor."""
        return replace(self, grad_out=self.grad_out * factors.to(self.grad_out)[self.owner].unsqueeze(1))

    def to_dense(self) -> torch.Tensor:
        """[n, out * in] explicit gradients (tests and reference checks only)."""
        outer = torch.einsum("ro,ri->roi", self.grad_out, self.inputs).reshape(self.owner.numel(), -1)
        return outer.new_zeros(self.n, outer.shape[1]).index_add_(0, self.owner, outer)


@dataclass
class GradientFeatures:
    """Gradients of n samples (or sample groups) at one parameter group.

    ``dense`` holds flattened Linear/LayerNorm parameters (or their random projections), ``low_rank`` the Linear
    weights kept as token factors, ``sparse`` one CSR matrix [n, num_embeddings * dim] per Embedding. Which
    parameter lands where is the :class:`GroupGradients` layout, the same for every batch it computes.
    """

    dense: torch.Tensor
    sparse: list[sp.csr_matrix]
    low_rank: list[LowRank]

    def __len__(self) -> int:
        return self.dense.shape[0]

    def dot(self, other: GradientFeatures) -> torch.Tensor:
        """Matrix of dot products, shape [len(self), len(other)]."""
        scores = self.dense @ other.dense.T
        for mine, theirs in zip(self.low_rank, other.low_rank, strict=True):
            scores += mine.dot(theirs)
        for mine, theirs in zip(self.sparse, other.sparse, strict=True):
            scores += torch.from_numpy((mine @ theirs.T).toarray()).to(scores)
        return scores

    def norms(self) -> torch.Tensor:
        """[n] L2 norms of the whole gradients (dense, factored and sparse parts together)."""
        squared = self.dense.pow(2).sum(1)
        for part in self.low_rank:
            squared += part.squared_norms()
        for matrix in self.sparse:
            squared += torch.from_numpy(np.asarray(matrix.multiply(matrix).sum(1)).ravel()).to(squared)
        return squared.sqrt()

    def normalised(self) -> GradientFeatures:
        """Every sample's gradient divided by its norm (cosine similarity is then a dot product)."""
        factors = 1.0 / self.norms().clamp(min=1e-12)
        diagonal = sp.diags(factors.cpu().numpy())
        return GradientFeatures(
            self.dense * factors.unsqueeze(1),
            [(diagonal @ m).tocsr() for m in self.sparse],
            [m.scale_rows(factors) for m in self.low_rank],
        )

    def group_mean(self, groups: list[np.ndarray]) -> GradientFeatures:
        """Gradients of batch-mean losses: the mean of the member samples' gradients, one row per group."""
        averager = _averaging_matrix(groups, len(self))
        dense_averager = torch.from_numpy(averager.toarray()).to(self.dense)
        return GradientFeatures(
            dense_averager @ self.dense,
            [(averager @ m).tocsr() for m in self.sparse],
            [m.group_mean(groups) for m in self.low_rank],
        )


def _averaging_matrix(groups: list[np.ndarray], n: int) -> sp.csr_matrix:
    rows = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    cols = np.concatenate(groups)
    weights = np.concatenate([np.full(len(g), 1.0 / len(g), dtype=np.float32) for g in groups])
    return sp.csr_matrix((weights, (rows, cols)), shape=(len(groups), n))


def group_mean_scores(scores: torch.Tensor, groups: list[np.ndarray]) -> torch.Tensor:
    """Average score rows over groups: the influence of a group's mean gradient is the mean of its rows'."""
    averager = torch.from_numpy(_averaging_matrix(groups, scores.shape[0]).toarray()).to(scores)
    return averager @ scores


@dataclass(frozen=True)
class Projection:
    """Seeded Kronecker random projection of one Linear weight's gradient: P_out^T G P_in, [k_out x k_in].

    Entries are Rademacher signs or Gaussians scaled by 1/sqrt(k), so projected dot products equal exact ones in
    expectation. The per-sample cost is two thin matmuls per token; no D x d matrix is ever built.
    """

    out_matrix: torch.Tensor
    in_matrix: torch.Tensor

    @classmethod
    def draw(cls, out_features: int, in_features: int, dim: int, kind: str, seed: list[int]) -> Projection:
        k_in = int(np.clip(round(np.sqrt(dim * in_features / out_features)), 1, in_features))
        k_out = int(np.clip(round(dim / k_in), 1, out_features))
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))

        def matrix(rows: int, cols: int) -> torch.Tensor:
            if kind == "gaussian":
                values = torch.randn(rows, cols, generator=generator)
            else:
                values = torch.randint(0, 2, (rows, cols), generator=generator).float() * 2 - 1
            return values / np.sqrt(cols)

        return cls(matrix(out_features, k_out), matrix(in_features, k_in))

    def apply(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        batch = grad.shape[0]
        grad = grad.reshape(batch, -1, grad.shape[-1]).float() @ self.out_matrix.to(grad.device)
        inputs = inputs.reshape(batch, -1, inputs.shape[-1]).float() @ self.in_matrix.to(grad.device)
        return torch.einsum("bto,bti->boi", grad, inputs).reshape(batch, -1)


class _Record:
    __slots__ = ("inputs", "output")

    def __init__(self) -> None:
        self.inputs: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


class GroupGradients:
    """Computes per-sample gradients of a loss at the parameters of one module (and its children).

    Each Linear weight is kept dense, as token factors (``low_rank``, see :meth:`choose_low_rank`) or randomly
    projected (``project``); everything else is exact.
    """

    def __init__(self, model: TaskModel, group: nn.Module) -> None:
        self.model = model
        self.group = group
        self.modules = [m for m in group.modules() if any(True for _ in m.parameters(recurse=False))]
        for module in self.modules:
            if not isinstance(module, (*LINEAR, nn.Embedding)) and _norm_kind(module) is None:
                raise ConfigError(f"per-sample gradients are not supported for {type(module).__name__} parameters")
        self.low_rank: set[nn.Module] = set()
        self.heads = _attention_heads(group)
        self.projections: dict[nn.Module, Projection] = {}
        self._records = {module: _Record() for module in self.modules}
        self._batch_size = 0

    @property
    def linears(self) -> list[nn.Module]:
        return [m for m in self.modules if isinstance(m, LINEAR)]

    def project(self, dim: int, kind: str, seed: int) -> None:
        """Randomly project Linear weight gradients to about ``dim`` numbers in all, shared out by size."""
        total = sum(m.weight.numel() for m in self.linears)
        self.projections = {}
        for index, module in enumerate(self.linears):
            share = max(1, round(dim * module.weight.numel() / total))
            if share < module.weight.numel():
                self.projections[module] = Projection.draw(*_shape(module), share, kind, [seed, index])
        self.low_rank -= set(self.projections)

    def choose_low_rank(self, task_batch: Batch, pool_batch: Batch, task_group_size: int = 1) -> None:
        """Keep a Linear weight as token factors where that makes candidate x task dot products cheaper.

        A factored dot costs (task unit rows) x (candidate rows) x (in + out), a dense one in x out; rows per
        sample are measured on one batch of each side (they follow from the model's wiring, not the text), and a
        task unit of B_t samples has B_t times as many.
        """
        task_rows = self._rows_per_sample(per_sample_task_loss, task_batch)
        pool_rows = self._rows_per_sample(per_sample_lm_loss, pool_batch)
        self.low_rank = {
            m
            for m in self.linears
            if m not in self.projections
            and task_rows[m] * task_group_size * pool_rows[m] * sum(_shape(m)) < m.weight.numel()
        }

    def _rows_per_sample(self, loss_fn: LossFn, batch: Batch) -> dict[nn.Module, float]:
        return {
            module: self._factors(module, inputs, grad).owner.numel() / grad.shape[0]
            for module, inputs, grad in self._backward(loss_fn, batch)
            if isinstance(module, LINEAR)
        }

    def _factors(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> LowRank:
        if module in self.heads:
            return LowRank.from_head_blocks(inputs, grad, self.heads[module])
        return LowRank.from_tokens(inputs, grad)

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

    def _backward(self, loss_fn: LossFn, batch: Batch) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """(module, its input, gradient of the summed per-sample losses w.r.t. its output) for every module."""
        for record in self._records.values():
            record.inputs = record.output = None
        self._batch_size = batch.input_ids.shape[0]
        with self._hooks(), torch.enable_grad():
            with forward_autocast(batch.input_ids.device):
                losses = loss_fn(self.model, batch)
            outputs = [self._records[m].output for m in self.modules]
            if any(o is None for o in outputs):
                raise RuntimeError("a module of the chosen group did not run in the forward pass")
            grads = torch.autograd.grad(losses.float().sum(), outputs, allow_unused=True)
        captured = []
        for module, grad in zip(self.modules, grads, strict=True):
            record = self._records[module]
            grad = torch.zeros_like(record.output) if grad is None else grad
            inputs = record.inputs.float() if record.inputs.is_floating_point() else record.inputs
            captured.append((module, inputs, grad.float()))  # per-sample gradients and dot products in float32
            record.inputs = record.output = None
        return captured

    def compute(self, loss_fn: LossFn, batch: Batch) -> GradientFeatures:
        """Per-sample gradients of ``loss_fn`` (which returns one loss per row) for every row of ``batch``."""
        dense, sparse, low_rank = [], [], []
        for module, inputs, grad in self._backward(loss_fn, batch):
            if isinstance(module, nn.Embedding):
                sparse.append(_embedding_grads(module, inputs, grad))
                continue
            if module in self.low_rank:
                low_rank.append(self._factors(module, inputs, grad))
            elif module in self.projections:
                dense.append(self.projections[module].apply(inputs, grad))
            explicit_weight = module not in self.low_rank and module not in self.projections
            dense.extend(_dense_grads(module, inputs, grad, explicit_weight))
        return GradientFeatures(torch.cat(dense, dim=1).float(), sparse, low_rank)

    def flatten(self, features: GradientFeatures) -> torch.Tensor:
        """Explicit [n, D] gradients in ``group.parameters()`` order (for checks against plain autograd)."""
        if self.projections:
            raise ValueError("projected gradients have no explicit form")
        pieces: dict[nn.Parameter, torch.Tensor] = {}
        offset, low_rank, sparse = 0, iter(features.low_rank), iter(features.sparse)
        for module in self.modules:
            if isinstance(module, nn.Embedding):
                pieces[module.weight] = torch.from_numpy(next(sparse).toarray()).to(features.dense)
                continue
            for name, parameter in module.named_parameters(recurse=False):
                if name == "weight" and module in self.low_rank:
                    pieces[parameter] = _weight_order(module, next(low_rank).to_dense())
                else:
                    pieces[parameter] = features.dense[:, offset : offset + parameter.numel()]
                    offset += parameter.numel()
        return torch.cat([pieces[p] for p in self.group.parameters()], dim=1)


def _attention_heads(group: nn.Module) -> dict[nn.Module, int]:
    """The key and value projections of the group's self-attention modules, each with its number of heads:
    BERT and its kin name them ``key`` and ``value`` beside ``num_attention_heads``; Llama and its kin
    ``k_proj`` and ``v_proj``, one head each per query head only without grouped-query attention (shared
    key/value heads are read by several query heads, so their blocks are not rank one)."""
    heads = {}
    for module in group.modules():
        count = getattr(module, "num_attention_heads", None)
        names = ("key", "value")
        config = getattr(module, "config", None)
        if count is None and getattr(module, "num_key_value_groups", None) == 1 and config is not None:
            count, names = config.num_attention_heads, ("k_proj", "v_proj")
        for name in names:
            projection = getattr(module, name, None)
            if isinstance(count, int) and isinstance(projection, nn.Linear) and projection.out_features % count == 0:
                heads[projection] = count
    return heads


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of a Linear or Conv1D."""
    return (module.out_features, module.in_features) if isinstance(module, nn.Linear) else module.weight.shape[::-1]


def _weight_order(module: nn.Module, flat: torch.Tensor) -> torch.Tensor:
    """[n, out * in] per-sample weight gradients in the parameter's own layout ([in, out] for Conv1D)."""
    if isinstance(module, nn.Linear):
        return flat
    out_features, in_features = _shape(module)
    return flat.reshape(-1, out_features, in_features).transpose(1, 2).reshape(flat.shape[0], -1)


def _norm_kind(module: nn.Module) -> str | None:
    """'layer' or 'rms' for a normalisation layer with a weight (torch's, or a model's own RMSNorm class), else None."""
    if getattr(module, "weight", None) is None:
        return None
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm"):
        return "rms"
    return None


def _normalised(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The input as the norm scales it, before its weight (and bias)."""
    if _norm_kind(module) == "layer":
        return nn.functional.layer_norm(inputs, module.normalized_shape, eps=module.eps)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or torch.finfo(inputs.dtype).eps
    return inputs * torch.rsqrt(inputs.pow(2).mean(-1, keepdim=True) + eps)


def _dense_grads(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor, weight: bool) -> list[torch.Tensor]:
    """Per-sample [B, numel] gradients of a Linear, Conv1D, LayerNorm or RMSNorm, in ``named_parameters`` order
    (the weight left out when it is kept elsewhere)."""
    batch = grad.shape[0]
    grad = grad.reshape(batch, -1, grad.shape[-1])
    inputs = inputs.reshape(batch, -1, inputs.shape[-1])
    parts = []
    if weight and isinstance(module, LINEAR):
        parts.append(_weight_order(module, torch.einsum("bto,bti->boi", grad, inputs).reshape(batch, -1)))
    elif weight:
        parts.append((grad * _normalised(module, inputs)).sum(1))
    if getattr(module, "bias", None) is not None:
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


def autograd_gradient(model: TaskModel, group: nn.Module, loss_fn: LossFn, batch: Batch) -> torch.Tensor:
    """Plain autograd of the batch-mean loss, each row run alone and unpadded, flattened in parameter order.

    The slow reference the hook path is checked against (tests) and timed against (benchmarks).
    """
    parameters = list(group.parameters())
    with torch.enable_grad():
        losses = []
        for row in range(batch.input_ids.shape[0]):
            length = int(batch.attention_mask[row].sum())
            single = Batch(
                batch.input_ids[row : row + 1, :length],
                batch.attention_mask[row : row + 1, :length],
                None if batch.lm_labels is None else batch.lm_labels[row : row + 1, :length],
                None if batch.labels is None else batch.labels[row : row + 1],
            )
            losses.append(loss_fn(model, single))
        grads = torch.autograd.grad(torch.cat(losses).mean(), parameters, allow_unused=True)
    return torch.cat(
        [torch.zeros(p.numel()) if g is None else g.reshape(-1) for p, g in zip(parameters, grads, strict=True)]
    )

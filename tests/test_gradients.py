"""The influence stage's dot products against plain per-sample autograd, and the streaming top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iss.gradients import GroupGradients, TopK, score_pool, seeded_groups, task_gradient_bank
from iss.model import (
    Batch,
    encode,
    mask_tokens,
    parameter_group,
    per_sample_mlm_loss,
    per_sample_task_loss,
)

MAX_LENGTH = 64
SEED = 7


def _reference_grad(model, group, loss_fn, batch: Batch) -> torch.Tensor:
    """Autograd of the batch-mean loss on the unpadded rows, flattened over the group's parameters."""
    model.zero_grad(set_to_none=True)
    losses = []
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[row].sum())
        single = Batch(
            batch.input_ids[row : row + 1, :length],
            batch.attention_mask[row : row + 1, :length],
            None if batch.mlm_labels is None else batch.mlm_labels[row : row + 1, :length],
            None if batch.labels is None else batch.labels[row : row + 1],
        )
        losses.append(loss_fn(model, single))
    torch.cat(losses).mean().backward()
    grads = []
    for parameter in group.parameters():
        grads.append(torch.zeros(parameter.numel()) if parameter.grad is None else parameter.grad.reshape(-1))
    return torch.cat(grads)


def _flat_in_parameter_order(features, group) -> torch.Tensor:
    """GradientFeatures keep dense modules first, embeddings after; reorder to ``group.parameters()``."""
    dense_modules = [
        m for m in group.modules() if list(m.parameters(recurse=False)) and not isinstance(m, torch.nn.Embedding)
    ]
    sparse_modules = [m for m in group.modules() if isinstance(m, torch.nn.Embedding)]
    pieces: dict[int, torch.Tensor] = {}
    offset = 0
    for module in dense_modules:
        for parameter in module.parameters(recurse=False):
            pieces[id(parameter)] = features.dense[:, offset : offset + parameter.numel()]
            offset += parameter.numel()
    for module, matrix in zip(sparse_modules, features.sparse, strict=True):
        pieces[id(module.weight)] = torch.from_numpy(matrix.toarray())
    return torch.cat([pieces[id(p)] for p in group.parameters()], dim=1)


def _pool_and_task(chemprot_texts, corpus_texts, tokenizer, n_pool=10, n_task=6):
    pool_texts = corpus_texts[:n_pool]
    pool_keys = np.arange(100, 100 + n_pool)
    task_texts = [t for t, _ in chemprot_texts[:n_task]]
    task_labels = np.arange(n_task) % 5
    return pool_texts, pool_keys, task_texts, task_labels


@pytest.mark.parametrize("layer", ["last", 1, "embeddings"])
def test_per_sample_gradients_equal_autograd(tiny_model, tokenizer, chemprot_texts, corpus_texts, layer):
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts, tokenizer)
    _, group = parameter_group(tiny_model, layer)
    grads = GroupGradients(tiny_model, group)

    pool_batch = mask_tokens(encode(tokenizer, pool_texts, MAX_LENGTH), tokenizer, 0.15, SEED, pool_keys)
    task_batch = encode(tokenizer, task_texts, MAX_LENGTH)
    task_batch.labels = torch.from_numpy(task_labels)

    for loss_fn, batch in ((per_sample_mlm_loss, pool_batch), (per_sample_task_loss, task_batch)):
        fast = _flat_in_parameter_order(grads.compute(loss_fn, batch), group)
        for row in range(batch.input_ids.shape[0]):
            single = Batch(
                batch.input_ids[row : row + 1],
                batch.attention_mask[row : row + 1],
                None if batch.mlm_labels is None else batch.mlm_labels[row : row + 1],
                None if batch.labels is None else batch.labels[row : row + 1],
            )
            reference = _reference_grad(tiny_model, group, loss_fn, single)
            torch.testing.assert_close(fast[row], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.mark.parametrize(
    ("layer", "pool_batch", "task_batch"), [("last", 1, 1), ("last", 3, 2), ("embeddings", 2, 3), (1, 1, 4)]
)
def test_pipeline_scores_equal_autograd_dot_products(
    tiny_model, tokenizer, chemprot_texts, corpus_texts, layer, pool_batch, task_batch
):
    """score_pool's kept scores are the dot products of autograd gradients of batch-mean losses."""
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts, tokenizer)
    _, group = parameter_group(tiny_model, layer)
    grads = GroupGradients(tiny_model, group)
    task_groups = seeded_groups(len(task_texts), task_batch, SEED)
    unit_groups = seeded_groups(len(pool_texts), pool_batch, SEED + 1)

    bank = task_gradient_bank(
        grads, tokenizer, task_texts, task_labels, task_groups, 5, MAX_LENGTH, torch.device("cpu")
    )
    top = score_pool(
        grads,
        tokenizer,
        bank,
        pool_texts,
        pool_keys,
        unit_groups,
        len(unit_groups),
        4,
        0.15,
        SEED,
        MAX_LENGTH,
        torch.device("cpu"),
    )

    task_refs = []
    for members in task_groups:
        batch = encode(tokenizer, [task_texts[i] for i in members], MAX_LENGTH)
        batch.labels = torch.from_numpy(task_labels[members])
        task_refs.append(_reference_grad(tiny_model, group, per_sample_task_loss, batch))
    unit_refs = []
    for members in unit_groups:
        batch = encode(tokenizer, [pool_texts[i] for i in members], MAX_LENGTH)
        batch = mask_tokens(batch, tokenizer, 0.15, SEED, pool_keys[members])
        unit_refs.append(_reference_grad(tiny_model, group, per_sample_mlm_loss, batch))
    expected = torch.stack(unit_refs) @ torch.stack(task_refs).T  # [pool units, task units]

    for task_unit in range(len(task_groups)):
        kept = top.units[task_unit]
        got = top.scores[task_unit]
        want = expected[kept, task_unit]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert sorted(kept.tolist()) == list(range(len(unit_groups)))  # k = all units: every unit kept once
        assert torch.all(got[:-1] >= got[1:])  # best first


def test_streaming_top_k_equals_full_matrix_top_k():
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(500, 40, generator=generator)  # [candidate units, task units]
    top = TopK.empty(40, 7)
    for start in range(0, 500, 64):
        block = full[start : start + 64]
        top.update(block, torch.arange(start, start + block.shape[0]))
    expected = torch.topk(full.T, 7, dim=1)
    torch.testing.assert_close(top.scores, expected.values)
    assert torch.equal(top.units, expected.indices)


def test_score_pool_resumes_from_saved_state(tiny_model, tokenizer, chemprot_texts, corpus_texts, tmp_path):
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts, tokenizer, 12)
    _, group = parameter_group(tiny_model, "last")
    grads = GroupGradients(tiny_model, group)
    groups = seeded_groups(len(task_texts), 1, 0)
    units = seeded_groups(len(pool_texts), 1, 1)
    cpu = torch.device("cpu")
    bank = task_gradient_bank(grads, tokenizer, task_texts, task_labels, groups, 8, MAX_LENGTH, cpu)
    args = (grads, tokenizer, bank, pool_texts, pool_keys)
    whole = score_pool(*args, units, 5, 4, 0.15, 0, MAX_LENGTH, cpu)

    state = tmp_path / "topk.pt"
    # An interrupted run: only the first 8 units were scored and saved.
    score_pool(*args, units[:8], 5, 4, 0.15, 0, MAX_LENGTH, cpu, state_path=state)
    assert torch.load(state, weights_only=True)["next_unit"] == 8
    resumed = score_pool(*args, units, 5, 4, 0.15, 0, MAX_LENGTH, cpu, state_path=state)
    torch.testing.assert_close(resumed.scores, whole.scores)
    assert torch.equal(resumed.units, whole.units)


def test_tied_embeddings_are_refused(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    from iss.model import TaskMLMModel

    tied = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=16,
            tie_word_embeddings=True,
        )
    )
    with pytest.raises(ValueError, match="untied"):
        parameter_group(TaskMLMModel(tied, 3), "embeddings")
    with pytest.raises(ValueError, match="out of range"):
        parameter_group(TaskMLMModel(tied, 3), 5)

"""Frozen lower blocks' states: computed once per text and model, reused by every fine-tuning epoch and seed.

:class:`FrozenBlockFeatures` runs a model's frozen lower blocks once per text and its trainable top blocks on the
saved states; :class:`FrozenStates` keeps those states across fine-tunings (by the digest of the frozen weights),
so models whose frozen blocks are equal encode a split once. The pipeline, fine-tuning and the estimate use this
one cache.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from iss.config.schema import IssConfig
from iss.data.task import TaskData
from iss.modeling.batches import encode, length_sorted, token_counts
from iss.modeling.model import TaskModel, transformer_blocks
from iss.modeling.precision import forward_autocast


class FrozenBlockFeatures:
    """The hidden states after the frozen lower blocks, computed once per text, and the top blocks run on them.

    Fine-tuning with ``trainable_blocks`` never changes the embeddings and lower blocks, yet a plain step (and
    every dev scoring) runs them again. Computed once, in eval mode (so without dropout in the frozen part: it is
    a fixed feature extractor), they leave each step the top blocks and the head only.
    """

    def __init__(self, model: TaskModel, trainable_blocks: int) -> None:
        self.model = model
        blocks = transformer_blocks(model)
        frozen = max(0, len(blocks) - trainable_blocks)
        self.lower, self.top = blocks[:frozen], blocks[frozen:]
        self._digests: dict[int, str] = {}

    def digest(self, depth: int | None = None) -> str:
        """A hash of the weights that make the states after ``lower[:depth]`` (the embeddings and those blocks):
        two models with equal digests give equal states, whatever stages made them. One pass over the weights
        gives every depth's."""
        if not self._digests:
            hasher = hashlib.sha1(usedforsecurity=False)
            for depth_after, module in enumerate((self.model.layout.embeddings, *self.lower)):
                for tensor in itertools.chain(module.parameters(), module.buffers()):
                    hasher.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
                self._digests[depth_after] = hasher.copy().hexdigest()
        return self._digests[len(self.lower) if depth is None else depth]

    @torch.no_grad()
    def encode(
        self,
        tokenizer: PreTrainedTokenizerFast,
        texts: list[str],
        max_length: int,
        device: torch.device,
        batch_size: int,
        depth: int | None = None,
    ) -> list[torch.Tensor]:
        """Each text's states after the frozen blocks (or the first ``depth`` of them), [its tokens, hidden]
        (padding dropped), on the CPU."""

        def embedded(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            batch = encode(tokenizer, [texts[i] for i in rows], max_length).to(device)
            return self.model.layout.embed(batch.input_ids), batch.attention_mask.sum(1)

        blocks = self.lower if depth is None else self.lower[:depth]
        return self._states(token_counts(tokenizer, texts), batch_size, embedded, blocks)

    @torch.no_grad()
    def advance(
        self, states: list[torch.Tensor], depth: int, device: torch.device, batch_size: int
    ) -> list[torch.Tensor]:
        """States after ``lower[:depth]`` (from :meth:`encode`) taken on through the remaining frozen blocks."""

        def padded(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = [states[i] for i in rows]
            lengths = torch.tensor([len(state) for state in chosen], device=device)
            return nn.utils.rnn.pad_sequence(chosen, batch_first=True).to(device), lengths

        return self._states([len(state) for state in states], batch_size, padded, self.lower[depth:])

    def _states(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        inputs: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
        blocks: Iterable[nn.Module],
    ) -> list[torch.Tensor]:
        """``blocks`` over each batch of similar-length rows that ``inputs`` gives (hidden states, lengths), in eval
        mode; per row its unpadded output on the CPU."""
        blocks = list(blocks)
        training = self.model.training
        self.model.eval()
        states: list[torch.Tensor] = [torch.empty(0)] * len(lengths)
        for rows in length_sorted(lengths, batch_size):
            hidden, row_lengths = inputs(rows)
            with forward_autocast(hidden.device):
                hidden = self._run(blocks, hidden, row_lengths)
            for row, state, length in zip(rows, hidden.float().cpu(), row_lengths.tolist(), strict=True):
                states[row] = state[:length].clone()
        self.model.train(training)
        return states

    def logits(self, states: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Task logits of cached states (padded to the longest) through the top blocks, the final norm (where the
        model has one), the pooled position and the head."""
        hidden = nn.utils.rnn.pad_sequence(states, batch_first=True).to(device)
        lengths = torch.tensor([len(state) for state in states], device=device)
        hidden = self.model.layout.final_norm(self._run(self.top, hidden, lengths))
        mask = (torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]).long()
        return self.model.classifier(self.model.dropout(self.model.family.pool(hidden, mask)))

    def _run(self, blocks: Iterable[nn.Module], hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        bias = self.model.family.attention_bias(lengths, hidden.shape[1], hidden.dtype)
        return self.model.layout.run(blocks, hidden, bias)

    @torch.no_grad()
    def predict(self, states: list[torch.Tensor], device: torch.device, batch_size: int) -> torch.Tensor:
        """[len(states), labels] logits in eval mode, on the CPU; batches of similar length pad little."""
        self.model.eval()
        logits = torch.zeros(len(states), self.model.num_labels)
        for rows in length_sorted([len(state) for state in states], batch_size):
            with forward_autocast(device):
                logits[torch.from_numpy(rows)] = self.logits([states[i] for i in rows], device).float().cpu()
        return logits


class FrozenStates:
    """Per split, the states after the frozen lower blocks, kept by the digest of the weights that made them: the
    seeds of one model, and models whose frozen blocks are equal (the checkpoint fine-tuned without pretraining
    under every seed), encode each split once.

    ``untouched_top``: where pretraining trains only the top blocks of a checkpoint (``pretrain.trainable_blocks``
    with frozen embeddings), the blocks below them are the checkpoint's in every pretrained model; their states are
    kept too (by their own digest), and each model runs only its frozen blocks above them. Holds one model's and
    one shared prefix's states at a time (~300 MB each for 2,500 texts of 64 tokens at width 576)."""

    def __init__(self, untouched_top: int | None = None) -> None:
        self.untouched_top = untouched_top
        self.full: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.prefix: dict[str, dict[str, list[torch.Tensor]]] = {}

    @classmethod
    def for_config(cls, config: IssConfig) -> FrozenStates:
        """The cache of a run: pretraining leaves the blocks below its top ones untouched only with frozen
        embeddings and ``pretrain.trainable_blocks``."""
        return cls(config.pretrain.trainable_blocks if config.model.freeze_embeddings else None)

    def untouched_depth(self, blocks: int, frozen: int) -> int | None:
        """How many of a model's ``frozen`` lower blocks (of ``blocks``) no pretraining changes, where that is some
        but not all of them (None: nothing to share below the frozen blocks)."""
        depth = None if self.untouched_top is None else blocks - self.untouched_top
        return depth if depth is not None and 0 < depth < frozen else None

    def states(
        self,
        frozen: FrozenBlockFeatures,
        tokenizer: PreTrainedTokenizerFast,
        task: TaskData,
        split: str,
        max_length: int,
        device: torch.device,
        batch_size: int,
    ) -> list[torch.Tensor]:
        entry = _latest(self.full, frozen.digest())
        if split not in entry:
            depth = self.untouched_depth(len(frozen.lower) + len(frozen.top), len(frozen.lower))
            if depth is not None:
                shared = _latest(self.prefix, frozen.digest(depth))
                if split not in shared:
                    shared[split] = frozen.encode(tokenizer, task.texts(split), max_length, device, batch_size, depth)
                entry[split] = frozen.advance(shared[split], depth, device, batch_size)
            else:
                entry[split] = frozen.encode(tokenizer, task.texts(split), max_length, device, batch_size)
        return entry[split]


def _latest(entries: dict[str, dict], key: str) -> dict:
    """The entry of ``key``, the others dropped: one is kept at a time."""
    if key not in entries:
        entries.clear()
    return entries.setdefault(key, {})

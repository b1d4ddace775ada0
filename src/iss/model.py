"""The model: any masked or causal LM with a classification head, its batches and per-sample losses.

:class:`TaskModel` wraps an ``AutoModelForMaskedLM`` (a fresh BERT in the from-scratch setting, a checkpoint
when further pretraining) or an ``AutoModelForCausalLM`` (Llama, GPT-2 and their kin, also from a GGUF file)
and adds a linear task head, so one object gives both the language-modelling loss used on corpus samples and
the task loss used on end-task samples. What differs between the two families lives in :mod:`iss.family`.
It saves as a normal transformers folder (safetensors) plus ``task_head.safetensors``, so the language model
stays loadable by transformers alone. Tokenizers live in :mod:`iss.tokenization`, the frozen lower blocks'
states in :mod:`iss.frozen`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from iss.config import ModelConfig
from iss.errors import ConfigError
from iss.family import FAMILIES, IGNORE, Checkpoint, Family, Layout, family_of
from iss.layers import resolve_layer

log = logging.getLogger("iss")

HEAD_FILE = "task_head.safetensors"
TASK_FILE = "task.json"


# ----------------------------------------------------------------------------------------------- model


_REPORTED: set[str] = set()
LM_HEAD_PREFIXES = ("cls.predictions.", "lm_head.", "cls.")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading messages and progress bar off (errors still shown); iss says what matters itself."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def report_missing_weights(source: str, missing: list[str]) -> None:
    """Once per checkpoint: a missing language-modelling head is expected (sentence-embedding models are saved
    without one, and ``model.mlm_head_steps`` fits it); any other missing weight is a warning."""
    if not missing or source in _REPORTED:
        return
    _REPORTED.add(source)
    head = [key for key in missing if key.startswith(LM_HEAD_PREFIXES)]
    others = [key for key in missing if key not in head]
    if head:
        log.info("%s has no saved LM head: a fresh one is made (model.mlm_head_steps fits it)", source)
    if others:
        log.warning("%s: %d weights not in the checkpoint, initialised fresh: %s", source, len(others), others[:5])


class TaskModel(nn.Module):
    """A language model plus a linear classifier on its pooled state ([CLS], or a causal LM's last real token)."""

    def __init__(self, lm: nn.Module, num_labels: int, dropout: float = 0.1, family: Family | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.family = family or family_of(lm.config, type(lm).__name__)
        self.layout = Layout(lm.base_model)
        hidden = lm.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        self.num_labels = num_labels

    @classmethod
    def from_scratch(cls, config: ModelConfig, tokenizer: PreTrainedTokenizerFast, num_labels: int) -> TaskModel:
        """A fresh BERT sized by the config; input and output embeddings are untied so each group is its own."""
        bert_config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_length,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        return cls(
            AutoModelForMaskedLM.from_config(bert_config, attn_implementation="eager"), num_labels, config.dropout
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        num_labels: int | None = None,
        trust_remote_code: bool = False,
        family: Family | None = None,
    ) -> TaskModel:
        """Load a saved model, or a plain checkpoint (a folder, hub name or GGUF file) with a fresh head of
        ``num_labels`` outputs. The family is the saved one, else ``family``, else the checkpoint's.

        Weights come from safetensors or GGUF (or, for old .bin checkpoints, transformers'
        ``torch.load(weights_only=True)``, which unpickles no code); code shipped with a folder runs only if trusted.
        """
        checkpoint, folder = Checkpoint.at(path), Path(path)
        saved = json.loads((folder / TASK_FILE).read_text(encoding="utf-8")) if (folder / TASK_FILE).is_file() else {}
        if "family" in saved:
            family = FAMILIES[saved["family"]]
        family = family or family_of(checkpoint.config(trust_remote_code), str(path))
        try:
            with quiet_transformers():  # its load report would call the missing MLM head of a sentence model an error
                lm, loading = family.auto_class.from_pretrained(
                    checkpoint.source,
                    attn_implementation="eager",
                    trust_remote_code=trust_remote_code,
                    output_loading_info=True,
                    **checkpoint.options(),
                )
        except (OSError, SafetensorError, EOFError) as error:  # a weights file cut short, a folder without one
            raise ConfigError(f"{path}: the model's weights cannot be read ({error}); is the file complete?") from None
        report_missing_weights(str(path), loading.get("missing_keys", []))
        if checkpoint.gguf_file:  # loading de-quantised the weights to plain float32 tensors; the quantizer record
            lm.hf_quantizer = None  # left behind would refuse save_pretrained (and reload the folder as GGUF)
            lm.config.__dict__.pop("quantization_config", None)
        if (folder / HEAD_FILE).is_file():
            if num_labels is not None and num_labels != saved["num_labels"]:
                raise ConfigError(f"{folder}: head has {saved['num_labels']} labels, the task has {num_labels}")
            model = cls(lm, saved["num_labels"], saved.get("dropout", 0.1), family)
            model.classifier.load_state_dict(load_file(str(folder / HEAD_FILE)))
            return model
        if num_labels is None:
            raise ConfigError(f"{folder}: no task head saved; pass num_labels to add a fresh one")
        return cls(lm, num_labels, family=family)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(folder), safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(folder / HEAD_FILE))
        task = {"num_labels": self.num_labels, "dropout": self.dropout.p, "family": self.family.name}
        (folder / TASK_FILE).write_text(json.dumps(task), encoding="utf-8")

    @property
    def base(self) -> nn.Module:
        """The transformer under the LM head (``bert`` for BERT, ``model`` for Llama, ``transformer`` for GPT-2)."""
        return self.lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        """The module mapping hidden states to vocabulary logits (``cls`` for BERT, ``lm_head`` for the rest)."""
        heads = [m for m in self.lm.children() if m is not self.lm.base_model]
        if len(heads) != 1:
            raise ConfigError(f"{type(self.lm).__name__}: expected one LM head next to the transformer")
        return heads[0]

    def lm_logits(self, batch: Batch) -> torch.Tensor:
        """Vocabulary logits at the positions with a target only ([n_targets, vocab]): the head is the costliest
        layer of a small model, and (for MLM) unmasked positions carry no loss."""
        hidden = self.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return self.lm_head(hidden[batch.lm_labels != IGNORE])

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The state the classifier reads ([CLS], or a causal LM's last real token) and t-SNE plots."""
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.family.pool(hidden, attention_mask)

    def task_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooled_hidden(input_ids, attention_mask)))


def transformer_blocks(model: TaskModel) -> nn.ModuleList:
    return model.layout.blocks


def parameter_group(model: TaskModel, layer: str | int) -> tuple[str, nn.Module]:
    """The module whose parameters influence is measured at: 'embeddings', 'last' or block i (1-based)."""
    if layer == "embeddings":
        if model.lm.get_output_embeddings() is not None and _tied(model):
            raise ConfigError("layer 'embeddings' needs untied input/output embeddings; choose a block instead")
        return "embeddings", model.layout.embeddings
    blocks = transformer_blocks(model)
    resolved = resolve_layer(layer, len(blocks))
    return resolved.name, blocks[resolved.index - 1]


def set_trainable(model: TaskModel, freeze_embeddings: bool = False, trainable_blocks: int | None = None) -> None:
    """Choose what a training loop may change: everything, all but the word embeddings, or (fine-tuning with
    ``trainable_blocks``) only the top blocks and the task head. Frozen parameters get no gradient, so backward
    stops where the trainable part begins."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if trainable_blocks is not None:
        blocks = transformer_blocks(model)
        frozen = [model.layout.embeddings, *blocks[: max(0, len(blocks) - trainable_blocks)]]
        for parameter in itertools.chain.from_iterable(m.parameters() for m in frozen):
            parameter.requires_grad_(False)
    if freeze_embeddings:
        model.lm.get_input_embeddings().weight.requires_grad_(False)


def set_head_trainable(model: TaskModel, blocks: int = 0) -> None:
    """Only the LM head (and the top ``blocks`` transformer blocks) may change: fitting a fresh head to a fixed
    encoder, or adapting a shared base with it. A decoder tied to the input embeddings stays fixed with them, so
    with ``blocks`` = 0 the encoder is exactly the checkpoint's afterwards."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    embeddings = model.lm.get_input_embeddings().weight
    top_blocks = list(transformer_blocks(model))[::-1][:blocks]
    trainable = [model.lm_head, *top_blocks]
    for parameter in itertools.chain.from_iterable(m.parameters() for m in trainable):
        parameter.requires_grad_(parameter is not embeddings)


def token_counts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """Tokens per text, special tokens and truncation left out (so no warning about texts longer than the model)."""
    if not texts:
        return np.asarray([])
    return np.asarray(tokenizer(texts, add_special_tokens=False, return_length=True, verbose=False)["length"])


def length_sorted(lengths: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices in batches of similar length (little padding)."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _tied(model: TaskModel) -> bool:
    output = model.lm.get_output_embeddings()
    return output.weight.data_ptr() == model.lm.get_input_embeddings().weight.data_ptr()


# ------------------------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Token ids and attention mask for a batch of texts, plus language-modelling targets and task labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lm_labels: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.lm_labels), move(self.labels))


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> Batch:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return Batch(encoded["input_ids"], encoded["attention_mask"])


@dataclass(frozen=True)
class PackedDocuments:
    """Documents packed into full rows: one token stream (each document followed by the family's separator,
    [SEP] or end-of-text) cut into rows of ``max_length`` that start with [CLS] (encoders; nothing for causal
    LMs). Only the last row is padded; no document is truncated."""

    input_ids: np.ndarray  # [rows, max_length], padded with the tokenizer's pad id
    lengths: np.ndarray  # [rows] real tokens per row

    @classmethod
    def pack(
        cls, tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int, family: Family
    ) -> PackedDocuments:
        prefix, separator = family.packing_tokens(tokenizer)
        if max_length < len(prefix) + 1:
            raise ConfigError(f"packing needs max_length >= {len(prefix) + 1}, got {max_length}")
        documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = max_length - len(prefix)
        stream = np.fromiter(itertools.chain.from_iterable([*doc, separator] for doc in documents), dtype=np.int64)
        rows = max(1, -(-len(stream) // width))
        input_ids = np.full((rows, max_length), tokenizer.pad_token_id, dtype=np.int64)
        input_ids[:, : len(prefix)] = prefix
        body = np.full(rows * width, tokenizer.pad_token_id, dtype=np.int64)
        body[: len(stream)] = stream
        input_ids[:, len(prefix) :] = body.reshape(rows, width)
        lengths = np.full(rows, max_length, dtype=np.int64)
        lengths[-1] = len(prefix) + len(stream) - (rows - 1) * width
        return cls(input_ids, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows as a batch, trimmed to its longest row."""
        lengths = self.lengths[rows]
        width = int(lengths.max())
        attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return Batch(torch.from_numpy(self.input_ids[rows, :width].copy()), torch.from_numpy(attention))


def candidate_batch(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    keys: np.ndarray,
    probability: float,
    seed: int,
    max_length: int,
) -> Batch:
    """Encoded candidate documents with their language-modelling targets (the corpus side of influence)."""
    return language_batch(model, tokenizer, encode(tokenizer, texts, max_length), probability, seed, keys)


def language_batch(
    model: TaskModel, tokenizer: PreTrainedTokenizerFast, batch: Batch, probability: float, seed: int, keys: Iterable
) -> Batch:
    """``batch`` with the targets of the model's language-modelling loss: masked tokens (MLM, one RNG per row
    keyed by ``keys``) or the next tokens (causal)."""
    keys = [int(k) for k in keys]
    input_ids, targets = model.family.language_targets(
        batch.input_ids, batch.attention_mask, tokenizer, probability, seed, keys
    )
    return Batch(input_ids, batch.attention_mask, targets, batch.labels)


def labelled_batch(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], label_ids: np.ndarray, max_length: int
) -> Batch:
    """Encoded task samples with their label ids (the task side of influence)."""
    batch = encode(tokenizer, texts, max_length)
    batch.labels = torch.as_tensor(np.array(label_ids, dtype=np.int64))
    return batch


def per_sample_lm_loss(model: TaskModel, batch: Batch) -> torch.Tensor:
    """Mean language-modelling cross-entropy over each row's target tokens: shape [batch]."""
    masked = batch.lm_labels != IGNORE
    token_loss = nn.functional.cross_entropy(model.lm_logits(batch), batch.lm_labels[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    totals = torch.zeros(masked.shape[0], dtype=token_loss.dtype, device=token_loss.device)
    return totals.index_add(0, rows, token_loss) / masked.sum(1).clamp(min=1)


def per_sample_task_loss(model: TaskModel, batch: Batch) -> torch.Tensor:
    """Classification cross-entropy per row: shape [batch]."""
    logits = model.task_logits(batch.input_ids, batch.attention_mask)
    return nn.functional.cross_entropy(logits, batch.labels, reduction="none")


def batched(items: list, size: int) -> Iterator[tuple[int, list]]:
    """(start offset, chunk) pairs over a list."""
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


_PRECISION: ContextVar[str] = ContextVar("iss_precision", default="fp32")


@contextmanager
def precision(name: str) -> Iterator[None]:
    """Run the enclosed work's forward passes in ``name``: 'fp32', or 'bf16' (autocast to bfloat16; parameters,
    optimiser state and gradient dot products stay float32). The pipeline wraps every model stage in it."""
    if name not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {name!r}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def current_precision() -> str:
    return _PRECISION.get()


def forward_autocast(device: torch.device | str) -> torch.autocast:
    """Autocast for one forward pass and its loss under the current precision (backward runs outside it, as
    PyTorch recommends). On CPU, bf16 autocast runs the same code path as on GPU."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=_PRECISION.get() == "bf16")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

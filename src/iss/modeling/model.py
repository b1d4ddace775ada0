"""The model: any masked or causal LM with a classification head (:class:`TaskModel`), saved and
loaded with its head, and which of its parameters train (blocks, the LM head, a layer's parameter group).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from iss.config.schema import ModelConfig
from iss.errors import ConfigError
from iss.modeling.family import FAMILIES, IGNORE, Checkpoint, Family, Layout, family_of
from iss.modeling.layers import resolve_layer

if TYPE_CHECKING:
    from iss.modeling.batches import Batch

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


def _tied(model: TaskModel) -> bool:
    output = model.lm.get_output_embeddings()
    return output.weight.data_ptr() == model.lm.get_input_embeddings().weight.data_ptr()

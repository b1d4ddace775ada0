"""Tokenizers: a WordPiece tokenizer trained on the task and corpus (from-scratch runs), kept by the content hash
of what made it, or a checkpoint's own tokenizer prepared for its model family."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from iss.config.schema import DEFAULT_TOKENIZER_CACHE, TokenizerConfig
from iss.modeling.family import FAMILIES, SPECIAL_TOKENS, Checkpoint, Family
from iss.runs.folder import cache_root


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on a stream of texts (task + corpus, from-scratch setting).

    The trainer breaks merge-frequency ties in hash order, so two trainings on the same texts may differ in a
    few rare subwords; :func:`cached_tokenizer` makes one per input and reuses it.
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=config.lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=SPECIAL_TOKENS
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Tied tokens are also numbered in hash order; WordPiece matching does not depend on ids, so number the
    # vocabulary canonically (specials first, then sorted) and equal vocabularies get equal ids.
    learned = sorted(set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS))
    canonical = {token: i for i, token in enumerate(SPECIAL_TOKENS + learned)}
    tokenizer.model = models.WordPiece(vocab=canonical, unk_token="[UNK]")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def cached_tokenizer(
    texts: Callable[[], Iterable[str]], config: TokenizerConfig, cache_dir: str | Path | None
) -> tuple[PreTrainedTokenizerFast, bool]:
    """The tokenizer trained on ``texts()`` (a fresh stream per call), from the cache if it was made before.

    The key is a hash of the settings and of every training text, so equal inputs get the very same tokenizer
    in any process and any run folder, and any change to them trains anew. Returns (tokenizer, reused).
    """
    if cache_dir is None:
        return train_tokenizer(texts(), config), False
    digest = hashlib.sha256(
        json.dumps(config.model_dump(mode="json", exclude={"path", "cache_dir"}), sort_keys=True).encode()
    )
    for text in texts():
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    root = cache_root() / "tokenizers" if cache_dir == DEFAULT_TOKENIZER_CACHE else Path(cache_dir).expanduser()
    folder = root / digest.hexdigest()[:20]
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder, FAMILIES["encoder"]), True
    tokenizer = train_tokenizer(texts(), config)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first: use theirs, so both agree
        shutil.rmtree(tmp, ignore_errors=True)
        return load_tokenizer(folder, FAMILIES["encoder"]), True
    return tokenizer, False


def load_tokenizer(path: str | Path, family: Family, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """Load a tokenizer (a folder, hub name or GGUF file) ready for ``family``: an encoder's must mask and pad, a
    causal LM's pads with its end-of-text token if it has no pad token. Code shipped with it runs only if trusted."""
    checkpoint = Checkpoint.at(path)
    tokenizer = AutoTokenizer.from_pretrained(
        checkpoint.source, trust_remote_code=trust_remote_code, **checkpoint.options()
    )
    return family.prepare_tokenizer(tokenizer, str(path))

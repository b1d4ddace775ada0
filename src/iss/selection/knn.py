"""Embedding nearest neighbours: each task sample ranks candidates by the cosine of sentence embeddings.

Embeddings are the mean of the last hidden states over a text's tokens (what all-MiniLM-L6-v2 and other
sentence-embedding checkpoints are trained for), L2-normalised, so a dot product is the cosine. Candidates stream
through in chunks and a running top-k per task sample (:class:`iss.topk.TopK`, the one BM25 and influence use)
keeps only the best ``top_k``: exact (it equals a brute-force ranking) and bounded in memory by task samples x
top_k, whatever the size of the corpus, so no approximate index is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from iss.errors import ConfigError
from iss.modeling.family import Checkpoint, family_of
from iss.modeling.model import quiet_transformers


class SentenceEncoder:
    """Mean-pooled, normalised sentence embeddings from an encoder checkpoint (a folder or hub name)."""

    def __init__(self, path: str, max_length: int = 128, batch_size: int = 64, device: str | torch.device = "cpu"):
        check_encoder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        with quiet_transformers():
            self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), hidden] float32, each row of norm 1 (a zero row for a text with no tokens)."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
        width = self.model.config.hidden_size
        return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)


def check_encoder(path: str) -> None:
    """A sentence embedding needs an encoder checkpoint: a causal LM (or a file that is no checkpoint) is refused
    before any stage runs."""
    try:
        config = Checkpoint.at(path).config()
    except (OSError, ValueError) as error:
        raise ConfigError(f"selectors.knn.model {path!r} is not a checkpoint transformers can read ({error})") from None
    if family_of(config, path).name != "encoder":
        raise ConfigError(
            f"selectors.knn.model {path!r} is a causal LM; kNN embeds with an encoder (a sentence-embedding model "
            "such as all-MiniLM-L6-v2)"
        )

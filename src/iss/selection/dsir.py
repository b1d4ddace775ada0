"""DSIR (Xie et al. 2023): data selection with importance resampling over hashed n-gram features.

Each text is a bag of hashed unigrams and bigrams (``buckets`` buckets; words as NLTK's ``WordPunctTokenizer``
splits the lowercased text, each n-gram hashed by SHA-256 modulo ``buckets``), the same features as the authors'
``data-selection`` package (``HashedNgramDSIR``). Two bag-of-n-grams models are fitted: one on the target (the
task's training texts) and one on the raw candidates (the BM25 pool or the whole corpus). A candidate's log
importance weight is ``counts . (log p_target - log p_raw)``, and resampling to the budget without replacement is
Gumbel top-k on those weights. The package loads whole datasets from files; this module streams, and a test
checks that both give the same weights.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from iss.data.corpus import seeded_hash

WORDS = re.compile(r"\w+|[^\w\s]+")  # the pattern of nltk.tokenize.WordPunctTokenizer
SMOOTHING = 1e-8  # added to both probabilities before the log, as the package does


@dataclass
class HashedNgrams:
    """Hashed n-gram count features of texts (n-grams of 1..``ngrams`` words)."""

    ngrams: int = 2
    buckets: int = 10_000
    _bucket_of: dict[str, int] = field(default_factory=dict, repr=False)  # hashing is the slow part; words repeat

    def bucket(self, gram: str) -> int:
        found = self._bucket_of.get(gram)
        if found is None:
            found = int(hashlib.sha256(gram.encode("utf-8")).hexdigest(), 16) % self.buckets
            self._bucket_of[gram] = found
        return found

    def buckets_of(self, text: str) -> list[int]:
        """The bucket of every n-gram of ``text`` (with repeats)."""
        words = WORDS.findall(text.lower())
        grams = list(words)
        for n in range(2, self.ngrams + 1):
            grams += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        return [self.bucket(gram) for gram in grams]

    def counts(self, texts: Iterable[str]) -> np.ndarray:
        """Summed counts of all ``texts`` ([buckets])."""
        total = np.zeros(self.buckets, np.int64)
        for text in texts:
            total += np.bincount(self.buckets_of(text), minlength=self.buckets)
        return total


@dataclass
class ImportanceWeights:
    """The fitted log ratio of target to raw n-gram probabilities; ``log_weights`` scores texts with it."""

    features: HashedNgrams
    log_ratio: np.ndarray  # [buckets]

    @classmethod
    def fit(cls, features: HashedNgrams, targets: Iterable[str], raw: Iterable[Iterable[str]]) -> ImportanceWeights:
        """Fit both bags of n-grams: ``targets`` (texts) and ``raw`` (batches of texts, streamed once)."""
        target = features.counts(targets)
        if target.sum() == 0:
            raise ValueError("DSIR's target has no words: the task's training texts are empty")
        raw_counts = np.zeros(features.buckets, np.int64)
        for batch in raw:
            raw_counts += features.counts(batch)
        if raw_counts.sum() == 0:
            raise ValueError("DSIR's raw candidates have no words")
        p_target, p_raw = target / target.sum(), raw_counts / raw_counts.sum()
        return cls(features, np.log(p_target + SMOOTHING) - np.log(p_raw + SMOOTHING))

    def log_weights(self, texts: Iterable[str]) -> np.ndarray:
        """Each text's log importance weight: its n-gram counts dotted with the log ratio."""
        return np.array([self.log_ratio[self.features.buckets_of(text)].sum() for text in texts], np.float64)


def gumbel_keys(log_weights: np.ndarray, corpus_ids: np.ndarray, seed: int) -> np.ndarray:
    """Gumbel-perturbed log weights: the top k of these keys is a sample of k without replacement with
    probabilities proportional to the weights. The noise is a hash of (seed, corpus id), so the sample does not
    depend on how the candidates were batched or ordered."""
    uniform = (seeded_hash(np.asarray(corpus_ids, np.int64), seed) >> np.uint64(11)).astype(np.float64) / 2.0**53
    uniform = np.clip(uniform, 1e-300, 1 - 1e-16)
    return log_weights - np.log(-np.log(uniform))

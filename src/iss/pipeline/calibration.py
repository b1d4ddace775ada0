"""What finished runs teach the estimate on this machine: how much of the BM25 hits the pool keeps,
how much longer pool documents are, the input stages' and a selection's seconds, and each kind of stage's
measured seconds against its probes (``~/.cache/iss/calibration.json``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from iss.config.schema import IssConfig
from iss.runs.folder import cache_root, write_json
from iss.stages.context import corpus_signature
from iss.stages.plan import RunPlan

if TYPE_CHECKING:
    from iss.pipeline.estimate import RunEstimate


def model_key(config: IssConfig) -> str:
    """What the probe-to-stage factors are kept by: the model (a 135 M causal LM's stages relate to its probes
    otherwise than a 23 M encoder's)."""
    model = config.model
    return model.path or f"from scratch ({model.num_layers} x {model.hidden_size})"


def corpus_key(config: IssConfig) -> str:
    """A short name for the corpus as the run reads it (its settings and its files' sizes and times)."""
    return hashlib.sha256(json.dumps(corpus_signature(config.corpus), sort_keys=True).encode()).hexdigest()[:16]


def hits_key(corpus: str, top_k: int) -> str:
    """What a pool's share of unique documents is kept by: the corpus (a :func:`corpus_key`) and BM25's top-k."""
    return f"{corpus} top-{top_k}"


INPUT_STAGES = "data, tokenizer, retrieval"  # the kind of the stages every estimate runs first
UNPROBED = (INPUT_STAGES, "selection", "total")  # priced by their own measurements, not by the probes


@dataclass(frozen=True)
class Calibration:
    """What no probe prices, measured in finished runs and kept in ``$ISS_CACHE``: a selection stage's seconds,
    the pool's size and lengths relative to the BM25 hits and the corpus, per corpus the input stages' seconds and
    its size, and per model how much longer each kind of stage took than its probes priced (the probe times the
    fastest of a few steps on one batch; a stage adds batches of other shapes, evaluation passes, checkpoints).
    Before any run: guesses (a pool of half the hits, as long as the corpus's documents; stages as probed)."""

    select_seconds: float = 5.0  # one selection stage (the pool tokenized, ranked, written)
    pool_share: float = 0.5  # unique pool documents per BM25 hit, in the last run
    pool_shares: dict[str, float] = field(default_factory=dict)  # the same per corpus and top-k (see hits_key)
    pool_length_ratio: float = 1.0  # mean tokens of a pool document over those of the corpus's first documents
    input_seconds: dict[str, float] = field(default_factory=dict)  # per corpus key: data, tokenizer, retrieval
    corpus_size: dict[str, int] = field(default_factory=dict)  # per corpus key: documents BM25 indexed
    stage_factors: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> kind -> measured / probed

    def stage_factor(self, model: str, kind: str) -> float:
        return self.stage_factors.get(model, {}).get(kind, 1.0)

    @staticmethod
    def path() -> Path:
        return cache_root() / "calibration.json"

    @classmethod
    def load(cls) -> Calibration:
        path = cls.path()
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return cls(**{name: value for name, value in saved.items() if name in cls.__dataclass_fields__})

    @classmethod
    def learn(
        cls,
        manifest: dict,
        plan: RunPlan,
        corpus: str | None = None,
        length_ratio: float | None = None,
        estimate: RunEstimate | None = None,
    ) -> Calibration:
        """The calibration updated by a finished run's manifest (the median selection stage; the retrieval's hits,
        pool and corpus size and the input stages' seconds, for ``corpus``; ``length_ratio`` as measured; with the
        run's ``estimate``, each probed kind's measured seconds over its probes' price), saved for later runs."""
        stages, known = manifest.get("stages", {}), cls.load()
        update: dict = {}
        seconds = [stages[name]["summary"].get("seconds", 0.0) for name in plan.stages_by_kind()["selection"]
                   if name in stages]  # fmt: skip
        if seconds:
            update["select_seconds"] = float(np.median(seconds))
        retrieval = stages.get("retrieval", {}).get("summary", {})
        if retrieval.get("hits"):
            update["pool_share"] = retrieval["pool_docs"] / retrieval["hits"]
            if corpus:  # more hits per query overlap more: 2 per query stay unique, 50 share most
                key = hits_key(corpus, plan.config.retrieval.top_k)
                update["pool_shares"] = {**known.pool_shares, key: update["pool_share"]}
        if corpus and retrieval:
            inputs = sum(
                stages.get(name, {}).get("summary", {}).get("seconds", 0.0)
                for name in plan.stages_by_kind()[INPUT_STAGES]
            )
            update["input_seconds"] = {**known.input_seconds, corpus: float(inputs)}
            update["corpus_size"] = {**known.corpus_size, corpus: int(retrieval.get("corpus_docs", 0))}
        if length_ratio:
            update["pool_length_ratio"] = float(length_ratio)
        if estimate is not None:
            model = model_key(plan.config)
            factors = dict(known.stage_factors.get(model, {}))
            for kind, row in estimate.against(manifest, plan).items():
                probed = row["estimated"] / estimate.factors.get(kind, 1.0)
                if kind not in UNPROBED and probed > 0 and row["measured"] > 0:
                    factors[kind] = row["measured"] / probed
            update["stage_factors"] = {**known.stage_factors, model: factors}
        calibration = replace(known, **update)
        cls.path().parent.mkdir(parents=True, exist_ok=True)
        write_json(cls.path(), asdict(calibration))
        return calibration

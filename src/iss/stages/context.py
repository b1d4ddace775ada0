"""What every stage of a run shares: its config, run folder, device and progress bars, the stages it finished,
and the checks the config and the checkpoint's config can answer before anything is spent."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import transformers
from tqdm.auto import tqdm

from iss.config.schema import CorpusConfig, IssConfig, fingerprint_dump
from iss.data.corpus import corpus_files
from iss.errors import ConfigError
from iss.modeling.family import Checkpoint, Family, resolve_family
from iss.modeling.frozen import FrozenStates
from iss.modeling.layers import resolve_layer
from iss.modeling.precision import pick_device, precision
from iss.runs.engine import StageEngine
from iss.runs.folder import RunFolder, StageResult, file_signature
from iss.runs.processes import processes
from iss.selection.budget import corpus_sample


def corpus_signature(corpus: CorpusConfig) -> dict:
    """The corpus as the run reads it: its settings and its files' sizes and times (hub names and saved datasets
    resolved), a fingerprint part of every stage that reads the corpus."""
    files = [str(file) for file in corpus_files(corpus)]
    return {"corpus": fingerprint_dump(corpus), "files": file_signature(files)}


class StageContext:
    """One config's view of its run folder: the stage modules (:mod:`iss.stages`) run their stages through it."""

    def __init__(self, config: IssConfig, show_progress: bool = True, tag: str = "", recompute: bool = True) -> None:
        self.config = config
        self.tag = tag  # suffix of selection/pretrain/fine-tune stage names (budget sweep, layer ablation)
        self.run = RunFolder(config.run_dir, recompute)  # recompute=False: a damaged stage is refused, not rerun
        self.show_progress = show_progress and processes().is_main
        self.device = processes().device(pick_device(config.device))
        self.results: dict[str, StageResult] = {}
        # the frozen lower blocks' states, shared by fine-tunings of models with the same frozen weights
        self.frozen_states = FrozenStates.for_config(config)
        self.pool_lengths: dict[tuple[str, str], np.ndarray] = {}  # token counts of a pool, shared by variants
        self.base_config = config  # what the manifest records: the run's own config, not a variant's
        for path in (config.model.path, config.tokenizer.path):  # a local path that is not there fails now
            if path:
                Checkpoint.at(path)
        if not self.show_progress:
            transformers.utils.logging.disable_progress_bar()

    def share_with(self, other: StageContext) -> None:
        """Share ``other``'s finished stages and caches: a variant of the same run folder."""
        self.run, self.results, self.base_config = other.run, other.results, other.base_config
        self.pool_lengths, self.frozen_states = other.pool_lengths, other.frozen_states

    def stage(
        self, name: str, parts: dict, body: Callable[[Path, dict], None], data_parallel: bool = False
    ) -> StageResult:
        """Reuse the finished artifact ``name`` if its fingerprint matches ``parts``, else run ``body`` into it
        (:class:`iss.engine.StageEngine`); the manifest records the run's own config."""
        engine = StageEngine(self.run, self.results, lambda: precision(self.config.precision))
        return engine.run(name, parts, body, data_parallel, {"config": self.base_config.model_dump(mode="json")})

    def progress(self, total: int | None, desc: str, unit: str = "doc") -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.show_progress, leave=False)

    def corpus_signature(self) -> dict:
        return corpus_signature(self.config.corpus)

    def corpus_sample(self, kind: str, limit: int, mean_pool_tokens: float, seed: int | None = None) -> pa.Table:
        """The run's uniform random sample of the whole corpus (:func:`iss.selection.corpus_sample`)."""
        seed = self.config.seed if seed is None else seed
        with self.progress(None, "random corpus sample") as bar:
            return corpus_sample(self.config.corpus, kind, limit, mean_pool_tokens, seed, bar.update)

    @cached_property
    def family(self) -> Family:
        """The model family (encoder or causal), as configured or read from the checkpoint's config."""
        model = self.config.model
        checkpoint = Checkpoint.at(model.path) if model.path else None
        return resolve_family(model.family, checkpoint, model.trust_remote_code)

    def checkpoint_config(self) -> transformers.PretrainedConfig | None:
        """The checkpoint's config (``model.path``), read without its weights; None from scratch."""
        if not self.config.model.path:
            return None
        return Checkpoint.at(self.config.model.path).config(self.config.model.trust_remote_code)

    def blocks(self) -> int:
        """Transformer blocks of the model the run trains: the config's size, or the checkpoint's config."""
        checkpoint = self.checkpoint_config()
        return self.config.model.num_layers if checkpoint is None else checkpoint.num_hidden_layers

    def check_tokenizer(self, tokens: int) -> None:
        """A tokenizer of ``tokens`` tokens and a checkpoint with fewer embeddings do not belong together; nor
        rows longer than the checkpoint's context (learned or rotary positions end there)."""
        checkpoint = self.checkpoint_config()
        if checkpoint is None:
            return
        if checkpoint.vocab_size < tokens:
            raise ConfigError(
                f"tokenizer has {tokens} tokens but model {self.config.model.path} only {checkpoint.vocab_size} "
                "embeddings: they do not belong together"
            )
        context = getattr(checkpoint, "max_position_embeddings", None) or getattr(checkpoint, "n_positions", None)
        if context is not None and self.config.model.max_length > context:
            raise ConfigError(
                f"model.max_length {self.config.model.max_length} is longer than {self.config.model.path}'s context "
                f"({context} tokens); longer texts are cut at model.max_length"
            )

    def check_layer(self) -> None:
        """An influence layer the model does not have fails now, not after warm-up."""
        resolve_layer(self.config.influence.layer, self.blocks())

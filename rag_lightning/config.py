"""Typed section configs: the composed Hydra config stops at the pipeline, everything below takes these.

`pipeline.py` (and the entry points) build each section once from the composed config with
:func:`section`: unknown keys, wrong types, `???` values and out-of-range numbers fail there, before any
model is built, with the full key in the message. The dataclass defaults here are the one source of
defaults: the group files under `conf/` agree with them (tests/test_config_defaults.py checks every key)
and only set what differs or what is a path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from rag_lightning.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value is missing, misspelt or out of range; the message names the key and the fix."""


class Mode(str, Enum):
    rag_token = "rag_token"
    rag_sequence = "rag_sequence"
    closed_book = "closed_book"


class SequenceDecoding(str, Enum):
    thorough = "thorough"
    fast = "fast"


# ------------------------------------------------------------------------------------------ data
@dataclass
class WorldOptions:
    """`data.world`: the world builder's options; all of them enter its manifest's build key."""

    seed: int = 0
    vocab_size: int = 6000  # byte-level BPE for the generator
    min_city_population: int = 100_000
    val_fraction: float = 0.05  # of the entities of each kind
    test_fraction: float = 0.05
    max_words: int = 60  # per passage text
    max_train_questions: int | None = 12000  # None keeps every train question
    max_eval_questions: int = 300  # per val, test and test_seen split
    # train questions per fact, each in another of its relation's 11-16 training phrasings (drawn per fact)
    train_phrasings: int = 2


@dataclass
class TokenizerTrainingConfig:
    """`data.tokenizer`: the generator tokenizer trained for users' data when it is missing."""

    train_if_missing: bool = True
    vocab_size: int = 8000
    max_passages: int | None = 200_000  # passages read for training (None: all)


@dataclass
class CounterfactualOptions:
    """`data.counterfactual`: the counterfactual world of `data=world_counterfactual` (the index hot-swap demo,
    data/world_counterfactual.py): the world set in `source_dir` with its held-out countries' facts changed."""

    source_dir: str | None = None  # the world build it copies (built first when missing)
    seed: int = 0  # the cycle through the held-out countries that decides who takes whose facts
    relations: list[str] = field(
        default_factory=lambda: ["capital", "population", "area", "calling_code", "tld", "demonym"]
    )


@dataclass
class DataConfig:
    """`data`: where the corpus and the QA splits are, and who builds them (`build: world` or null)."""

    name: str = MISSING
    build: str | None = None
    dir: str = MISSING
    corpus_file: str = MISSING
    train_file: str | None = MISSING
    val_file: str | None = MISSING
    test_file: str | None = MISSING
    extra_test_files: dict[str, str | None] = field(default_factory=dict)
    # more training files (any QA/KILT format), mixed into the train split: multi-task training, e.g. the QA
    # questions beside fact-verification claims so the generator learns to read while it learns to verify
    extra_train_files: dict[str, str | None] = field(default_factory=dict)
    # a tokenizer directory; None when a pretrained generator brings its own
    generator_tokenizer: str | None = None
    skip_bad_rows: bool = False
    tokenizer: TokenizerTrainingConfig = field(default_factory=TokenizerTrainingConfig)
    world: WorldOptions = field(default_factory=WorldOptions)
    counterfactual: CounterfactualOptions = field(default_factory=CounterfactualOptions)

    def check(self, prefix: str = "data") -> None:
        _one_of(f"{prefix}.build", str(self.build), ("world", "world_counterfactual", "None"))

    def test_files(self) -> dict[str, str]:
        """Every test split this data names: `test` and the `extra_test_files`."""
        files = {"test": self.test_file} if self.test_file else {}
        files.update({name: path for name, path in self.extra_test_files.items() if path})
        return files

    def train_files(self) -> dict[str, str]:
        """Every file training reads: `train` and the `extra_train_files` (mixed into one shuffled split)."""
        files = {"train": self.train_file} if self.train_file else {}
        files.update({f"train.{name}": path for name, path in self.extra_train_files.items() if path})
        return files


# ------------------------------------------------------------------------------------------ task
TASK_KINDS = ("qa", "verification", "generation", "dialogue")
TASK_METRICS = ("em", "f1", "accuracy", "bleu", "rougeL", "bleu1", "factuality")


@dataclass
class TaskConfig:
    """`task`: how inputs and targets are built from a QA/KILT example and which metrics score the outputs
    (data/tasks.py); the module only computes losses and generates."""

    name: str = "qa"  # qa | verification | generation | dialogue
    metrics: list[str] = field(default_factory=lambda: ["em", "f1"])
    # the metric (one of `metrics`) that picks the best checkpoint and that sweeps optimise: val/<monitor>
    monitor: str = "em"
    # verification: the label set; constrained_decoding scores each label and picks the likeliest
    labels: list[str] = field(default_factory=lambda: ["SUPPORTS", "REFUTES"])
    constrained_decoding: bool = False
    # dialogue: turns of the history are lines of the input; the oldest are dropped to fit the input length
    turn_separator: str = "\n"
    # dialogue: the generator reads only the newest N lines of the history (null: all that fit); the retriever
    # reads all that fit. The retrieved passage names what "that country" means, and a long history would
    # otherwise take the context's room from the passage (docs/tasks.md, world_dialogue)
    generator_turns: int | None = None
    # KILT provenance metrics (R-precision, recall@k of pages, KILT scores) where examples carry provenance
    kilt_metrics: bool = True

    def check(self, prefix: str = "task") -> None:
        _one_of(f"{prefix}.name", self.name, TASK_KINDS)
        for metric in self.metrics:
            _one_of(f"{prefix}.metrics", metric, TASK_METRICS)
        if not self.metrics:
            raise ConfigError(f"{prefix}.metrics is empty: name at least one of {', '.join(TASK_METRICS)}")
        if self.monitor not in self.metrics:
            raise ConfigError(f"{prefix}.monitor={self.monitor!r} is not one of {prefix}.metrics={self.metrics}")
        if self.name == "verification" and len(set(self.labels)) < 2:
            raise ConfigError(f"{prefix}.labels={self.labels} needs at least two distinct labels")
        if self.generator_turns is not None and (self.name != "dialogue" or self.generator_turns < 1):
            raise ConfigError(
                f"{prefix}.generator_turns={self.generator_turns} needs {prefix}.name=dialogue and a value >= 1 "
                "(or null: the generator reads the whole history)"
            )
        if self.constrained_decoding and self.name != "verification":
            raise ConfigError(f"{prefix}.constrained_decoding=true needs {prefix}.name=verification (a label set)")


# ------------------------------------------------------------------------------------------ models
@dataclass
class TinyEncoderConfig:
    hidden_size: int = 32
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 64
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    seed: int = 0


ENCODER_KINDS = ("minilm", "dpr", "tiny", "path", "rag")


@dataclass
class QuestionEncoderConfig:
    """`model.question_encoder`: the DPR question and context encoders (one group for both)."""

    kind: str = "minilm"  # minilm | dpr | tiny | path | rag (a transformers RAG checkpoint)
    question_name_or_path: str | None = None
    context_name_or_path: str | None = None
    # passage tokens for the context encoder ([CLS] title [SEP] text [SEP]); 256 = MiniLM's own limit in
    # sentence-transformers; words past it cannot be retrieved densely (the store build warns with a count)
    ctx_max_length: int = 256
    tiny: TinyEncoderConfig = field(default_factory=TinyEncoderConfig)

    def check(self, prefix: str = "model.question_encoder") -> None:
        _one_of(f"{prefix}.kind", self.kind, ENCODER_KINDS)
        _positive(f"{prefix}.ctx_max_length", self.ctx_max_length)
        if self.kind in ("dpr", "path"):
            for which in ("question", "context"):
                if not getattr(self, f"{which}_name_or_path"):
                    raise ConfigError(f"{prefix}.{which}_name_or_path is required for kind={self.kind}")
        if self.kind == "rag" and not self.question_name_or_path:
            raise ConfigError(
                f"{prefix}.question_name_or_path is required for kind=rag (a RagTokenForGeneration or "
                "RagSequenceForGeneration directory or hub name)"
            )


GENERATOR_KINDS = ("random", "pretrained", "rag")


@dataclass
class GeneratorConfig:
    """`model.generator`: BART from scratch (`random`, architecture in `config`), `pretrained`, or the generator
    of a transformers RAG checkpoint (`rag`)."""

    kind: str = "random"
    copy: bool = False  # pointer-generator copy head (models/copy_generator.py)
    copy_continuation: bool = False  # with copy: the pointer steps along a name being copied
    copy_continuation_bigram: bool = False  # with copy: the same on the last two tokens emitted
    question_match: bool = False  # with copy: DrQA's exact-match feature between question and passage
    question_match_unique: bool = False  # with question_match: a mark for a token that occurs once
    # with question_match_unique: each token's distance (1..D, 0 = off) after and before the nearest such match
    question_match_distance: int = 0
    # with copy: the question encoder's vector of the question, projected onto the generator encoder's first
    # position, so the reader sees what the pretrained encoder understood of a paraphrase (docs/paraphrase.md)
    question_view: bool = False
    name_or_path: str | None = None  # pretrained: a hub name or a save_pretrained directory; rag: a RAG checkpoint
    tokenizer: str | None = None  # a tokenizer directory; None: the pretrained model's own
    config: dict[str, Any] = field(default_factory=dict)  # random: BartConfig arguments

    def check(self, prefix: str = "model.generator") -> None:
        _one_of(f"{prefix}.kind", self.kind, GENERATOR_KINDS)
        for key in ("copy_continuation", "copy_continuation_bigram", "question_match", "question_view"):
            if getattr(self, key) and not self.copy:
                raise ConfigError(f"{prefix}.{key}=true needs {prefix}.copy=true")
        if self.question_match_unique and not self.question_match:
            raise ConfigError(f"{prefix}.question_match_unique=true needs {prefix}.question_match=true")
        if self.question_match_distance < 0:
            raise ConfigError(f"{prefix}.question_match_distance must be >= 0 (0: off), got {self.question_match_distance}")
        if self.question_match_distance and not self.question_match_unique:
            raise ConfigError(
                f"{prefix}.question_match_distance={self.question_match_distance} counts from the unique "
                f"matches: it needs {prefix}.question_match_unique=true"
            )
        if self.kind in ("pretrained", "rag") and not self.name_or_path:
            raise ConfigError(
                f"{prefix}.name_or_path is required for kind={self.kind}. Fix: pass {prefix}.name_or_path=<a hub "
                "name or a save_pretrained directory, e.g. a run's checkpoints/hf/generator>"
            )
        if self.kind == "random" and not self.tokenizer:
            raise ConfigError(f"{prefix}.tokenizer is required for kind=random (a tokenizer directory)")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    question_encoder_lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 300
    scheduler: str = "linear"  # linear | cosine | constant
    # AdamW's fused kernel: one pass over all weights instead of a loop of small ops (~6x faster step on CPU,
    # benchmarks/bench_vs_transformers.py). null = auto: on, except under fp16 loss scaling, where Lightning
    # cannot clip gradients of an optimizer that unscales inside its step.
    fused: bool | None = None

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.lr", self.lr)
        _at_least(f"{prefix}.question_encoder_lr", self.question_encoder_lr, 0.0)
        _at_least(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        _one_of(f"{prefix}.scheduler", self.scheduler, ("linear", "cosine", "constant"))


@dataclass
class DecodingConfig:
    num_beams: int = 1
    max_new_tokens: int = 24
    sequence_mode: SequenceDecoding = SequenceDecoding.fast
    # finish a word whose first pieces were copied from a passage the way the passage spells it
    # (models/word_completion.py); RAG modes only: a closed-book generator has no passage to copy from
    complete_copied_words: bool = False
    # the answer's first token begins with a space, as every training target of a prefix-space tokenizer (the
    # world's) does: no answer starts inside a passage's word ("šice" of Košice); RAG modes only
    start_at_word: bool = False
    # > 0: no n-gram of this many tokens twice in one output (transformers' option; 0: off). A loop
    # ("is .ar is .ar is .ar") ends; a template sharing shorter n-grams between sentences does not
    no_repeat_ngram_size: int = 0

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.num_beams", self.num_beams)
        _positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        _at_least(f"{prefix}.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)


@dataclass
class ModelConfig:
    """`model`: the RAG mode, its training schedule, and the two models (their own groups)."""

    mode: Mode = Mode.rag_token
    n_docs: int = 5
    eval_n_docs: int | None = None  # None: same as n_docs
    freeze_question_encoder: bool = False
    # the question encoder stays frozen for this many optimizer steps while the generator learns to read
    question_encoder_warmup_steps: int = 300
    # joint training updates only the top N layers of the question encoder (None: every layer and the
    # embeddings); the frozen bottom's states are computed once per question
    question_encoder_trainable_layers: int | None = None
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False
    loss_reduction: str = "token_mean"
    # weight of the retriever's contrastive (DPR) loss on gold passages; 0 turns the multi-task term off
    retrieval_loss_weight: float = 0.0
    # training-time augmentation: swap answers between examples in contexts and targets (models/augment.py)
    answer_swap_prob: float = 0.0
    # whose answer a swapped example takes: "batch" (another example of its batch, any type) or "relation"
    # (another answer of its relation in the train set: the QA rows need a "relation")
    answer_swap_donors: str = "batch"
    # training-time augmentation: each question token of the generator's contexts becomes <mask> with this
    # probability (one draw per question, shared by its passages; the retriever's question is untouched)
    question_word_dropout: float = 0.0
    # curriculum: for this many training steps a missed gold passage takes the last retrieved slot
    gold_passage_steps: int = 0
    # train the context encoder too: the retrieved passages are re-encoded in each step, so the doc scores
    # carry its gradient (off, as in the paper, where the passage side stays fixed)
    train_context_encoder: bool = False
    # with train_context_encoder: re-encode the corpus and swap in the new index every N optimizer steps (0: never)
    index_refresh_every_n_steps: int = 0
    gradient_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    question_encoder: QuestionEncoderConfig = field(default_factory=QuestionEncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    def check(self, prefix: str = "model") -> None:
        _positive(f"{prefix}.n_docs", self.n_docs)
        if self.eval_n_docs is not None:
            _positive(f"{prefix}.eval_n_docs", self.eval_n_docs)
        _at_least(f"{prefix}.question_encoder_warmup_steps", self.question_encoder_warmup_steps, 0)
        _at_least(f"{prefix}.gold_passage_steps", self.gold_passage_steps, 0)
        _at_least(f"{prefix}.index_refresh_every_n_steps", self.index_refresh_every_n_steps, 0)
        if self.index_refresh_every_n_steps and not self.train_context_encoder:
            raise ConfigError(f"{prefix}.index_refresh_every_n_steps={self.index_refresh_every_n_steps} refreshes the "
                              f"index of a trained context encoder: it needs {prefix}.train_context_encoder=true")
        if self.train_context_encoder and not self.retrieves:
            raise ConfigError(f"{prefix}.train_context_encoder=true needs retrieval: mode={Mode(self.mode).value} reads no "
                              "passages")
        if self.generator.question_view and not self.retrieves:
            raise ConfigError(f"{prefix}.generator.question_view=true reads the retriever's question vector: "
                              f"mode=closed_book has none. Fix: {prefix}.generator.question_view=false")
        if self.decoding.start_at_word and not self.retrieves:
            raise ConfigError(f"{prefix}.decoding.start_at_word=true is a rule of the RAG decoders; mode=closed_book "
                              f"decodes with transformers' generate. Fix: {prefix}.decoding.start_at_word=false")
        if self.decoding.complete_copied_words and not self.retrieves:
            raise ConfigError(f"{prefix}.decoding.complete_copied_words=true finishes words copied from passages: "
                              f"mode=closed_book reads none. Fix: {prefix}.decoding.complete_copied_words=false")
        if self.train_context_encoder and self.freeze_question_encoder:
            raise ConfigError(f"{prefix}.train_context_encoder=true trains the retriever, "
                              f"{prefix}.freeze_question_encoder=true freezes it: set one of them to false")
        if self.question_encoder_trainable_layers is not None:
            _positive(f"{prefix}.question_encoder_trainable_layers", self.question_encoder_trainable_layers)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _one_of(f"{prefix}.loss_reduction", self.loss_reduction, ("token_mean", "mean", "sum"))
        _at_least(f"{prefix}.retrieval_loss_weight", self.retrieval_loss_weight, 0.0)
        if not 0.0 <= self.answer_swap_prob <= 1.0:
            raise ConfigError(f"{prefix}.answer_swap_prob={self.answer_swap_prob} must be in [0, 1]")
        _one_of(f"{prefix}.answer_swap_donors", self.answer_swap_donors, ("batch", "relation"))
        if not 0.0 <= self.question_word_dropout < 1.0:
            raise ConfigError(f"{prefix}.question_word_dropout={self.question_word_dropout} must be in [0, 1): "
                              "at 1 no question word would be left")
        self.optim.check(f"{prefix}.optim")
        self.decoding.check(f"{prefix}.decoding")
        self.question_encoder.check(f"{prefix}.question_encoder")
        self.generator.check(f"{prefix}.generator")

    @property
    def retrieves(self) -> bool:
        return self.mode != Mode.closed_book

    @property
    def eval_docs(self) -> int:
        return self.eval_n_docs or self.n_docs


# ------------------------------------------------------------------------------------------ retrieval
INDEX_TYPES = ("flat", "hnsw", "ivfpq", "bm25")  # bm25: sparse, over question texts (retrieval/bm25.py)
DISTRIBUTED_MODES = ("sharded", "replicated")
# which index keys are build-time (a change rebuilds the index) and which search-time (no rebuild)
BUILD_KEYS = {"flat": (), "hnsw": ("M", "ef_construction"), "ivfpq": ("nlist", "m", "nbits", "train_size", "seed"),
              "bm25": ()}
SEARCH_KEYS = {"flat": (), "hnsw": ("ef_search",), "ivfpq": ("nprobe", "rerank"), "bm25": ()}
HYBRID_NORMS = ("max", "none")


@dataclass
class IndexConfig:
    """`index`: the corpus store, passage encoding and the FAISS index (conf/index/common.yaml)."""

    type: str = "flat"  # flat | hnsw | ivfpq
    device: str = "cpu"  # gpu: faiss with GPU support
    num_threads: int = 0  # faiss OpenMP threads; 0 keeps faiss's default (all cores)
    verify_checksum: bool = True  # sha256 of index.faiss checked when a run loads the index
    distributed: str = "sharded"  # sharded | replicated, under DDP (retrieval/distributed.py)
    # passage encoding (resumable in shards)
    encode_device: str = "auto"  # auto: cuda when available, else cpu
    batch_size: int = 64
    shard_size: int = 50_000
    progress: bool = True
    # corpus store: passages as the generator reads them after the question ("title / text")
    gen_max_passage_tokens: int = 256
    title_separator: str = " / "
    store_dir: str = MISSING
    vectors_dir: str = MISSING
    dir: str = MISSING
    # hnsw
    M: int = 32  # graph degree (build)
    ef_construction: int = 80  # build-time beam (build)
    ef_search: int = 128  # search-time beam (no rebuild)
    # ivfpq
    nlist: int = 0  # inverted lists; 0 = about 4*sqrt(N) (build)
    m: int = 0  # PQ sub-quantizers (bytes per vector); 0 = dim/8 (build)
    nbits: int = 8  # bits per sub-quantizer code (build)
    train_size: int = 0  # training sample; 0 = 64 per list or code (build)
    seed: int = 0  # training sample seed (build)
    nprobe: int = 32  # lists visited per query (no rebuild)
    rerank: int = 16  # candidates per result re-scored exactly; 1: off (no rebuild)
    # bm25 (bm25s): term saturation, length normalisation, scoring variant, stopwords (all build-time)
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    bm25_method: str = "lucene"  # robertson | lucene | bm25l | bm25+ | atire
    bm25_stopwords: str | None = "en"
    bm25_ngram: int = 1  # 2: word pairs indexed too ("number 18"), so a number binds to the word before it
    bm25_min_word_chars: int = 2  # bm25s' default words: 2+ letters or digits; 1 keeps "7" of "atomic number 7"
    # true: 55.845 and 9,733,276 are one token each, not 55 / 845 ..., so a question's "26" matches only passages
    # where 26 stands alone ("atomic number 26"), not every weight, population or area with 26 in it
    bm25_whole_numbers: bool = False
    # true: pairs (bm25_ngram >= 2) only of words next to each other in the text; false: of the words left after
    # stopword removal, so "city of X" and "city in X" both give the pair "city x"
    bm25_adjacent_pairs: bool = False
    # hybrid (dense + BM25, retrieval/retriever.py; conf/index/hybrid.yaml): candidates = dense top-m + BM25
    # top-m, ranked by q.d + weight * BM25; weight and norm chosen on the world set's val split (docs/retrieval.md)
    hybrid: bool = False
    hybrid_bm25_weight: float = 7.0
    hybrid_candidates: int = 20  # m per retriever (at least k is used)
    hybrid_bm25_norm: str = "none"  # none: raw BM25 scores | max: divided by the question's best BM25 score
    bm25_dir: str = ""  # hybrid's BM25 index; "": <parent of index.dir>/<data.name>-bm25 (index=bm25's own)

    @property
    def pairs_adjacent(self) -> bool:
        """bm25_adjacent_pairs as it takes effect: only where pairs are indexed (bm25_ngram >= 2)."""
        return self.bm25_adjacent_pairs and self.bm25_ngram > 1

    def check(self, prefix: str = "index") -> None:
        _one_of(f"{prefix}.type", self.type, INDEX_TYPES)
        _one_of(f"{prefix}.device", self.device, ("cpu", "gpu"))
        _one_of(f"{prefix}.distributed", self.distributed, DISTRIBUTED_MODES)
        _one_of(f"{prefix}.encode_device", self.encode_device.split(":")[0], ("auto", "cpu", "cuda"))
        _at_least(f"{prefix}.num_threads", self.num_threads, 0)
        for key in ("batch_size", "shard_size", "gen_max_passage_tokens", "M", "ef_construction", "ef_search",
                    "nbits", "nprobe", "rerank"):
            _positive(f"{prefix}.{key}", getattr(self, key))
        _one_of(f"{prefix}.bm25_method", self.bm25_method, ("robertson", "lucene", "bm25l", "bm25+", "atire"))
        _at_least(f"{prefix}.bm25_k1", self.bm25_k1, 0.0)
        if self.bm25_ngram not in (1, 2, 3):
            raise ConfigError(f"{prefix}.bm25_ngram={self.bm25_ngram} must be 1 (words), 2 (+ pairs) or 3")
        _positive(f"{prefix}.bm25_min_word_chars", self.bm25_min_word_chars)
        if not 0.0 <= self.bm25_b <= 1.0:
            raise ConfigError(f"{prefix}.bm25_b={self.bm25_b} must be in [0, 1]")
        if self.hybrid:
            if self.type == "bm25":
                raise ConfigError(
                    f"{prefix}.hybrid=true adds BM25 to a dense index, but {prefix}.type=bm25 is BM25 alone. "
                    f"Fix: index=hybrid (flat + BM25), or {prefix}.type=flat|hnsw|ivfpq, or {prefix}.hybrid=false"
                )
            _at_least(f"{prefix}.hybrid_bm25_weight", self.hybrid_bm25_weight, 0.0)
            _positive(f"{prefix}.hybrid_candidates", self.hybrid_candidates)
            _one_of(f"{prefix}.hybrid_bm25_norm", self.hybrid_bm25_norm, HYBRID_NORMS)

    def build_params(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in BUILD_KEYS[self.type]}

    def search_params(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in SEARCH_KEYS[self.type]}


CONTEXT_LAYOUTS = ("question_first", "passage_first")


@dataclass
class ContextConfig:
    """`context`: the generator's input per passage, `question // title / text`, cut to `max_length`."""

    max_length: int = 128
    layout: str = "question_first"  # question_first | passage_first (transformers' order)

    def check(self, prefix: str = "context") -> None:
        _one_of(f"{prefix}.layout", self.layout, CONTEXT_LAYOUTS)
        _at_least(f"{prefix}.max_length", self.max_length, 8)


# ------------------------------------------------------------------------------------------ DPR stage
DPR_NEGATIVES = ("bm25", "dense", "mixed")


@dataclass
class CorpusBankConfig:
    """`dpr.bank`: the passage side trained against the whole corpus (``dpr.corpus_negatives=true`` with
    ``dpr.train_context_encoder=true``): the softmax runs over a bank of every passage's vector, refreshed every
    ``refresh_steps``; each step's positives and hardest bank negatives are encoded fresh, with gradient."""

    layers: int = 1  # top layers of the context encoder trained (its embeddings and lower layers stay fixed)
    refresh_steps: int = 75  # the bank recomputed every N steps (and at the start of training and validation)
    fresh_negatives: int = 3  # per question, its highest-scoring bank negatives re-encoded with gradient
    context_lr: float | None = None  # the context encoder's learning rate (null: dpr.lr)

    def check(self, prefix: str = "dpr.bank") -> None:
        _positive(f"{prefix}.layers", self.layers)
        _positive(f"{prefix}.refresh_steps", self.refresh_steps)
        _at_least(f"{prefix}.fresh_negatives", self.fresh_negatives, 0)
        if self.context_lr is not None:
            _positive(f"{prefix}.context_lr", self.context_lr)


@dataclass
class RetrieverTrainingConfig:
    """`dpr`: rag-train-retriever's DPR stage (conf/train_retriever.yaml, conf/dpr/): the question and context
    encoders trained with in-batch plus hard negatives."""

    shared_encoder: bool = False  # one set of weights for questions and passages
    # false: the context encoder stays fixed and its passage vectors are computed once (the index's cached
    # vectors): only the question encoder trains, and validation needs no re-encoding of the corpus
    train_context_encoder: bool = True
    hard_negatives: int = 1  # per question, besides the in-batch ones
    # true: every passage of the corpus is a negative of every question (the exact retrieval softmax) instead of
    # the batch's passages: over the fixed context encoder's vectors (train_context_encoder=false), or over a bank
    # of the trained one's vectors refreshed every dpr.bank.refresh_steps (train_context_encoder=true)
    corpus_negatives: bool = False
    bank: CorpusBankConfig = field(default_factory=CorpusBankConfig)
    # where hard negatives come from: bm25, dense (the starting encoders' ranking of the whole corpus), mixed
    # (the two rankings in turns)
    negatives: str = "bm25"
    mining_depth: int = 50  # BM25 passages looked at per question for its positive and hard negatives
    batch_size: int = 16  # questions per step
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 100
    scheduler: str = "linear"  # linear | cosine | constant
    trainable_layers: int | None = None  # train only the top N layers of each encoder (None: all, embeddings too)
    eval_ks: list[int] = field(default_factory=lambda: [1, 3, 20])  # recall@k on the whole corpus
    eval_batch_size: int = 128  # passages or questions per encoding batch at validation
    validate_first: bool = False  # also validate the starting encoders (one more corpus encoding)

    def check(self, prefix: str = "dpr") -> None:
        _one_of(f"{prefix}.negatives", self.negatives, DPR_NEGATIVES)
        _one_of(f"{prefix}.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        _at_least(f"{prefix}.hard_negatives", self.hard_negatives, 0)
        for key in ("mining_depth", "batch_size", "lr", "eval_batch_size"):
            _positive(f"{prefix}.{key}", getattr(self, key))
        _at_least(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        if self.trainable_layers is not None:
            _positive(f"{prefix}.trainable_layers", self.trainable_layers)
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ConfigError(f"{prefix}.eval_ks={self.eval_ks} must be a non-empty list of ranks >= 1")
        if self.shared_encoder and not self.train_context_encoder:
            raise ConfigError(f"{prefix}.shared_encoder=true trains the one encoder for passages too: it needs "
                              f"{prefix}.train_context_encoder=true")
        if self.corpus_negatives and self.shared_encoder:
            raise ConfigError(f"{prefix}.corpus_negatives=true keeps every passage's vector in a bank, which the "
                              f"shared encoder's training would make stale at every step: set "
                              f"{prefix}.shared_encoder=false")
        self.bank.check(f"{prefix}.bank")
        if self.hard_negatives >= self.mining_depth:
            raise ConfigError(f"{prefix}.hard_negatives={self.hard_negatives} must be < {prefix}.mining_depth")


# ------------------------------------------------------------------------------------------ run
@dataclass
class LoaderConfig:
    global_batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0

    def check(self, prefix: str = "loader") -> None:
        _positive(f"{prefix}.global_batch_size", self.global_batch_size)
        _positive(f"{prefix}.eval_batch_size", self.eval_batch_size)
        _at_least(f"{prefix}.num_workers", self.num_workers, 0)


@dataclass
class PathsConfig:
    root_dir: str = "."
    cache_dir: str = MISSING  # prepared data, corpus stores, vectors and indexes, shared by runs
    output_dir: str = MISSING  # this run's directory


# ------------------------------------------------------------------------------------------ building
def _positive(key: str, value: float) -> None:
    if not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"{key}={value} must be a finite number > 0")
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def _at_least(key: str, value: float, low: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number >= {low}")
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


# Lightning Trainer arguments and the types they take (the trainer group is instantiated, not typed: a wrong
# type would surface as a TypeError deep inside Lightning, without the key)
TRAINER_INTS = ("max_steps", "max_epochs", "min_steps", "min_epochs", "log_every_n_steps", "accumulate_grad_batches",
                "check_val_every_n_epoch", "num_sanity_val_steps", "num_nodes")
TRAINER_NUMBERS = ("val_check_interval", "limit_train_batches", "limit_val_batches", "limit_test_batches",
                   "limit_predict_batches", "gradient_clip_val")


def check_trainer(node: Any, prefix: str = "trainer") -> None:
    """The numeric Trainer arguments of the `trainer` group have numeric values (null allowed)."""
    for key in (*TRAINER_INTS, *TRAINER_NUMBERS):
        value = node.get(key) if node is not None else None
        if value is None:
            continue
        wanted = (int,) if key in TRAINER_INTS else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted) or not math.isfinite(value):
            kind = "an integer" if key in TRAINER_INTS else "a number"
            raise ConfigError(f"{prefix}.{key}={value!r} must be {kind}. Fix: pass {prefix}.{key}=<{kind[2:].strip()}>")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def section(schema: type[T], node: Any, key: str) -> T:
    """The typed, checked section `key` of a composed config: `node` merged onto `schema`'s defaults.

    Unknown keys, wrong types and unset (`???`) values fail here with the full key; then the section's own
    `check` runs its range checks.
    """
    if node is None:
        raise ConfigError(f"config has no `{key}` section; compose it from the stage's root config under conf/")
    try:
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(plain))
        typed = OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        full_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        raise ConfigError(f"{full_key} is not set. Fix: pass {full_key}=... on the command line") from None
    except OmegaConfBaseException as err:
        full_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        reason = str(err).splitlines()[0]
        raise ConfigError(f"config key {full_key}: {reason}") from None
    check = getattr(typed, "check", None)
    if check is not None:
        check(key)
    return typed  # type: ignore[return-value]


def check_context_training(model: ModelConfig, index: IndexConfig) -> None:
    """`model.train_context_encoder` needs a dense index built by the context encoder it trains."""
    if model.train_context_encoder and index.type == "bm25":
        raise ConfigError(
            "model.train_context_encoder=true trains the context encoder behind a dense index, but index=bm25 "
            "scores passages without one. Fix: use index=flat (or hnsw, ivfpq), or model.train_context_encoder=false"
        )


def check_corpus_size(model: ModelConfig, corpus_size: int) -> None:
    """k passages per question must exist in the corpus."""
    if not model.retrieves:
        return
    for key, k in (("model.n_docs", model.n_docs), ("model.eval_n_docs", model.eval_n_docs)):
        if k is not None and k > corpus_size:
            raise ConfigError(f"{key}={k} is larger than the corpus ({corpus_size} passages)")


# ------------------------------------------------------------------------------------------ Hydra
SCHEMAS = {  # group -> the dataclass its files extend (listed as `_schema` first in their defaults)
    "data": DataConfig,
    "task": TaskConfig,
    "index": IndexConfig,
    "model": ModelConfig,
    "model/question_encoder": QuestionEncoderConfig,
    "model/generator": GeneratorConfig,
    "dpr": RetrieverTrainingConfig,
}


def register_configs() -> None:
    """Store each group's schema as `<group>/_schema`: the group's files extend it, so every key exists
    with its dataclass default (one source of defaults), and a misspelt key fails at composition."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name="_schema", node=schema)

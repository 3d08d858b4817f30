"""Experiments as YAML: load into frozen dataclasses, apply dotted overrides, validate, derive the plan's figures.

Every error is a ConfigError whose message is one line naming the key, the value and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .errors import FwrayError


class ConfigError(FwrayError):
    """A bad experiment: the message is one line that names the key, the value and the file."""

    exit_code = 2


def _check(ok: bool, key: str, value, why: str) -> None:
    """One section's rule; the loader adds the file's name to the message."""
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {why}")


# object stores a location (data.cache_dir, resources.storage_path) may name instead of a local path: pyarrow.fs's
URI_SCHEMES = ("s3", "gs", "gcs")


def _check_location(key: str, value: str) -> None:
    """A local path, or an object-store URI that carries no credentials and no options: credentials come from the
    environment or a profile (never an experiment file, which MLflow records), the endpoint from AWS_ENDPOINT_URL."""
    parsed = urlparse(value)
    if "://" not in value:
        return
    shown = f"{parsed.scheme}://{parsed.hostname or ''}{parsed.path}"  # never echo what a user put before the '@'
    _check(parsed.scheme in URI_SCHEMES, key, shown,
           f"must be a local path or an {', '.join(s + '://' for s in URI_SCHEMES)} URI")
    _check("@" not in parsed.netloc, key, shown, "credentials do not belong in the URI: set AWS_ACCESS_KEY_ID / "
           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment")
    _check(not parsed.query and not parsed.fragment and parsed.hostname, key, shown,
           "write it as s3://bucket/prefix, without ?options (the endpoint comes from AWS_ENDPOINT_URL, the region "
           "from AWS_REGION)")


def _at_least(section, minimum: int, *keys: str) -> None:
    name = type(section).SECTION
    for key in keys:
        value = getattr(section, key)
        _check(value is None or value >= minimum, f"{name}.{key}", value, f"must be at least {minimum}")


# model.recipe -> the defaults of the architecture switches (each one a model key of its own, so an ablation is one
# override: model.qk_norm=false)
RECIPES = {
    # nanoGPT's GPT-2: learned positions, LayerNorm, GELU, tied embeddings, GPT-2's scaled init of the projections
    "gpt2": dict(positions="learned", norm="layernorm", qk_norm=False, mlp="gelu", tie_embeddings=True,
                 zero_init_proj=False, zero_init_head=False, logit_softcap=0.0, embed_norm=False, value_embeds=0,
                 unet_skips=False, doc_mask=False, attn_window=0),
    # nanochat / modded-nanogpt: rotary positions, RMSNorm without a gain, RMSNorm on queries and keys, ReLU^2,
    # untied head, zero-init residual projections, logits soft-capped at 15 (both projects' value). Not (yet) their
    # zero-init head: they pair it with a head learning rate ~50x below the embedding's; under fwray's one AdamW rate
    # it cost 0.53 nats of validation loss after 300 steps of a 4 x 128 model (5.38 vs 4.85 with a normal-init head)
    "modern": dict(positions="rotary", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
                   zero_init_proj=True, zero_init_head=False, logit_softcap=15.0, embed_norm=False, value_embeds=0,
                   unet_skips=False, doc_mask=False, attn_window=0),
    # modern plus what modded-nanogpt's records and nanochat add on top, each piece a default where
    # bench/recipe_ablation.py found it no worse than modern beyond two seeds' spread (the README's table; value
    # embeddings too, but off for their memory: 1.9 GB more at 12 x 768, past a 4070's micro-batch). A recipe
    # of its own rather than a new modern: a checkpoint saved before a switch existed resolves it to its recipe's
    # default, so changing modern's defaults would silently change the model and the optimizer of every modern
    # checkpoint and experiment already written.
    "speedrun": dict(positions="rotary", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
                     zero_init_proj=True, zero_init_head=False, logit_softcap=15.0, embed_norm=True,
                     value_embeds=0, unet_skips=True, doc_mask=False, attn_window=0),
}
# ... and what it defaults in the other sections of an experiment file (a key the file sets wins): the modern recipe
# trains with Muon and a warmup-stable-decay schedule, and reads every window once per epoch
# switches added after models were saved, and the value every model had before: a saved config without the key is
# such a model (fwray.core.checkpoint), whatever its recipe defaults to now
BEFORE_THE_SWITCH = {"value_embeds": 0, "unet_skips": False}
RECIPE_TRAINING = {
    "gpt2": {},
    "modern": {"train": {"optimizer": "muon", "schedule": "wsd"}, "data": {"sampling": "epoch"}},
    "speedrun": {"train": {"optimizer": "muon", "schedule": "wsd", "muon_split_qkv": True, "muon_momentum_warmup": 300,
                           "decay_fraction": 0.5},
                 "data": {"sampling": "epoch"}},
}


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
    bias: bool = False  # biases in the linear layers and LayerNorms (the modern recipe has none)
    dropout: float = 0.0
    recipe: str = "gpt2"  # gpt2 | modern | speedrun: the defaults of the switches below
    # None => the recipe's value, resolved on construction (so the resolved value is what is logged and saved)
    positions: str | None = None  # learned (wpe) | rotary
    norm: str | None = None  # layernorm | rmsnorm (no learnable gain)
    qk_norm: bool | None = None  # RMSNorm on each head's queries and keys before attention
    mlp: str | None = None  # gelu | relu2
    tie_embeddings: bool | None = None  # the output head shares the input embedding's matrix
    zero_init_proj: bool | None = None  # the residual projections (attn and mlp c_proj) start at zero
    zero_init_head: bool | None = None  # the (untied) output head starts at zero
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); 0 = off
    embed_norm: bool | None = None  # the first block reads norm(embeddings), as nanochat's and modded-nanogpt's
    # extra token tables mixed into the attention's values: table i feeds layer i and layer n_layer - value_embeds + i
    # (modded-nanogpt's); 0 = off
    value_embeds: int | None = None
    unet_skips: bool | None = None  # block i's output joins block n_layer - 1 - i's input, i < n_layer / 2 (none at 1)
    doc_mask: bool | None = None  # attention stays within each document (fwray.core.attention)
    attn_window: int | None = None  # a query attends at most the last attn_window keys; 0 = no window

    SECTION: typing.ClassVar[str] = "model"

    def __post_init__(self):
        _at_least(self, 1, "n_layer", "n_head", "n_embd", "block_size")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
               f"must be divisible by model.n_head = {self.n_head}")
        _check(self.vocab_size >= 50257, "model.vocab_size", self.vocab_size, "must hold GPT-2's 50257 tokens")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(self.recipe in RECIPES, "model.recipe", self.recipe, f"must be one of {', '.join(RECIPES)}")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)  # frozen dataclass
        _check(self.positions in ("learned", "rotary"), "model.positions", self.positions,
               "must be learned or rotary")
        _check(self.norm in ("layernorm", "rmsnorm"), "model.norm", self.norm, "must be layernorm or rmsnorm")
        _check(self.mlp in ("gelu", "relu2"), "model.mlp", self.mlp, "must be gelu or relu2")
        _check(math.isfinite(self.logit_softcap) and self.logit_softcap >= 0, "model.logit_softcap",
               self.logit_softcap, "must be 0 (off) or positive")
        object.__setattr__(self, "logit_softcap", float(self.logit_softcap))
        _check(isinstance(self.doc_mask, bool), "model.doc_mask", self.doc_mask, "must be true or false")
        _check(isinstance(self.attn_window, int) and not isinstance(self.attn_window, bool) and self.attn_window >= 0,
               "model.attn_window", self.attn_window, "must be 0 (off) or a positive number of keys")
        _check(self.positions != "rotary" or (self.n_embd // self.n_head) % 2 == 0, "model.n_embd", self.n_embd,
               f"rotary positions rotate pairs of channels: n_embd / n_head = {self.n_embd // self.n_head} "
               "must be even")
        _check(not (self.recipe != "gpt2" and self.bias), "model.bias", self.bias,
               f"the {self.recipe} recipe has no biases (set model.bias=false)")
        _check(0 <= self.value_embeds <= self.n_layer // 2, "model.value_embeds", self.value_embeds,
               f"must be 0 (off) to n_layer / 2 = {self.n_layer // 2}: each table feeds one of the first and one of "
               "the last layers")
        _check(not (self.zero_init_head and self.tie_embeddings), "model.zero_init_head", self.zero_init_head,
               "a tied head is the input embedding and cannot start at zero (set model.tie_embeddings=false)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 12  # micro-batch per worker
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest (fwray.core.optim)
    learning_rate: float = 6e-4  # AdamW's rate: every group under adamw; norms, biases and scalars under muon
    muon_lr: float | None = None  # None => fwray.core.optim's default (shape-scaled: no retuning when n_embd changes)
    muon_momentum: float = 0.95
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum (fwray.core.optim)
    muon_split_qkv: bool = False  # Muon orthogonalises the attention's query, key and value matrices one by one
    muon_weight_decay: float | None = None  # decoupled, on Muon's matrices; None => weight_decay
    embedding_lr: float | None = None  # None => learning_rate (adamw), a width-scaled default (muon)
    head_lr: float | None = None  # the output layer (and the embedding tied to it); None as embedding_lr
    max_iters: int | None = None  # optimizer steps; None => derived from `epochs`
    epochs: float | None = None  # passes over the prepared train split; used when max_iters is None
    schedule: str = "cosine"  # cosine, or wsd: warmup, constant, then linear decay over the last decay_fraction
    warmup_iters: int = 0
    lr_decay_iters: int | None = None  # where the schedule reaches min_lr; None => max_iters
    decay_fraction: float = 0.2  # wsd: the share of lr_decay_iters that decays
    min_lr: float = 6e-5  # the floor: every group ends at min_lr / learning_rate of its own rate
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # decoupled, on every matrix (AdamW's and Muon's); none on norms, biases, scalars
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    eval_batch_size: int | None = None  # None => batch_size
    log_interval: int = 10
    compile: bool | str = "auto"  # auto: on for CUDA, off on CPU; true: on any device; where it can run (else eager)
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU; or float32, bfloat16
    seed: int = 1337
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    activation_checkpointing: bool = False
    loss_chunk_size: int = 4096  # tokens per cross-entropy chunk; bounds logits memory

    SECTION: typing.ClassVar[str] = "train"

    def __post_init__(self):
        _at_least(self, 1, "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                  "log_interval", "loss_chunk_size", "keep_checkpoints", "max_nonfinite_steps", "max_iters",
                  "eval_batch_size")
        _check(self.epochs is None or self.epochs > 0, "train.epochs", self.epochs, "must be positive")
        _at_least(self, 0, "warmup_iters", "muon_momentum_warmup")
        _check(self.optimizer in ("adamw", "muon"), "train.optimizer", self.optimizer, "must be adamw or muon")
        for key in ("learning_rate", "muon_lr", "embedding_lr", "head_lr"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"train.{key}", value, "must be positive")
        _check(0 <= self.muon_momentum < 1, "train.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        _check(self.schedule in ("cosine", "wsd"), "train.schedule", self.schedule, "must be cosine or wsd")
        _check(0 < self.decay_fraction <= 1, "train.decay_fraction", self.decay_fraction, "must be in (0, 1]")
        _check(0 <= self.min_lr <= self.learning_rate, "train.min_lr", self.min_lr,
               "must be in [0, train.learning_rate]")
        _check(0 <= self.beta1 < 1, "train.beta1", self.beta1, "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "train.beta2", self.beta2, "must be in [0, 1)")
        for key in ("weight_decay", "muon_weight_decay"):
            value = getattr(self, key)
            _check(value is None or value >= 0, f"train.{key}", value, "must be 0 (off) or positive")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be 0 (off) or positive")
        _check(self.compile in (True, False, "auto"), "train.compile", self.compile, "must be true, false or auto")
        _check(self.dtype in ("auto", "float32", "bfloat16"), "train.dtype", self.dtype,
               "must be auto, float32 or bfloat16")


SAMPLINGS = ("random", "epoch")  # data.sampling: how training windows are ordered (fwray.core.loader)


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()
    text_column: str = "text"
    id_column: str = "id"
    tokenizer: str = "gpt2"
    val_fraction: float = 0.005
    cache_dir: str = ".fwray/cache"  # or s3://bucket/prefix, gs://...: the cluster's nodes fetch it (fwray.storage)
    node_cache_dir: str | None = None  # a node's copy of a cache on object storage; None: under $TMPDIR
    min_language_score: float | None = None
    min_chars: int = 0
    num_workers: int | None = None  # tokenizer workers; None => one per CPU
    rows_per_task: int = 20_000  # rows one tokenizer task reads; bounds memory per worker
    sampling: str = "random"  # random: windows drawn with replacement; epoch: each window once per epoch (loader)
    align_to_documents: bool = False  # training windows start at document starts (loader)

    SECTION: typing.ClassVar[str] = "data"

    def __post_init__(self):
        # data.paths may be empty here (the core needs no data); an experiment file must give some (from_dict)
        _check(self.tokenizer == "gpt2", "data.tokenizer", self.tokenizer, "only gpt2 is supported")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _at_least(self, 0, "min_chars")
        _at_least(self, 1, "num_workers", "rows_per_task")
        _check(self.sampling in SAMPLINGS, "data.sampling", self.sampling, f"must be {' or '.join(SAMPLINGS)}")
        _check_location("data.cache_dir", self.cache_dir)
        _check(self.node_cache_dir is None or "://" not in self.node_cache_dir, "data.node_cache_dir",
               self.node_cache_dir, "must be a local folder (each node's own disk)")


YARDSTICK_SUFFIXES = (".bin", ".parquet")  # llm.c's token files; documents fwray tokenizes (fwray.core.yardstick)


@dataclass(frozen=True)
class YardstickConfig:
    """An extra validation set from a local file, evaluated beside val_loss (fwray.core.yardstick)."""

    path: str | None = None  # an llm.c token file (.bin) or a parquet of documents; None: no yardstick
    name: str | None = None  # None => the file's name without its suffix
    tokens: int | None = 10_485_760  # targets read from the start (llm.c's figure); None: the whole file

    SECTION: typing.ClassVar[str] = "yardstick"

    def __post_init__(self):
        _at_least(self, 1, "tokens")
        if self.path is None:
            return
        _check(Path(self.path).suffix in YARDSTICK_SUFFIXES, "yardstick.path", self.path,
               "must be an llm.c token file (.bin) or a parquet of documents (.parquet)")
        _check(os.path.isfile(self.path), "yardstick.path", self.path,
               "no such file: the README's Yardstick section says where fineweb_val_000000.bin comes from")
        if self.name is None:
            object.__setattr__(self, "name", Path(self.path).stem)  # frozen dataclass


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1
    use_gpu: bool | str = "auto"  # auto: use a GPU when torch sees one
    max_failures: int = 3
    storage_path: str = ".fwray/runs"  # or s3://bucket/prefix, gs://...: checkpoints, model, --resume (fwray.storage)

    SECTION: typing.ClassVar[str] = "resources"

    def __post_init__(self):
        _at_least(self, 1, "num_workers")
        _at_least(self, 0, "max_failures")
        _check(self.use_gpu in (True, False, "auto"), "resources.use_gpu", self.use_gpu,
               "must be true, false or auto")
        _check_location("resources.storage_path", self.storage_path)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None => $MLFLOW_TRACKING_URI, else a local sqlite store
    experiment: str | None = None  # None => the experiment's name
    required: bool = True  # False: an unreachable server falls back to the local store
    register_model: bool = True  # the final model as a registered MLflow model too (a second copy of the weights)

    SECTION: typing.ClassVar[str] = "tracking"


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool = False
    batch_sizes: tuple[int, ...] = ()
    gpu_memory_gb: float | None = None  # the target card's memory; None => the card the probe runs on
    context_overhead_gb: float | None = None  # lost outside PyTorch (CUDA context, display); None => measured
    margin: float = 0.1
    steps: int = 5  # the first step warms up (compiles); the rest are timed
    activation_checkpointing: tuple[bool, ...] = (False,)
    compile: tuple[bool, ...] = ()  # empty => the train setting

    SECTION: typing.ClassVar[str] = "probe"

    def __post_init__(self):
        _check(all(b >= 1 for b in self.batch_sizes), "probe.batch_sizes", list(self.batch_sizes),
               "must all be at least 1")
        _check(not self.enabled or len(self.batch_sizes) >= 1, "probe.batch_sizes", list(self.batch_sizes),
               "the probe is enabled: list at least one micro-batch size")
        _check(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "probe.gpu_memory_gb", self.gpu_memory_gb,
               "must be positive")
        _check(self.context_overhead_gb is None or self.context_overhead_gb >= 0, "probe.context_overhead_gb",
               self.context_overhead_gb, "must be 0 or more")
        _check(0 <= self.margin < 1, "probe.margin", self.margin, "must be in [0, 1)")
        _check(self.steps >= 3, "probe.steps", self.steps, "must be at least 3 (the first steps warm up)")


@dataclass(frozen=True)
class HardwareConfig:
    peak_tflops: float | None = None  # overrides the peak-FLOPs table for MFU
    gpu: str | None = None  # the card the plan predicts for (e.g. "RTX 4070", or "cpu"); None => the one torch sees
    # for the time prediction: one figure; None => the band for the card's class (fwray.plan.figures.MFU_BANDS). The run
    # measures the real one
    assumed_mfu: float | None = None
    tokens_per_s: float | None = None  # planned training tokens/s (fwray.plan writes it): overrides MFU
    tokens_per_s_measured: bool = False  # fwray.plan --measure timed this shape on the card: one time, not a range
    eval_seconds: float | None = None  # planned seconds of one evaluation and its checkpoint (fwray.plan writes it)

    SECTION: typing.ClassVar[str] = "hardware"

    def __post_init__(self):
        _check(self.peak_tflops is None or self.peak_tflops > 0, "hardware.peak_tflops", self.peak_tflops,
               "must be positive")
        _check(self.assumed_mfu is None or 0 < self.assumed_mfu <= 1, "hardware.assumed_mfu", self.assumed_mfu,
               "must be in (0, 1]")
        _check(self.tokens_per_s is None or self.tokens_per_s > 0, "hardware.tokens_per_s", self.tokens_per_s,
               "must be positive")
        _check(self.eval_seconds is None or self.eval_seconds >= 0, "hardware.eval_seconds", self.eval_seconds,
               "must be 0 or more")
        _check(not self.tokens_per_s_measured or self.tokens_per_s, "hardware.tokens_per_s_measured",
               self.tokens_per_s_measured, "says hardware.tokens_per_s was measured, but it is not set: set both")


@dataclass(frozen=True)
class Experiment:
    name: str = "fwray"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    yardstick: YardstickConfig = field(default_factory=YardstickConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    source: str = field(default="<defaults>", compare=False)  # the file it came from, for messages

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.model, self.train, self.resources.num_workers)

    def accumulation_for(self, batch_size: int) -> int:
        """Accumulation steps that keep tokens per optimizer step nearest to the configured figure at this
        micro-batch (every worker's micro-batches count)."""
        per_micro = batch_size * self.model.block_size * self.resources.num_workers
        return max(1, round(self.tokens_per_step / per_micro))

    def with_changes(self, section: str, **changes) -> "Experiment":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def tokens_per_step(model: ModelConfig, train: TrainConfig, workers: int) -> int:
    """Tokens one optimizer step trains on: every worker's micro-batches of block_size tokens, accumulated."""
    return train.batch_size * model.block_size * train.gradient_accumulation_steps * workers


# section name -> its dataclass
SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Experiment) if f.name not in ("name", "source")}


# ---------------------------------------------------------------- loading


def load(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Experiment:
    """Read an experiment YAML, apply `section.key=value` overrides (values parsed as YAML) and validate."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: experiment file not found (give the path of an experiments/*.yaml file)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    # data.paths in the file are relative to the file, so experiments can bundle their data
    _resolve_data_paths(raw, path.parent)
    _resolve_yardstick_path(raw, path.parent)
    given = {}  # (section, key) -> the override that set it, to say where a bad key came from
    for item in overrides:
        given[_apply_override(raw, item, where)] = item
    return from_dict(raw, where, given)


def from_dict(raw: dict, where: str = "<dict>", given: dict[tuple[str, str], str] | None = None) -> Experiment:
    """An experiment from its sections; `given` names the keys the command line set, for messages."""
    raw = dict(raw)
    given = given or {}
    name = raw.pop("name", "fwray")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name = {name!r}: must be a non-empty string")
    sections = {}
    recipe = raw.get("model", {}).get("recipe", "gpt2") if isinstance(raw.get("model"), dict) else "gpt2"
    for section, defaults in RECIPE_TRAINING.get(recipe, {}).items():
        if isinstance(raw.get(section, {}), dict):
            raw[section] = {**defaults, **raw.get(section, {})}
    for key, value in raw.items():
        if key not in SECTIONS:
            origin = _origin(given, key)
            raise ConfigError(f"{where}: unknown section {key!r}{origin}; {_nearest(key, ['name', *SECTIONS])}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} = {value!r}: must be a mapping of keys")
        sections[key] = _build(SECTIONS[key], value, key, where, given)
    exp = Experiment(name=name, source=where, **sections)
    # what an experiment file needs beyond valid sections (the core runs without data or a budget)
    if not exp.data.paths:
        raise ConfigError(f"{where}: data.paths = []: give at least one parquet file or glob")
    if exp.train.max_iters is None and exp.train.epochs is None:
        raise ConfigError(f"{where}: train.max_iters = None: set train.max_iters or train.epochs")
    return exp


def _resolve_data_paths(raw: dict, base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict) or "paths" not in data:
        return
    paths = data["paths"]
    if isinstance(paths, str):
        paths = [paths]
    if isinstance(paths, list):
        data["paths"] = [_under(base, p) if isinstance(p, str) else p for p in paths]


def _resolve_yardstick_path(raw: dict, base: Path) -> None:
    """Absolute, so the run's config.yaml and the training workers find it from anywhere."""
    section = raw.get("yardstick")
    if isinstance(section, dict) and isinstance(section.get("path"), str):
        section["path"] = os.path.abspath(_under(base, section["path"]))


def _under(base: Path, p: str) -> str:
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) or "://" in p else str(base / p)


def _apply_override(raw: dict, item: str, where: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"{where}: override {item!r} must look like section.key=value (e.g. train.max_iters=50)")
    section, _, name = key.partition(".")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"{where}: override {item!r}: {text!r} is not a YAML value") from None
    if section == "data" and name == "paths":  # command-line paths are relative to where the command runs
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            value = [os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) else p for p in value]
    if (section, name) == ("yardstick", "path") and isinstance(value, str):
        value = os.path.abspath(os.path.expanduser(value))
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{where}: override {item!r}: {section} is not a section")
    target[name] = value
    return section, name


def _build(cls: type, values: dict, section: str, where: str, given: dict[tuple[str, str], str]):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # fields(): the ClassVar SECTION is not a key
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            origin = _origin(given, section, key)
            raise ConfigError(f"{where}: unknown key {section}.{key} = {value!r}{origin}; "
                              f"{_nearest(key, sorted(known), f'{section}.')}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", where)
    try:
        return cls(**kwargs)  # the section validates itself
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _origin(given: dict[tuple[str, str], str], section: str, key: str | None = None) -> str:
    """' (on the command line: ITEM)' for a key an override set, else ' (in the file)'."""
    items = [item for (s, k), item in given.items() if s == section and key in (None, k)]
    return f" (on the command line: {items[0]})" if items else " (in the file)"


def _nearest(name: str, choices: list[str], section: str = "") -> str:
    """'did you mean train.batch_size?' for a misspelt key (or section), as git and argparse suggest."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {section}{close[0]}?"
    if section:
        return f"{section.rstrip('.')} has no such key (the README's Experiment files section lists them)"
    return f"the sections: {', '.join(choices)}"


def _coerce(value, hint, key: str, where: str):
    """Check `value` against a type hint; accept ints for floats, one item for a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key} = {value!r}: expected {_describe(hint)}")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(v, args[0], key, where) for v in items)
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {key} = {value!r}: expected {_describe(hint)}")


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0])}"
    if args:
        return " or ".join(_describe(a) for a in args)
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


# ---------------------------------------------------------------- derived figures


def max_iters_for(exp: Experiment, train_tokens: int) -> int:
    """Optimizer steps: train.max_iters, or enough steps for train.epochs over `train_tokens`."""
    if exp.train.max_iters is not None:
        return exp.train.max_iters
    return max(1, math.ceil(exp.train.epochs * train_tokens / exp.tokens_per_step))


def resolve(exp: Experiment, train_tokens: int) -> Experiment:
    """Fix the figures that depend on the data: max_iters (from epochs) and lr_decay_iters."""
    iters = max_iters_for(exp, train_tokens)
    decay = exp.train.lr_decay_iters if exp.train.lr_decay_iters is not None else iters
    return exp.with_changes("train", max_iters=iters, lr_decay_iters=decay)


def flatten(exp: Experiment) -> dict[str, object]:
    """Every resolved setting under its dotted name (model.n_layer, train.batch_size, ...)."""
    out: dict[str, object] = {"name": exp.name}
    for section in SECTIONS:
        for key, value in dataclasses.asdict(getattr(exp, section)).items():
            out[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def to_yaml(exp: Experiment) -> str:
    data = {"name": exp.name}
    for section in SECTIONS:
        data[section] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(exp, section)).items()}
    return yaml.safe_dump(data, sort_keys=False)

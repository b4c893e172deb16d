"""The run configuration's schema: frozen dataclasses `Config` -> `model`, `data`, `optim`, `train`, `mesh`.

Defaults live in the dataclasses; a YAML file holds only what differs. Loading (files merged left to right, then
dotted `key=value` overrides, every value checked against its field's type) is the generic train/yaml_config.py;
each dataclass's `__post_init__` here checks ranges, so a bad config fails before anything is built with one line
naming the key (`ConfigError`).
"""

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml

from effarch.arches.lm import ModelConfig
from effarch.train.yaml_config import ConfigError, build, load_merged, load_yaml, parse_override, to_dict

__all__ = ["Config", "ConfigError", "DataConfig", "LandmarkData", "LoRAConfig", "MeshConfig", "MqarBidirData",
           "MqarData", "NiahData", "OptimConfig", "PasskeyData", "TextData", "TrainConfig", "config_from_dict",
           "dump_config", "load_config", "load_yaml", "parse_override", "to_dict", "upgrade_data_keys"]


@dataclasses.dataclass(frozen=True, slots=True)
class MqarData:
    """Task "mqar": Zoology's multi-query associative recall (train/data/mqar.py)."""

    # "custom" uses train_segments / test_segments; "zoology_standard" is Zoology's sweep
    # (train/data/mqar.py::TRAIN_SEGMENTS).
    mixture: Literal["custom", "zoology_standard"] = "custom"
    train_segments: tuple[tuple[int, int, int], ...] = ((64, 4, 20_000),)  # (seq_len, num_kv_pairs, num_examples)
    test_segments: tuple[tuple[int, int, int], ...] = ((64, 4, 1_000),)
    power_a: float = 0.01  # power-law exponent of the query gaps
    random_non_queries: bool = True  # fill the query region's gaps with random tokens

    def __post_init__(self):
        for name in ("train_segments", "test_segments"):
            segs = getattr(self, name)
            if self.mixture == "custom" and not segs:
                raise ValueError(f"{name} must list at least one (seq_len, num_kv_pairs, num_examples)")
            for seg in segs:
                if len(seg) != 3 or min(seg) < 1:
                    raise ValueError(f"{name}: each entry is (seq_len, num_kv_pairs, num_examples) > 0, got {seg}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


@dataclasses.dataclass(frozen=True, slots=True)
class MqarBidirData:
    """Task "mqar_bidir": MQAR read non-causally, the answers masked (train/data/mqar_bidir.py); windows of
    data.seq_len tokens."""

    num_kv_pairs: int = 8  # D key-value pairs and D queries per sequence (4 D <= data.seq_len)
    examples: int = 20_000  # training examples (evaluation: test_examples more from seed + 1000)
    test_examples: int = 1_000

    def __post_init__(self):
        for name in ("num_kv_pairs", "examples", "test_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, slots=True)
class TextData:
    """Tasks "bytes" and "text": the corpus, and (task "text") its tokenizer and TFDS splits."""

    # A glob of files or a directory (plain files: one document each; .jsonl, .jsonl.gz, .jsonl.zst and .parquet
    # files: one per record, see field), the running Python's standard library ("python_stdlib"), or (task "text")
    # tfds:NAME, a prepared TFDS dataset
    source: str = "python_stdlib"
    max_bytes: int = 4_000_000  # train on at most this much text (memory does not grow with it)
    val_fraction: float = 0.02  # the fraction of documents (bytes: of the text) held out for validation
    # task "text" only:
    # bytes: ids 0-255 + separator 256; hf: a Hugging Face tokenizer.json (the `tokenizers` library)
    tokenizer: Literal["bytes", "sentencepiece", "tiktoken", "hf"] = "bytes"
    # sentencepiece: the .model file; tiktoken: an encoding name or a .tiktoken file; hf: a tokenizer.json or a
    # directory holding one
    tokenizer_model: str = ""
    # tokenizer hf: the token that ends each document ("" = the tokenizer's EOS, from the tokenizer_config.json beside
    # tokenizer.json, else a token such as </s> or <|endoftext|>)
    separator_token: str = ""
    field: str = "text"  # the text's field in the records of .jsonl / .parquet files, or the feature of tfds:NAME
    train_split: str = "train"  # TFDS split names (local corpora have "train" and "validation")
    eval_split: str = "validation"
    max_eval_bytes: int = 262_144  # read at most this much text of eval_split (max_bytes bounds train_split)
    # every window (training, evaluation, `effarch eval perplexity --lengths`) starts with a beginning-of-sequence
    # token, the content shifted by one (train/data/packing.py); its id is one past the tokenizer's (bytes: 257), so
    # model.vocab_size needs one id more
    bos: bool = False

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_eval_bytes < 1:
            raise ValueError(f"max_bytes and max_eval_bytes must be >= 1, got {self.max_bytes}, {self.max_eval_bytes}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer != "bytes" and not self.tokenizer_model:
            raise ValueError(f"tokenizer={self.tokenizer} needs tokenizer_model (a SentencePiece .model file, a "
                             "tiktoken encoding name or a Hugging Face tokenizer.json)")
        if self.separator_token and self.tokenizer != "hf":
            raise ValueError(f"separator_token is for tokenizer=hf, not {self.tokenizer}")
        if self.source.startswith("tfds:") and not self.source[len("tfds:"):]:
            raise ValueError("source='tfds:' needs a dataset name, e.g. tfds:my_dataset or tfds:name/config")


@dataclasses.dataclass(frozen=True, slots=True)
class LandmarkData:
    """Tasks "bytes" and "passkey": landmark tokens for Landmark Attention (= model.landmark.block_len)."""

    block_len: int = 0  # insert a landmark token after every L tokens (0: none)
    token: int = 256  # its id (model.vocab_size must exceed it)

    def __post_init__(self):
        if self.block_len < 0 or self.token < 0:
            raise ValueError(f"block_len and token must be >= 0, got {self.block_len}, {self.token}")


@dataclasses.dataclass(frozen=True, slots=True)
class PasskeyData:
    """Task "passkey": the token-level passkey retrieval of train/data/passkey.py (vocab_size >= 19)."""

    examples: int = 8192  # training examples (evaluation: 256 more from seed + 1000)
    queries: int = 1  # questions per training sequence (evaluation asks one, at the end)

    def __post_init__(self):
        if self.examples < 1 or self.queries < 1:
            raise ValueError(f"examples and queries must be >= 1, got {self.examples}, {self.queries}")


@dataclasses.dataclass(frozen=True, slots=True)
class NiahData(PasskeyData):
    """Task "niah": the token-level single needle in a haystack of train/data/niah.py (vocab_size >= 36); examples
    and queries as the passkey task's."""

    # Training depths uniform in [0, 1] (0), or from N >= 2 evenly spaced depths 0..1, ends included (RULER: 40);
    # the held-out examples stay uniform
    depths: int = 0

    def __post_init__(self):
        PasskeyData.__post_init__(self)  # not super(): dataclass(slots=True) replaces the class it decorates
        if self.depths == 1 or self.depths < 0:
            raise ValueError(f"depths must be 0 (uniform depths) or >= 2 (a grid of depths), got {self.depths}")


@dataclasses.dataclass(frozen=True, slots=True)
class DataConfig:
    """What the model trains on: the task, its shared settings, and one group of settings per task."""

    # "mqar": Zoology's associative recall (data.mqar); "bytes": next-byte LM on data.text.source (vocab >= 256),
    # windows of the concatenated files; "text": language modelling on the documents of data.text.source,
    # tokenized, packed with a separator between documents (train/data/text_stream.py); "passkey" / "niah": the
    # token-level retrieval tasks (data.passkey / data.niah), windows of seq_len; "mqar_bidir": MQAR read
    # non-causally with the answers masked (data.mqar_bidir), for non-causal mixers, windows of seq_len
    task: Literal["mqar", "bytes", "passkey", "niah", "text", "mqar_bidir"] = "mqar"
    seed: int = 0  # train data uses seed, test data seed + 1000 (disjoint streams)
    seq_len: int = 256  # tokens per training window (every task but mqar, whose segments carry their own)
    # Where prepared TFDS datasets live (local corpora are built there once): "" = $EFFARCH_DATA_DIR, else
    # ~/.cache/effarch/tfds. Tasks "bytes" and "text".
    data_dir: str = ""
    mqar: MqarData = MqarData()
    mqar_bidir: MqarBidirData = MqarBidirData()
    text: TextData = TextData()
    landmark: LandmarkData = LandmarkData()
    passkey: PasskeyData = PasskeyData()
    niah: NiahData = NiahData()

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.landmark.block_len and self.seq_len % (self.landmark.block_len + 1):
            raise ValueError(f"seq_len={self.seq_len} must be a multiple of landmark.block_len + 1 = "
                             f"{self.landmark.block_len + 1} (windows start on a block boundary)")
        if self.text.source.startswith("tfds:") and self.task != "text":
            raise ValueError(f"text.source={self.text.source!r} (a TFDS dataset) needs task: text, not {self.task}")
        if self.text.bos and self.task != "text":
            raise ValueError(f"text.bos is for task: text (packed windows of documents), not {self.task}")
        if self.task == "mqar_bidir" and 4 * self.mqar_bidir.num_kv_pairs > self.seq_len:
            raise ValueError(f"mqar_bidir.num_kv_pairs={self.mqar_bidir.num_kv_pairs} needs seq_len >= 4 x it "
                             f"(D pairs and D queries of two tokens), got seq_len={self.seq_len}")
        if self.task == "mqar_bidir" and self.seq_len % 2:
            raise ValueError(f"seq_len={self.seq_len} must be even for task mqar_bidir (two-token slots)")
        if self.task == "text" and self.landmark.block_len:
            raise ValueError("landmark.block_len is for tasks bytes and passkey; task: text does not insert landmarks")


# The flat keys of DataConfig before its settings were grouped per task: old configs and run directories keep
# loading (a key moves to its group; giving both spellings is an error).
MOVED_DATA_KEYS: dict[str, tuple[str, str]] = {
    **{k: ("mqar", k) for k in ("mixture", "train_segments", "test_segments", "power_a", "random_non_queries")},
    "text_source": ("text", "source"), "text_field": ("text", "field"),
    **{k: ("text", k) for k in ("max_bytes", "val_fraction", "tokenizer", "tokenizer_model", "train_split",
                                "eval_split", "max_eval_bytes")},
    "landmark_block_len": ("landmark", "block_len"), "landmark_token": ("landmark", "token"),
    "passkey_examples": ("passkey", "examples"), "passkey_queries": ("passkey", "queries"),
    "niah_examples": ("niah", "examples"), "niah_queries": ("niah", "queries"), "niah_depths": ("niah", "depths"),
}


def upgrade_data_keys(values: dict) -> dict:
    """`values` (nested plain config) with data's flat pre-grouping keys moved into their groups."""
    data = values.get("data")
    if not isinstance(data, dict) or not MOVED_DATA_KEYS.keys() & data.keys():
        return values
    data = dict(data)
    for old, (group, new) in MOVED_DATA_KEYS.items():
        if old not in data:
            continue
        sub = data.get(group, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"data.{group}: expected a mapping, got {sub!r}")
        if new in sub:
            raise ConfigError(f"data.{old} is the old spelling of data.{group}.{new}; give only one of them")
        data[group] = {**sub, new: data.pop(old)}
    return {**values, "data": data}


@dataclasses.dataclass(frozen=True, slots=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.1  # AdamW; applied to matrices only (ndim >= 2), not to norms, biases or conv taps
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm clipping; null disables

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for b in ("b1", "b2"):
            if not 0 <= getattr(self, b) < 1:
                raise ValueError(f"{b} must be in [0, 1), got {getattr(self, b)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or null, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in ("data", "fsdp", "tensor"):
            v = getattr(self, axis)
            if v == 0 or v < -1:
                raise ValueError(f"{axis} must be a positive size or -1, got {v}")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ValueError("at most one mesh axis may be -1")


# Logical parameter / activation axis -> mesh axes (docs/training.md, "Sharding"). A mesh axis of size 1 is a
# no-op, so the same table serves one CPU and a pod slice.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("conv", ("tensor",)),
)


@dataclasses.dataclass(frozen=True, slots=True)
class LoRAConfig:
    """`train.lora`: low-rank adapters on the linear layers `targets` names (layers/lora.py, train/lora.py); every
    other parameter is frozen unless `train_also` names it."""

    rank: int = 8  # r of A [d_in, r] and B [r, d_out]
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank (LoRA, arXiv 2106.09685, §4.1)
    # Regexes (re.search) on the kernel paths of linear layers, e.g. "mixer/[qkvo]_proj/kernel"; each must match one
    targets: tuple[str, ...] = ()
    # Regexes on parameter paths of base weights that train too (LongLoRA's LoRA+: "^embed/", "norm"); each must match
    train_also: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not self.targets:
            raise ValueError("targets must list at least one regex on linear layers' kernel paths, e.g. "
                             "'mixer/[qkvo]_proj/kernel'")
        for name in ("targets", "train_also"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name}: {pattern!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    run_dir: str = "runs/default"  # metrics, checkpoints and the resolved config go here; resumed if present
    steps: int = 1000  # optimizer updates
    batch_size: int = 64  # global batch (sequences per update)
    grad_accum_steps: int = 1  # micro-batches per update; batch_size must divide evenly
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # params stay float32 (master copy)
    seed: int = 0  # parameter init and the RNG; the data order is data.seed
    log_every: int = 10
    eval_every: int = 100
    eval_batch_size: int = 256
    stop_at_accuracy: float | None = None  # stop early once the mean test accuracy reaches this
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    progress: bool = True  # tqdm progress bar on stderr
    # Batches made ahead on a background thread and already put on the devices when their step starts
    # (train/prefetch.py); 0 makes each batch in the loop, just before its step.
    prefetch: int = 2
    # What to do with a run_dir that already holds checkpoints. "auto": resume from the newest complete one (a
    # config change that would make it mean something else is refused); "require": the same, but fail when there is
    # nothing to resume; "never": move the old run aside to run_dir/previous/<time>/ and start from step 0.
    resume: Literal["auto", "never", "require"] = "auto"
    # Fine-tuning: initialise the parameters (only: not the optimizer state or the step) from a run directory (its
    # newest complete checkpoint) or one checkpoint directory (run_dir/checkpoints/<step>), matched by parameter
    # path. Ignored when the run resumes from its own checkpoint.
    init_from: str | None = None
    # A parameter present in both models with a different shape: "error" stops naming it; "init" keeps the new
    # initialisation; "overlap" copies the overlapping slice into the new initialisation (pads / truncates, e.g. a
    # vocabulary grown or cut at its end).
    init_mismatch: Literal["error", "init", "overlap"] = "error"
    # Regexes (re.search) on parameter paths like "blocks/0/mixer/q_proj/kernel": matching parameters get no
    # update, no weight decay and no optimizer state.
    freeze: tuple[str, ...] = ()
    # LoRA fine-tuning (null: off): adapters on the linear layers lora.targets matches; the base weights are frozen
    # except those lora.train_also matches (docs/checkpoints.md, "LoRA")
    lora: LoRAConfig | None = None
    aux_loss_weight: float = 0.01  # β: weight of the layers' auxiliary losses (MoH load balance; layers/aux_loss.py)
    # What the step minimises. "lm": cross entropy on the labels (+ β·aux). "duo": DuoAttention's gate training
    # (arXiv 2410.10819 §3; official duo_attn/train.py): at the labelled positions, the mean over d of the squared
    # difference between the final-norm hidden states of the model and of the same model with every gate at 1 (full
    # attention, no gradient), plus duo_l1·mean|α| over all gates. Needs model.attention.duo_gates; freeze the rest
    # (configs/passkey/duo_gates.yaml). The logged loss stays the model's cross entropy; aux/duo_distill and
    # aux/duo_l1 are the two terms.
    objective: Literal["lm", "duo"] = "lm"
    duo_l1: float = 0.05  # λ of objective duo (the official reg_weight)
    sample_tokens: int = 96  # data.task text: tokens `effarch train` samples (temperature 0.7) for its summary; 0: none

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_every", "eval_batch_size",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (batches made ahead; 0 turns it off), got {self.prefetch}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum_steps="
                             f"{self.grad_accum_steps}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {self.sample_tokens}")
        if self.objective not in ("lm", "duo"):
            raise ValueError(f"objective must be 'lm' or 'duo', got {self.objective!r}")
        if self.duo_l1 < 0:
            raise ValueError(f"duo_l1 must be >= 0, got {self.duo_l1}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if self.stop_at_accuracy is not None and not 0 < self.stop_at_accuracy <= 1:
            raise ValueError(f"stop_at_accuracy must be in (0, 1], got {self.stop_at_accuracy}")
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("init_from must name a run directory or a checkpoint, or be null")
        for pattern in self.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"freeze: {pattern!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    sharding_rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    def __post_init__(self):
        mesh_axes = {"data", "fsdp", "tensor"}
        for logical, axes in self.sharding_rules:
            bad = [a for a in axes if a not in mesh_axes]
            if bad:
                raise ValueError(f"sharding_rules: {logical!r} maps to unknown mesh axes {bad}; "
                                 f"use {sorted(mesh_axes)}")
        # The landmark mixer finds landmarks by position, so the data must put them exactly there.
        if "landmark" in self.model.mixers and self.data.task in ("bytes", "passkey") and (
            self.data.landmark.block_len != self.model.landmark.block_len
        ):
            raise ValueError(f"data.landmark.block_len={self.data.landmark.block_len} must equal "
                             f"model.landmark.block_len={self.model.landmark.block_len}")


# --- loading (train/yaml_config.py does the work) ---------------------------------------------------------


def config_from_dict(values: dict) -> Config:
    """A validated Config from nested plain values (as to_dict gives), with the same one-line errors as load_config."""
    return build(Config, upgrade_data_keys(values))


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Merges the YAML files left to right, applies dotted overrides, validates, returns a frozen Config."""
    return build(Config, upgrade_data_keys(load_merged(paths, overrides)))


def dump_config(config: Config) -> str:
    """YAML text that load_config reads back into an equal Config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)

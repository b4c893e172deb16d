"""Token-mixer registry: a layer of the decoder LM is picked by name, so a hybrid layout is a list in the config.

Two tables, each filled by one call per entry below:

- `CONFIGS`: a mixer config dataclass under its YAML key (`register_config("based", BasedConfig, small=...)` makes
  `model.based.*` and the field `ModelConfig.based`). `small` is an instance that builds at d_model 24: the
  conformance suite (tests/conformance/) runs every mixer with it.
- `MIXERS`: a mixer under its registry name (`register("based", BasedLinearAttention, configs=("based",), ...)`):
  the config keys it reads, how its decode state grows, and the conformance checks it cannot pass (with the reason).

Every mixer implements the `effarch.layers.axes.Mixer` protocol (parallel call, init_state / prefill / decode_step,
state_size). docs/adding_a_mixer.md walks a new mixer through this file.
"""

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from flax import nnx

from effarch.layers.attention import Attention, AttentionConfig
from effarch.layers.based import BasedConfig, BasedLinearAttention
from effarch.layers.conv import BaseConv, ConvConfig, ZoologyBaseConv
from effarch.layers.diffqkv import DiffQKVAttention, DiffQKVConfig
from effarch.layers.landmark import LandmarkAttention, LandmarkConfig
from effarch.layers.lightning import LightningAttention, LightningConfig
from effarch.layers.moh import MoHAttention, MoHConfig
from effarch.layers.sliding_window import SlidingWindowAttention, SlidingWindowConfig
from effarch.layers.sparse_attention import SparseAttention, SparseAttentionConfig
from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig
from effarch.layers.titans_attention import TitansAttentionConfig
from effarch.layers.titans_mac import MemoryAsContext
from effarch.layers.titans_mag import MemoryAsGate
from effarch.layers.titans_mal import MemoryAsLayer

if TYPE_CHECKING:
    from effarch.arches.lm import ModelConfig

MixerFactory = Callable[["ModelConfig", int, nnx.Rngs], nnx.Module]

# The checks of tests/conformance/ a registration may opt out of, each with a reason (`skip=`).
CHECKS = ("causal", "decode", "state_size", "grad", "bf16", "mesh", "config")


@dataclasses.dataclass(frozen=True)
class ConfigEntry:
    cls: type  # a frozen dataclass whose __post_init__ raises a one-line ValueError naming the bad key
    small: Any  # an instance that builds at d_model 24 (the conformance suite's)


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    build: MixerFactory
    configs: tuple[str, ...]  # the CONFIGS keys (ModelConfig fields) it reads
    # How state_size(seq_len) grows: "linear" (a KV cache) or "bounded" (a recurrent state, a window, a buffer), or
    # a function of the built layer where its config decides (sparse_attention: bounded only for sink_window).
    state: Literal["linear", "bounded"] | Callable[[nnx.Module], Literal["linear", "bounded"]]
    skip: Mapping[str, str]  # conformance check -> why this mixer cannot pass it
    slow: Mapping[str, str]  # conformance check -> why it runs only with the slow tests (`-m slow`) for this mixer


CONFIGS: dict[str, ConfigEntry] = {}
MIXERS: dict[str, MixerEntry] = {}


def register_config(key: str, cls: type, *, small: Any) -> None:
    """Adds `cls` as the field `ModelConfig.<key>` (YAML `model.<key>.*`), defaulting to `cls()`."""
    if key in CONFIGS:
        raise ValueError(f"config key {key!r} is already registered")
    if not (dataclasses.is_dataclass(cls) and isinstance(small, cls)):
        raise TypeError(f"register_config({key!r}): expected a dataclass and an instance of it as small=")
    CONFIGS[key] = ConfigEntry(cls, small)


def register(name: str, cls: type | None = None, *, configs: tuple[str, ...],
             state: Literal["linear", "bounded"] | Callable[[nnx.Module], Literal["linear", "bounded"]],
             build: MixerFactory | None = None, skip: Mapping[str, str] | None = None,
             slow: Mapping[str, str] | None = None) -> None:
    """Adds the mixer `name`: by default built as `cls(cfg.d_model, *(cfg.<key> for key in configs), rngs=rngs)`;
    `build(cfg, layer_idx, rngs)` replaces that when the constructor needs more (e.g. the layer's depth)."""
    if name in MIXERS:
        raise ValueError(f"mixer {name!r} is already registered")
    missing = [k for k in configs if k not in CONFIGS]
    if missing:
        raise ValueError(f"mixer {name!r} reads unregistered config key(s) {missing}; call register_config first")
    unknown = sorted((set(skip or {}) | set(slow or {})) - set(CHECKS))
    if unknown:
        raise ValueError(f"mixer {name!r}: unknown conformance check(s) {unknown}; known: {list(CHECKS)}")
    if (build is None) == (cls is None):
        raise TypeError(f"register({name!r}): pass exactly one of cls and build=")
    if build is None:
        def build(cfg, layer_idx, rngs):
            return cls(cfg.d_model, *(getattr(cfg, k) for k in configs), rngs=rngs)
    MIXERS[name] = MixerEntry(build, tuple(configs), state, MappingProxyType(dict(skip or {})),
                              MappingProxyType(dict(slow or {})))


def state_growth(name: str, layer: nnx.Module) -> Literal["linear", "bounded"]:
    """How the built mixer `layer` (registered as `name`)'s decode state grows with the context."""
    state = MIXERS[name].state
    return state(layer) if callable(state) else state


def with_mixer_configs(cls: type) -> type:
    """Class decorator (under @dataclass) for ModelConfig: one field per registered config, defaulting to `cls()`."""
    for key, entry in CONFIGS.items():
        cls.__annotations__[key] = entry.cls
        setattr(cls, key, entry.cls())
    return cls


def build_mixer(name: str, cfg: "ModelConfig", layer_idx: int, rngs: nnx.Rngs) -> nnx.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}")
    return MIXERS[name].build(cfg, layer_idx, rngs)


# --- configs (the order of ModelConfig's fields and of a dumped config) ---------------------------------------------
register_config("attention", AttentionConfig, small=AttentionConfig(n_heads=3, n_kv_heads=1))
register_config("conv", ConvConfig, small=ConvConfig())
register_config("based", BasedConfig, small=BasedConfig(feature_dim=5, n_heads=2, chunk_size=8))
register_config("sliding_window", SlidingWindowConfig, small=SlidingWindowConfig(n_heads=2, window=6))
register_config("lightning", LightningConfig, small=LightningConfig(n_heads=3, block_size=8))
# Chunks of 4 and refreshes every 8 tokens: the suite's prompts and pieces end inside both; the clamped update
# (max_grad_norm) in the layer's prefill and decode paths alike.
register_config("titans", NeuralMemoryConfig,
                small=NeuralMemoryConfig(n_heads=2, chunk_size=4, batch_size=8, n_persistent=2, max_grad_norm=0.05))
register_config("diffqkv", DiffQKVConfig,
                small=DiffQKVConfig(n_q_heads=6, n_k_heads=1, n_v_heads=3, k_cache_dim=2, aug_q_hidden=10))
# Two of four routed heads per token: with top_k = 1 the routed gate is p / p = 1 and W_r gets no gradient.
register_config("moh", MoHConfig, small=MoHConfig(n_heads=6, n_shared=2, top_k=2))
register_config("landmark", LandmarkConfig, small=LandmarkConfig(n_heads=2, block_len=4, tile=8))
# MAC / MAG / MAL's attention (their memory is `titans`): MAC segments of 8, MAG / MAL windows of 6.
register_config("titans_attention", TitansAttentionConfig,
                small=TitansAttentionConfig(n_heads=2, window=6, segment_len=8))
# sink + window in blocks of 4: 3 sinks (a partial block), a window of 6 keys; the suite's 20 tokens wrap the ring
# buffer, and its prompt pieces end inside blocks. tests/layers/test_sparse_attention.py decodes the other patterns.
register_config("sparse_attention", SparseAttentionConfig,
                small=SparseAttentionConfig(pattern="sink_window", block_size=4, n_sink=3, window=6, n_heads=3,
                                            n_kv_heads=1))

# --- mixers ---------------------------------------------------------------------------------------------------------
register("attention", Attention, configs=("attention",), state="linear")
register("base_conv", BaseConv, configs=("conv",), state="bounded")
register("zoology_base_conv", ZoologyBaseConv, configs=("conv",), state="bounded")
register("based", BasedLinearAttention, configs=("based",), state="bounded")
register("sliding_window", SlidingWindowAttention, configs=("sliding_window",), state="bounded")
# The memory's inner gradient step makes the outer gradient a second-order program. The LMM's gradients run in the
# default suite (in the mixer's one compile: ~10 s more on 2 CPU cores), the hybrids' (the same memory, checked
# there) with the slow tests; the bfloat16 program (a second compile, ~7 s) and the 8-device step with the slow tests.
TITANS_SLOW = {"bf16": "a second compile of the memory's second-order program",
               "mesh": "two second-order compiles of the train step"}
TITANS_HYBRID_SLOW = {**TITANS_SLOW, "grad": "the memory's second-order gradients, checked on titans_lmm by default"}
register("titans_lmm", NeuralMemory, configs=("titans",), state="bounded", slow=TITANS_SLOW)
# The decay rate depends on the layer's depth (TNL's schedule), hence layer_idx / n_layers.
register("lightning", configs=("lightning",), state="bounded",
         build=lambda cfg, layer_idx, rngs: LightningAttention(cfg.d_model, cfg.lightning, layer_idx=layer_idx,
                                                               n_layers=cfg.n_layers, rngs=rngs))
register("diffqkv", DiffQKVAttention, configs=("diffqkv",), state="linear")
register("moh", MoHAttention, configs=("moh",), state="linear")
register("landmark", LandmarkAttention, configs=("landmark",), state="linear")
# Titans' hybrids: the memory from cfg.titans, the attention from cfg.titans_attention.
register("titans_mac", MemoryAsContext, configs=("titans", "titans_attention"), state="bounded",
         slow=TITANS_HYBRID_SLOW)
register("titans_mag", MemoryAsGate, configs=("titans", "titans_attention"), state="bounded",
         slow=TITANS_HYBRID_SLOW)
register("titans_mal", MemoryAsLayer, configs=("titans", "titans_attention"), state="bounded",
         slow=TITANS_HYBRID_SLOW)
# Bounded for sink_window (sinks + a ring buffer, its small config); with pattern s2, longlora or moa, or infer_dense,
# the decode state is Attention's KV cache, which grows linearly.
# A moa plan has one entry per layer: the layer's index picks its (alpha, beta), and the plan's length is checked.
register("sparse_attention", configs=("sparse_attention",),
         state=lambda layer: "bounded" if layer.bounded_state else "linear",
         build=lambda cfg, layer_idx, rngs: SparseAttention(cfg.d_model, cfg.sparse_attention, layer_idx=layer_idx,
                                                            n_layers=cfg.n_layers, rngs=rngs))

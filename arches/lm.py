"""Decoder-only language model whose token mixer is chosen per layer by name.

Block (Llama-style pre-norm): h = x + mixer(norm(x)); out = h + mlp(norm(h)) (the MLP is optional: Zoology's MQAR
models are mixer-only). Embedding, a final norm (`model.norm`, like the blocks' pre-norms) and an LM head (tied to
the embedding by default, as in Zoology). No absolute position embeddings: position comes from RoPE inside
attention or from the mixers themselves.

`mixers` is a list of registry names. With fewer names than layers it repeats (Zoology's `Hybrid`: layer i uses
mixers[i % len(mixers)]); BASED's layouts are written out in full in their configs.

Decoding: `init_state` / `prefill` / `decode_step` thread one state per layer; prefill then decode steps equal
the parallel forward pass (tests/conformance/, for every registered mixer).
"""

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.arches.registry import MIXERS, build_mixer, with_mixer_configs
from effarch.layers.lightning import SGLU
from effarch.layers.mlp import MLPConfig, SwiGLU
from effarch.layers.norms import SRMSNorm, rms_norm


@dataclasses.dataclass(frozen=True, slots=True)
@with_mixer_configs
class ModelConfig:
    """The model: sizes, the mixer layout, the MLP and norms; then one field per mixer config registered in
    arches/registry.py (`register_config`: e.g. `attention`, `based`, `titans`; YAML `model.<key>.*`), each
    defaulting to its dataclass's defaults."""

    vocab_size: int = 8192  # tokens; MQAR's default vocabulary
    d_model: int = 64  # D
    n_layers: int = 2
    mixers: tuple[str, ...] = ("attention",)  # registry names, repeated over the layers
    mlp: MLPConfig = MLPConfig()
    norm: Literal["rms", "srms"] = "rms"  # block pre-norms: RMSNorm with a scale, or TNL's weightless SRMSNorm
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # LM head = embedding^T (Zoology's default)
    remat: bool = False  # recompute each block in the backward pass (nnx.remat)

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if not self.mixers:
            raise ValueError("mixers must name at least one mixer")
        unknown = [m for m in self.mixers if m not in MIXERS]
        if unknown:
            raise ValueError(f"mixers: unknown mixer(s) {unknown}; registered: {sorted(MIXERS)}")
        if len(self.mixers) > self.n_layers:
            raise ValueError(f"mixers lists {len(self.mixers)} layers but n_layers is {self.n_layers}")

    def layer_mixers(self) -> tuple[str, ...]:
        return tuple(self.mixers[i % len(self.mixers)] for i in range(self.n_layers))


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return rms_norm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs) if cfg.norm == "rms" else SRMSNorm(cfg.norm_eps)


class Block(nnx.Module):
    """Pre-norm decoder block: h = x + mixer(norm1(x)); out = h + mlp(norm2(h)) (no MLP when mlp.kind is "none").

    `Block(cfg, layer_idx, *, rngs)` builds layer `layer_idx` of the model `cfg`: its mixer is
    `cfg.layer_mixers()[layer_idx]` from the registry, configured by the matching sub-config of `cfg` (e.g.
    `cfg.attention`); the norms follow `cfg.norm` / `cfg.norm_eps` and the MLP `cfg.mlp`. Calls: `block(x)` with
    x [B, T, D] -> [B, T, D]; `block.prefill(state, x)` and `block.decode_step(state, x_t)` with the state of
    `block.mixer.init_state(batch_size, max_len)`.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.mixer_name = cfg.layer_mixers()[layer_idx]
        self.norm1 = _norm(cfg, rngs)
        self.mixer = build_mixer(self.mixer_name, cfg, layer_idx, rngs)
        mlp = {"swiglu": SwiGLU, "sglu": SGLU}.get(cfg.mlp.kind)
        if mlp is not None:
            self.norm2 = _norm(cfg, rngs)
            self.mlp = mlp(cfg.d_model, cfg.mlp.hidden_size(cfg.d_model), rngs=rngs)
        else:
            self.norm2 = self.mlp = None

    def _channel_mix(self, h):
        return h if self.mlp is None else h + self.mlp(self.norm2(h))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._channel_mix(x + self.mixer(self.norm1(x)))

    def prefill(self, state, x: Float[Array, "B T D"]):
        state, y = self.mixer.prefill(state, self.norm1(x))
        return state, self._channel_mix(x + y)

    def decode_step(self, state, x_t: Float[Array, "B D"]):
        state, y = self.mixer.decode_step(state, self.norm1(x_t))
        return state, self._channel_mix(x_t + y)


def _policy_shares(state) -> bool:
    """Whether a layer's decode state holds a KV policy state with a "shared" entry."""
    return isinstance(state, dict) and isinstance(state.get("policy"), dict) and "shared" in state["policy"]


class DecoderLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.with_metadata(nnx.initializers.normal(0.02), logical_axes=("vocab", "embed")),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm = _norm(cfg, rngs)
        if cfg.tie_embeddings:
            self.head = None
        else:
            init = nnx.with_metadata(nnx.initializers.lecun_normal(), logical_axes=("embed", "vocab"))
            self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=init, rngs=rngs)

    def logits(self, h: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
        """Final norm and LM head on hidden states (any leading shape), in float32."""
        h = self.norm(h)
        if self.head is None:
            return self.embed.attend(h).astype(jnp.float32)
        return self.head(h).astype(jnp.float32)

    def hidden(self, tokens: Int[Array, "B T"], *, constrain: Callable[[Array], Array] | None = None
               ) -> Float[Array, "B T D"]:
        """The last block's output. `constrain` (a trainer's: a sharding constraint on the batch axes) is applied to
        the embeddings and to every block's output. Without one, nothing tells the compiler how activations are laid
        out, and under FSDP (weights split over the same mesh axis as the batch) it may keep them whole on every
        device: the global batch's activations on each chip."""
        constrain = constrain or (lambda x: x)
        h = constrain(self.embed(tokens))
        for block in self.blocks:
            if self.cfg.remat:
                # nnx.remat, not jax.checkpoint: it carries the blocks' AuxLoss writes (layers/aux_loss.py) out.
                h = nnx.remat(lambda blk, x: blk(x))(block, h)
            else:
                h = block(h)
            h = constrain(h)
        return h

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        """Logits in float32 for every position."""
        return self.logits(self.hidden(tokens))

    # --- decoding -------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, max_len: int) -> tuple:
        return tuple(block.mixer.init_state(batch_size, max_len) for block in self.blocks)

    def prefill(self, state: tuple, tokens: Int[Array, "B T"]) -> tuple[tuple, Float[Array, "B T V"]]:
        h = self.embed(tokens)
        new_state = []
        for block, s in zip(self.blocks, state, strict=True):
            s, h = block.prefill(s, h)
            new_state.append(s)
        return tuple(new_state), self.logits(h)

    def decode_step(self, state: tuple, token_t: Int[Array, " B"]) -> tuple[tuple, Float[Array, "B V"]]:
        h = self.embed(token_t)
        new_state, shared = [], None
        for block, s in zip(self.blocks, state, strict=True):
            # A KV policy's "shared" entry goes from each layer to the next (layers/kv_policies/base.py: tidal).
            if shared is not None and _policy_shares(s):
                s = {**s, "policy": {**s["policy"], "shared": shared}}
            s, h = block.decode_step(s, h)
            if _policy_shares(s):
                shared = s["policy"]["shared"]
            new_state.append(s)
        return tuple(new_state), self.logits(h)

    def set_kv_policy(self, policy) -> list[int]:
        """Every attention layer's decode step reads its KV cache through `policy` (a layers.kv_policies.KVPolicy;
        None: the full cache again), except the first `policy.dense_layers` layers. Layers whose mixer keeps no KV
        cache a policy can read (convolutions, recurrent states; `set_kv_policy` absent) decode as before, so hybrids
        work. Prefill stays dense. Set it before init_state. Returns the layers that read through the policy. A policy
        that depends on the model's parameters (duo's gates) is resolved from them here (`KVPolicy.for_mixers`).

        ValueError (one line naming the policy and the mixer) when an attention layer cannot take the policy (e.g.
        sparse_attention's bounded sink_window cache) or when no layer can; no layer is changed then."""
        takers = [i for i, block in enumerate(self.blocks) if hasattr(block.mixer, "set_kv_policy")]
        if policy is not None and takers:
            policy = policy.for_mixers([block.mixer for block in self.blocks])  # duo: the gates choose its heads
        if policy is not None:
            if not takers:
                names = sorted({block.mixer_name for block in self.blocks})
                raise ValueError(f"kv policy {policy.NAME}: no layer of this model keeps a KV cache a policy can read "
                                 f"(mixers {', '.join(names)}); policies apply to attention, GQA, MoH, DiffQKV (one K "
                                 "and V head count, uncompressed keys) and sparse_attention with a KV cache")
            policy.check_model(len(self.blocks))
            for i in takers:
                self.blocks[i].mixer.check_kv_policy(policy.for_layer(i))
        for i in takers:
            self.blocks[i].mixer.set_kv_policy(None if policy is None or i < policy.dense_layers
                                               else policy.for_layer(i))
        return [i for i in takers if policy is not None and i >= policy.dense_layers]

    @property
    def kv_policy(self):
        """The KV policy the decode steps use (layers past dense_layers), or None."""
        policies = [getattr(block.mixer, "kv_policy", None) for block in self.blocks]
        return next((p for p in policies if p is not None), None)

    def state_size(self, seq_len: int) -> int:
        """Bytes of decode state (KV caches, recurrent states, conv buffers) per sequence after seq_len tokens."""
        return sum(block.mixer.state_size(seq_len) for block in self.blocks)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

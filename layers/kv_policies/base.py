"""The KV-policy contract: how an attention layer's decode step reads its KV cache through a policy.

A policy is configuration, not parameters: a frozen (hashable) dataclass that a model carries as a static attribute of
its attention layers (`DecoderLM.set_kv_policy`), given at generate / eval time. Prefill stays dense (every policy
here is a decode-time method); at each decode step the layer writes the new token's k, v into its cache as usual, then
asks the policy which entries the new query reads:

    policy = policy.for_mixers(mixers).for_layer(i)                       # what layer i holds (duo: its gates)
    state = policy.init_state(batch, max_len, n_kv_heads, head_dim, n_heads=Hq)  # the decode state's "policy"
    state = policy.observe(state, q_new, k_new [B, T, Hkv, K], v_new, pos)  # after every cache write (prefill,
                                                                           # step); default: update(state, k_new, pos)
    parts, state = policy.select(state, q [B, Hq, K], k_cache, length)    # the new query's selection
    o [B, Hq, V], state, reads = policy.attend(state, q, k_cache, v_cache, length)   # parts merged by LSE

`length` is the number of valid cache entries including the current token (an int32 scalar shared by the batch). A
policy state's "shared" entry is handed from each layer to the next at decode (`DecoderLM.decode_step`), so that a
selection made in one layer can be read by the following ones (tidal). A layer hands the policy its RoPE frequencies
with `bind_rope` (at `set_kv_policy`) for policies that re-position the keys they read (longheads); the cache holds
keys rotated at their true positions, and queries arrive rotated at theirs. Before it changes any layer,
`DecoderLM.set_kv_policy` asks `policy.check_model(n_layers)` and, through each attention mixer's `check_kv_policy`,
`policy.for_layer(i).check_heads(...)`: a policy configured for one model (razor's heads file) refuses another.
Each part is a `Selection` (idx, cnt, granularity, block) for `sparse_decode_attention`; the parts of one step must be
disjoint, and their attentions are joined by `merge_attention` (exact for disjoint sets). `budget` is the number of
KV tokens a step reads per list (sinks and recent window included); `Selection.tokens` counts what a part reads. A
policy whose steps differ in kind (recycled's periodic full steps) overrides `attend`.
"""

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.block_sparse import merge_attention, sparse_decode_attention

PolicyState = Any  # a pytree of arrays (quest's page bounds), or {} for a stateless policy


class Selection(NamedTuple):
    """One part of a step's selection: the arguments of `sparse_decode_attention` besides q and the caches."""

    idx: Int[Array, "B Hs K"]
    cnt: Int[Array, "B Hs"]
    granularity: str = "token"
    block: int | None = None

    def tokens(self, length) -> Int[Array, "B Hs"]:
        """Tokens this part reads per list (a partial last block counts what it holds below `length`)."""
        if self.granularity == "token":
            return self.cnt
        unit = self.block
        used = jnp.arange(self.idx.shape[-1])[None, None, :] < self.cnt[..., None]
        held = jnp.clip(length - self.idx * unit, 0, unit)
        return jnp.sum(jnp.where(used, held, 0), axis=-1)


class PolicyError(ValueError):
    """A policy cannot be built or applied as asked; the message names the policy and what was wrong."""


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    """Base of every decode-time KV policy.

    Attributes:
      budget: KV tokens read per step and list (sinks and recent window included).
      dense_layers: the first this many layers read their full cache (Quest and TidalDecode keep layers 0-1 dense).
      implementation: `sparse_decode_attention`'s implementation (None = the platform default).
    """

    NAME: ClassVar[str] = ""
    budget: int = 256
    dense_layers: int = 0
    implementation: str | None = None

    def __post_init__(self):
        if self.budget < 1:
            raise PolicyError(f"kv policy {self.NAME}: budget must be >= 1, got {self.budget}")
        if self.dense_layers < 0:
            raise PolicyError(f"kv policy {self.NAME}: dense_layers must be >= 0, got {self.dense_layers}")

    def describe(self) -> str:
        """'quest budget=64 page=16 ...': the name and every option, as given on the command line."""
        opts = " ".join(f"{f.name}={getattr(self, f.name)}" for f in options(self))
        return f"{self.NAME} {opts}"

    def for_mixers(self, mixers) -> "KVPolicy":
        """The policy as a model with these layers' mixers (in order) uses it: where a policy depends on the model's
        parameters (duo reads its gates), resolved once when the model takes it (`DecoderLM.set_kv_policy`)."""
        return self

    def for_layer(self, layer: int) -> "KVPolicy":
        """The policy as layer `layer` uses it (the same for every layer, except where a policy's layers differ)."""
        return self

    def check_model(self, n_layers: int) -> None:
        """PolicyError when the policy cannot serve a model of n_layers layers (razor's heads file: another model).
        `DecoderLM.set_kv_policy` asks before it changes any layer."""

    def check_heads(self, n_heads: int, n_kv_heads: int, head_dim: int, v_head_dim: int) -> None:
        """PolicyError when the policy (as `for_layer` gave it) cannot read this layer's cache; each attention
        mixer's `check_kv_policy` asks with its query and KV head counts and its key and value head dims."""

    def init_state(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, n_heads: int | None = None
                   ) -> PolicyState:
        """The policy's own decode state (n_heads: the query heads; None = n_kv_heads)."""
        return {}

    def update(self, state: PolicyState, k_new: Float[Array, "B T Hkv K"], pos) -> PolicyState:
        return state

    def observe(self, state: PolicyState, q_new: Float[Array, "B T Hq K"], k_new: Float[Array, "B T Hkv K"],
                v_new: Float[Array, "B T Hkv V"], pos) -> PolicyState:
        """After a cache write of T tokens at positions pos..pos+T-1 (q, k rotated there): what the layer calls.
        Policies that need only the keys override `update`."""
        return self.update(state, k_new, pos)

    def bind_rope(self, freqs: tuple[float, ...]) -> "KVPolicy":
        """The policy as a layer with these RoPE inverse frequencies uses it (() = no RoPE); most ignore them."""
        return self

    def select(self, state: PolicyState, q: Float[Array, "B Hq K"], k_cache: Float[Array, "B S Hkv K"],
               length) -> tuple[list[Selection], PolicyState]:
        raise NotImplementedError

    def attend(self, state: PolicyState, q: Float[Array, "B Hq K"], k_cache: Float[Array, "B S Hkv K"],
               v_cache: Float[Array, "B S Hkv V"], length
               ) -> tuple[Float[Array, "B Hq V"], PolicyState, Float[Array, ""]]:
        """The new query's attention over its selection: each part through `sparse_decode_attention`, then merged.

        Returns (o, state, reads): reads = the KV tokens one query head attended to in this step (float32, the mean
        over lists and batch rows), what the eval reports per policy."""
        parts, state = self.select(state, q, k_cache, length)
        o, _ = attend_parts(parts, q, k_cache, v_cache, length, self.implementation)
        return o, state, reads_of(parts, length)


def attend_parts(parts: list[Selection], q, k_cache, v_cache, length, implementation=None):
    """(o [B, Hq, V], lse [B, Hq]) of q over the union of disjoint selections, merged by LSE."""
    lengths = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (q.shape[0],))
    o = lse = None
    for part in parts:
        o_p, lse_p = sparse_decode_attention(q, k_cache, v_cache, part.idx, part.cnt, granularity=part.granularity,
                                             block=part.block, lengths=lengths, implementation=implementation)
        o, lse = (o_p, lse_p) if o is None else merge_attention(o, lse, o_p, lse_p)
    return o, lse


def full_cache(q, k_cache, v_cache, length, implementation=None) -> Float[Array, "B Hq V"]:
    """q over every valid entry of the cache (one list of every slot, cut at `length`): a policy's full step."""
    B, S = q.shape[0], k_cache.shape[1]
    everything = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, 1, S))
    o, _ = sparse_decode_attention(q, k_cache, v_cache, everything, jnp.full((B, 1), S, jnp.int32),
                                   lengths=jnp.broadcast_to(jnp.asarray(length, jnp.int32), (B,)),
                                   implementation=implementation)
    return o


def head_scores(q: Float[Array, "B Hq K"], k_cache: Float[Array, "B S Hkv K"]) -> Float[Array, "B Hq S"]:
    """q·k of every query head against every cache slot (unscaled, float32; a GQA group reads its KV head). Slots at
    or past the length are not masked: the caller does."""
    B, Hq, K = q.shape
    S, Hkv = k_cache.shape[1:3]
    return jnp.einsum("BHGK,BSHK->BHGS", q.reshape(B, Hkv, Hq // Hkv, K), k_cache.astype(q.dtype),
                      preferred_element_type=jnp.float32).reshape(B, Hq, S)


def reads_of(parts: list[Selection], length) -> Float[Array, ""]:
    """KV tokens one query head attends to through `parts` (mean over lists and rows), float32."""
    return sum(jnp.mean(part.tokens(jnp.asarray(length, jnp.int32)).astype(jnp.float32)) for part in parts)


def options(policy) -> list[dataclasses.Field]:
    """The policy's command-line options: its dataclass fields, except private ones (a layer index)."""
    return [f for f in dataclasses.fields(policy) if not f.name.startswith("_")]


def sink_recent(batch: int, n_sink: int, n_recent: int, length) -> Selection:
    """Tokens [0, n_sink) ∪ [length − n_recent, length) of every row, disjoint, one list for all heads (Hs = 1):
    while length <= n_sink + n_recent it is every token. K = n_sink + n_recent slots."""
    length = jnp.asarray(length, jnp.int32)
    s = jnp.minimum(n_sink, length)
    r = jnp.minimum(n_recent, length - s)
    j = jnp.arange(n_sink + n_recent, dtype=jnp.int32)
    idx = jnp.where(j < s, j, length - r + (j - s))
    idx = jnp.broadcast_to(idx[None, None], (batch, 1, n_sink + n_recent))
    return Selection(idx, jnp.broadcast_to(s + r, (batch, 1)).astype(jnp.int32))

"""`razor`: retrieval heads read the whole cache, the other heads sinks + a recent window + one compensation token
(RazorAttention, Tang et al., arXiv 2407.15891, §3; training-free).

Which heads keep the full cache comes from a heads file written by `effarch heads` (train/heads.py: each (layer,
query head)'s retrieval score, the Retrieval Head paper's, arXiv 2404.15574 §2): the `top` best-scoring query heads of
the model (a fraction of all heads when top < 1, RazorAttention §3 keeps about 15%; a count when top >= 1). The cache
is shared per KV head, so a KV head reads its full cache when ANY of its GQA group's query heads is a retrieval head.
(RazorAttention finds its heads data-free by echo and induction scores on repeated random tokens; here the retrieval
score measured on the run's own needle task chooses them.)

Every other KV head reads the first `n_sink` tokens, the last `budget − n_sink − 1` (the current one included), and
the compensation token of the tokens between them that it no longer reads, the evicted set D (§3.3): the mean key
k̂ = mean_{j∈D} k_j and mean value v̂ = mean_{j∈D} v_j, read as one more key whose logit is weighted by |D|:

    o = (Σ_{j kept} e^{s_j} v_j + |D| e^{s(k̂)} v̂) / (Σ_{j kept} e^{s_j} + |D| e^{s(k̂)}),

i.e. the kept part and (v̂, s(k̂) + log|D|) merged by `merge_attention`. So a window head reads `budget` KV rows per
step (sinks, window, compensation), what `budget` counts. The means are kept as running sums in the policy state
over the post-RoPE cache: the first decode step folds in everything the prefill left outside the window, each later
step the one token that leaves it. With |D| <= 1 the compensation token is the evicted token itself, so a budget that
covers the context reproduces full-cache decoding.
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection, attend_parts, sink_recent
from effarch.pallas_kernels.block_sparse import merge_attention


def retrieval_heads(scores: list, top: float | int) -> set[tuple[int, int]]:
    """The (layer, query head) pairs of the `top` highest scores (a fraction of all scored heads when top < 1,
    rounded, else a count); ties go to the lower layer, then head. `scores[l]` is layer l's list or None."""
    ranked = sorted(((-s, layer, h) for layer, row in enumerate(scores) if row is not None
                     for h, s in enumerate(row)))
    n = int(round(top * len(ranked))) if top < 1 else int(top)
    return {(layer, h) for _, layer, h in ranked[:n]}


def read_heads_file(path: str) -> list:
    """The per-layer score lists of an `effarch heads` JSON; PolicyError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise PolicyError(f"kv policy razor: heads file {path!r} does not exist (write one with effarch heads RUN_DIR)")
    try:
        scores = json.loads(p.read_text())["scores"]
    except (ValueError, KeyError, TypeError):
        raise PolicyError(f"kv policy razor: {path!r} is not a heads file of effarch heads (no \"scores\")") from None
    ok = isinstance(scores, list) and all(
        row is None or (isinstance(row, list) and all(isinstance(s, (int, float)) for s in row)) for row in scores)
    if not ok:
        raise PolicyError(f"kv policy razor: {path!r}: \"scores\" must be one list of numbers (or null) per layer")
    return scores


@dataclasses.dataclass(frozen=True)
class RazorPolicy(KVPolicy):
    NAME = "razor"
    heads: str = ""  # an `effarch heads` JSON (required)
    top: float = 0.15  # retrieval heads kept full: a fraction of all query heads (< 1) or a count (>= 1)
    n_sink: int = 4
    _scores: tuple | None = None  # per layer: the heads file's scores (a tuple, or None), read once
    _full: tuple = ()  # (layer, query head) retrieval heads
    _layer: int = -1  # set per layer by for_layer

    def __post_init__(self):
        super().__post_init__()
        if not self.heads:
            raise PolicyError("kv policy razor: give heads=PATH, a heads file written by effarch heads RUN_DIR")
        if not (self.top >= 0 and math.isfinite(self.top)) or (self.top >= 1 and self.top != int(self.top)):
            raise PolicyError(f"kv policy razor: top must be a fraction in [0, 1) or a whole count of heads, got "
                              f"{self.top}")
        if not 0 <= self.n_sink <= self.budget - 2:
            raise PolicyError(f"kv policy razor: n_sink must be in [0, budget - 2 = {self.budget - 2}] (the window "
                              f"holds the current token, the compensation token takes one more), got {self.n_sink}")
        if self._scores is None:
            scores = read_heads_file(self.heads)
            object.__setattr__(self, "_scores", tuple(None if r is None else tuple(r) for r in scores))
            object.__setattr__(self, "_full", tuple(sorted(retrieval_heads(scores, self.top))))

    @property
    def n_recent(self) -> int:
        return self.budget - self.n_sink - 1

    def for_layer(self, layer: int) -> "RazorPolicy":
        return dataclasses.replace(self, _layer=layer)

    def check_model(self, n_layers):
        if len(self._scores) != n_layers:
            raise PolicyError(f"kv policy razor: heads file {self.heads!r} scores {len(self._scores)} layers, the "
                              f"model has {n_layers}")

    def check_heads(self, n_heads, n_kv_heads, head_dim, v_head_dim):
        row = self._scores[self._layer] if 0 <= self._layer < len(self._scores) else None
        if row is None or len(row) != n_heads:
            have = "no scores" if row is None else f"{len(row)} heads"
            raise PolicyError(f"kv policy razor: heads file {self.heads!r} has {have} for layer {self._layer}, whose "
                              f"attention has {n_heads} query heads")
        if v_head_dim != head_dim:
            raise PolicyError(f"kv policy razor: needs equal key and value head dims (the compensation state), this "
                              f"layer has {head_dim} and {v_head_dim}")

    def full_kv_heads(self, n_heads: int, n_kv_heads: int) -> np.ndarray:
        """bool [Hkv]: the KV heads of this layer that read their full cache (any query head of the group a
        retrieval head)."""
        full = np.zeros(n_kv_heads, bool)
        for layer, h in self._full:
            if layer == self._layer:
                full[h // (n_heads // n_kv_heads)] = True
        return full

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        # sum_k, sum_v: sums of the evicted keys and values [n_sink, done); done: the window's current start.
        z = jnp.zeros((batch, n_kv_heads, head_dim), jnp.float32)
        return {"sum_k": z, "sum_v": z, "done": jnp.full((), self.n_sink, jnp.int32)}

    def absorb(self, state, k_cache, v_cache, length):
        """Folds the tokens [done, hi) that left the window into the running sums, hi = max(length − n_recent,
        n_sink): all of them at the first decode step (a masked sum over the cache), one per later step."""
        hi = jnp.maximum(jnp.asarray(length, jnp.int32) - self.n_recent, self.n_sink)
        done = state["done"]

        def many(sums):
            pos = jnp.arange(k_cache.shape[1])
            take = ((pos >= done) & (pos < hi))[None, :, None, None]
            return tuple(s + jnp.sum(jnp.where(take, c.astype(jnp.float32), 0.0), axis=1)
                         for s, c in ((sums[0], k_cache), (sums[1], v_cache)))

        def one(sums):
            return tuple(s + jax.lax.dynamic_index_in_dim(c, done, axis=1, keepdims=False).astype(jnp.float32)
                         for s, c in ((sums[0], k_cache), (sums[1], v_cache)))

        branch = jnp.clip(hi - done, 0, 2)
        sum_k, sum_v = jax.lax.switch(branch, [lambda s: s, one, many], (state["sum_k"], state["sum_v"]))
        return {"sum_k": sum_k, "sum_v": sum_v, "done": jnp.maximum(hi, done)}

    def attend(self, state, q, k_cache, v_cache, length):
        B, Hq, K = q.shape
        S, Hkv = k_cache.shape[1:3]
        G = Hq // Hkv
        length = jnp.asarray(length, jnp.int32)
        full = self.full_kv_heads(Hq, Hkv)
        if not full.all():  # a layer of retrieval heads only keeps no compensation state
            state = self.absorb(state, k_cache, v_cache, length)
        # Window part (every head): sinks + recent. Full heads also read the middle [lo, hi) (a disjoint part).
        window = sink_recent(B, self.n_sink, self.n_recent, length)
        lo = jnp.minimum(self.n_sink, length)
        hi = jnp.maximum(length - self.n_recent, lo)
        n_mid = max(S - self.n_sink - self.n_recent, 1)
        mid_idx = jnp.minimum(lo + jnp.arange(n_mid, dtype=jnp.int32), S - 1)
        mid_cnt = jnp.where(jnp.asarray(full)[None, :], hi - lo, 0).astype(jnp.int32)
        middle = Selection(jnp.broadcast_to(mid_idx, (B, Hkv, n_mid)), jnp.broadcast_to(mid_cnt, (B, Hkv)))
        parts = [window, middle] if full.any() else [window]
        o, lse = attend_parts(parts, q, k_cache, v_cache, length, self.implementation)
        # Compensation token of the window heads: (v̂, scale·q·k̂ + log|D|), |D| = done − n_sink evicted tokens.
        n_evicted = (state["done"] - self.n_sink).astype(jnp.float32)
        k_hat = state["sum_k"] / jnp.maximum(n_evicted, 1.0)
        v_hat = state["sum_v"] / jnp.maximum(n_evicted, 1.0)
        s = jnp.einsum("BHGK,BHK->BHG", q.reshape(B, Hkv, G, K).astype(jnp.float32), k_hat) * K**-0.5
        comp = jnp.logical_and(~jnp.asarray(full)[None, :, None], n_evicted > 0)
        s = jnp.where(comp, s + jnp.log(jnp.maximum(n_evicted, 1.0)), -jnp.inf).reshape(B, Hq)
        v_hat = jnp.repeat(v_hat, G, axis=1).astype(o.dtype)
        o, _ = merge_attention(o, lse, v_hat, s)
        # Reads per KV head (= per query head, groups being equal): the whole cache, or sinks + window + 1.
        window_reads = jnp.minimum(length, self.n_sink + self.n_recent) + (n_evicted > 0)
        reads = jnp.mean(jnp.where(jnp.asarray(full), length, window_reads).astype(jnp.float32))
        return o, state, reads

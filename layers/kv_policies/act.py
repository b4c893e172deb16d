"""`act`: attention calibration of hidden (non-initial) attention sinks at decode (ACT, Yu et al., "Unveiling and
Harnessing Hidden Attention Sinks", ICML 2024, arXiv 2406.15765, §4; GATECH-EIC/ACT `models/llama_modelling_aug.py`).

Not a selection: every step reads the full cache (the reads are the context length) and only re-weights the
attention of the chosen (layer, head) pairs. For such a head and decode row i, with P the row's softmax over the
cache:

    colmean_j = Σ_{i'=j..i} P_{i'j} / (i − j + 1)          (the column's mean over the rows seen so far: causal)
    S = {j : colmean_j > tau} minus its first element      (the initial sink is kept)
    m = Σ_{j∈S} P_ij;  P'_ij = beta·P_ij for j ∈ S,  P_ij·(1 − beta·m)/(1 − m) otherwise   (rows still sum to 1)

so o' = beta·m·o_S + (1 − beta·m)·o_N. The column sums come from the prefill's own (causal) attention and grow by
each decode row. S is the causal variant of the paper's prompt-level S (which averages over every prompt row, later
ones included): per position, and so usable while decoding and for per-token metrics. A row whose whole mass is in
S (m = 1) is left unchanged (the official code divides 0 by 0 there). A prefill that continues a cache (pos > 0)
adds its rows' sums over its own tokens only.

The heads come from `heads=L:H,L:H,...` or from `calibration=PATH`, the JSON `effarch act-search` writes (its heads,
beta and tau replace the options): ACT's head search on calibration data (train/act_search.py). `budget` is unused.
With no heads the policy is the full cache.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import KVPolicy, PolicyError


def parse_heads(text: str) -> tuple[tuple[int, int], ...]:
    """"0:1,2:3" -> ((0, 1), (2, 3)); PolicyError naming a bad entry."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        layer, sep, head = item.partition(":")
        try:
            out.append((int(layer), int(head)))
        except ValueError:
            raise PolicyError(f"kv policy act: heads must be LAYER:HEAD,... with integers, got {item!r}") from None
        if not sep or min(out[-1]) < 0:
            raise PolicyError(f"kv policy act: heads must be LAYER:HEAD,... with integers >= 0, got {item!r}")
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class ACTPolicy(KVPolicy):
    NAME = "act"
    heads: str = ""  # LAYER:HEAD,... (query heads) to calibrate
    calibration: str = ""  # a JSON from `effarch act-search`: its heads, beta and tau
    beta: float = 0.4  # the scale of the hidden sinks' attention (the value of the official ACT calibration script)
    tau: float = 0.1  # column-mean threshold of a sink
    _heads: tuple = ()  # parsed (layer, head) pairs, not an option
    _layer: int = -1  # set per layer by for_layer, not an option

    def __post_init__(self):
        super().__post_init__()
        heads, beta, tau = self.heads, self.beta, self.tau
        if self.calibration:
            try:
                with open(self.calibration) as f:
                    cal = json.load(f)
                heads = ",".join(f"{int(layer)}:{int(head)}" for layer, head in cal["heads"])
                beta, tau = float(cal["beta"]), float(cal["tau"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise PolicyError(f"kv policy act: calibration {self.calibration!r} is not an act-search JSON "
                                  f"({type(e).__name__}: {e})") from None
        if not 0 <= beta <= 1:
            raise PolicyError(f"kv policy act: beta must be in [0, 1], got {beta}")
        if not 0 <= tau < 1:
            raise PolicyError(f"kv policy act: tau must be in [0, 1), got {tau}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "_heads", parse_heads(heads))

    def for_layer(self, layer: int) -> "ACTPolicy":
        return dataclasses.replace(self, _layer=layer)

    def layer_heads(self) -> tuple[int, ...]:
        """The query heads this layer calibrates."""
        return tuple(h for layer, h in self._heads if layer == self._layer)

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        n_heads = n_kv_heads if n_heads is None else n_heads
        bad = [h for h in self.layer_heads() if h >= n_heads]
        if bad:
            raise PolicyError(f"kv policy act: layer {self._layer} has {n_heads} query heads, not head {bad[0]}")
        return {"colsum": jnp.zeros((batch, n_heads, max_len), jnp.float32)}

    def observe(self, state, q_new, k_new, v_new, pos):
        """A prefill (T > 1) adds its rows' causal attention to the column sums; a decode step's row is added by
        `attend`, which computes it anyway."""
        B, T, Hq, K = q_new.shape
        if T == 1 or not self.layer_heads():
            return state
        Hkv = k_new.shape[2]
        s = jnp.einsum("BTHGK,BSHK->BHGTS", q_new.reshape(B, T, Hkv, Hq // Hkv, K).astype(jnp.float32),
                       k_new.astype(jnp.float32)) * K**-0.5
        causal = jnp.tril(jnp.ones((T, T), bool))
        p = jax.nn.softmax(jnp.where(causal[None, None, None], s, -jnp.inf), axis=-1)
        sums = jnp.sum(p, axis=-2).reshape(B, Hq, T)
        pos = jnp.asarray(pos, jnp.int32)
        old = jax.lax.dynamic_slice_in_dim(state["colsum"], pos, T, axis=2)
        return {"colsum": jax.lax.dynamic_update_slice_in_dim(state["colsum"], old + sums, pos, axis=2)}

    def attend(self, state, q, k_cache, v_cache, length):
        if self._layer < 0:
            raise PolicyError("kv policy act: give it to a model (DecoderLM.set_kv_policy), which tells each layer "
                              "its index")
        B, Hq, K = q.shape
        S, Hkv = k_cache.shape[1:3]
        length = jnp.asarray(length, jnp.int32)
        j = jnp.arange(S, dtype=jnp.int32)
        valid = (j < length)[None, None, :]
        s = jnp.einsum("BHGK,BSHK->BHGS", q.reshape(B, Hkv, Hq // Hkv, K).astype(jnp.float32),
                       k_cache.astype(jnp.float32)).reshape(B, Hq, S) * K**-0.5
        p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
        chosen = self.layer_heads()
        if chosen:
            colsum = state["colsum"] + p
            state = {"colsum": colsum}
            colmean = colsum / jnp.maximum(length - j, 1).astype(jnp.float32)[None, None, :]  # rows j..i: i − j + 1
            in_s = valid & (colmean > self.tau)
            first = jnp.argmax(in_s, axis=-1)  # the smallest member (0 when S is empty: nothing to drop)
            in_s = in_s & (j[None, None, :] != first[..., None])
            m = jnp.sum(jnp.where(in_s, p, 0.0), axis=-1, keepdims=True)
            edit = m < 1 - 1e-6
            scale = jnp.where(in_s, self.beta, (1 - self.beta * m) / jnp.where(edit, 1 - m, 1.0))
            mask = jnp.zeros((Hq,), bool).at[jnp.asarray(chosen)].set(True)[None, :, None]
            p = jnp.where(mask & edit, p * scale, p)
        o = jnp.einsum("BHGS,BSHV->BHGV", p.reshape(B, Hkv, Hq // Hkv, S), v_cache.astype(jnp.float32))
        return o.reshape(B, Hq, -1).astype(q.dtype), state, length.astype(jnp.float32)

"""`probe`: full-cache decode that also reports where every query head looks, and can mask chosen heads (the hook of
`effarch heads`, train/heads.py; the Retrieval Head paper, Wu et al., arXiv 2404.15574, §2 and §4).

A diagnostic, not a serving policy: it is not in the `--kv-policy` registry. Given to a model like any KV policy
(`DecoderLM.set_kv_policy`), so the attention layers need no code of their own for it and their normal decode path
is untouched: every decode step reads the whole cache (the output equals full-cache decoding up to rounding), and
writes into its state "top" [B, Hq], the position each query head attends to most (the argmax of its logits over the
valid cache entries: the top-1 of its attention probabilities).

Masking (`masked`: (layer, query head) pairs; the paper's causal test): a masked head's output at decode is replaced
by `mask_mode`:
- "uniform": the mean of the values over the valid cache entries, i.e. uniform attention over the causally visible
  keys (the paper's masking sets the head's query to zero: Retrieval_Head `faiss_attn/source/modeling_llama.py`);
- "zero": zero, the head's contribution removed (the zero-output ablation).
Prefill is never masked (the paper masks the generation steps only).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, full_cache, head_scores

MASK_MODES = ("uniform", "zero")


@dataclasses.dataclass(frozen=True)
class ProbePolicy(KVPolicy):
    NAME = "probe"
    budget: int = 1  # unused: every step reads the whole cache
    masked: tuple[tuple[int, int], ...] = ()  # (layer, query head) pairs whose decode output is replaced
    mask_mode: str = "uniform"
    _layer: int = -1  # set per layer by for_layer

    def __post_init__(self):
        super().__post_init__()
        if self.mask_mode not in MASK_MODES:
            raise PolicyError(f"kv policy probe: mask_mode must be one of {', '.join(MASK_MODES)}, got "
                              f"{self.mask_mode!r}")

    def for_layer(self, layer: int) -> "ProbePolicy":
        return dataclasses.replace(self, _layer=layer)

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        return {"top": jnp.zeros((batch, n_kv_heads if n_heads is None else n_heads), jnp.int32)}

    def attend(self, state, q, k_cache, v_cache, length):
        B, Hq, K = q.shape
        S, Hkv = k_cache.shape[1:3]
        length = jnp.asarray(length, jnp.int32)
        o = full_cache(q, k_cache, v_cache, length, self.implementation)
        s = head_scores(q, k_cache)
        valid = jnp.arange(S) < length
        top = jnp.argmax(jnp.where(valid[None, None, :], s, -jnp.inf), axis=-1).astype(jnp.int32)
        heads = [h for layer, h in self.masked if layer == self._layer]
        if heads:
            mask = np.zeros(Hq, bool)
            mask[heads] = True
            if self.mask_mode == "uniform":
                v = jnp.where(valid[None, :, None, None], v_cache.astype(jnp.float32), 0.0)
                mean = jnp.sum(v, axis=1) / length.astype(jnp.float32)  # [B, Hkv, V]
                sub = jnp.repeat(mean, Hq // Hkv, axis=1).astype(o.dtype)
            else:
                sub = jnp.zeros_like(o)
            o = jnp.where(jnp.asarray(mask)[None, :, None], sub, o)
        return o, {"top": top}, length.astype(jnp.float32)

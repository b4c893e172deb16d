"""`tidal`: a few selection layers pick the tokens that the following layers read (TidalDecode, arXiv 2410.05076,
§3; DerrickYLJ/TidalDecode `src/tidal_build/modify_llama.py`).

At each decode step the layers before `select_layer` read their full cache; layer `select_layer` (and
`correction_layer`, when set) reads its full cache too and records, per query head, the `budget` positions with the
highest attention logits; every other later layer reads, per query head (Hs = Hq), the positions the last selection
layer recorded in the same step. TidalDecode's NIAH scripts use top-k 128, selection at layer 2 and a correction
layer (13 for Llama-3-8B; its function default is 9). The cache holds keys at their true positions, as in the
official code.

The selection is handed from layer to layer through the policy state's "shared" entry, which
`DecoderLM.decode_step` passes from each layer to the next; the policy learns its layer from `for_layer`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection, full_cache, head_scores


@dataclasses.dataclass(frozen=True)
class TidalPolicy(KVPolicy):
    NAME = "tidal"
    select_layer: int = 2  # the first selection layer; the layers before it read their full cache
    correction_layer: int = -1  # a second selection layer (-1: none)
    _layer: int = -1  # set per layer by for_layer (not an option)

    def __post_init__(self):
        super().__post_init__()
        if self.select_layer < 0 or (self.correction_layer != -1 and self.correction_layer <= self.select_layer):
            raise PolicyError(f"kv policy tidal: need 0 <= select_layer < correction_layer (or correction_layer=-1), "
                              f"got select_layer={self.select_layer}, correction_layer={self.correction_layer}")

    def for_layer(self, layer: int) -> "TidalPolicy":
        return dataclasses.replace(self, _layer=layer)

    def init_state(self, batch, max_len, n_kv_heads, head_dim, n_heads=None):
        n_heads = n_kv_heads if n_heads is None else n_heads
        return {"shared": jnp.zeros((batch, n_heads, min(self.budget, max_len)), jnp.int32)}

    def select(self, state, q, k_cache, length):
        """A reading layer's selection: the positions the last selection layer recorded (cnt = min(budget, length))."""
        B, Hq = q.shape[:2]
        cnt = jnp.minimum(state["shared"].shape[-1], jnp.asarray(length, jnp.int32))
        return [Selection(state["shared"], jnp.broadcast_to(cnt, (B, Hq)).astype(jnp.int32))], state

    def attend(self, state, q, k_cache, v_cache, length):
        if self._layer < 0:
            raise PolicyError("kv policy tidal: give it to a model (DecoderLM.set_kv_policy), which tells each layer "
                              "its index")
        is_selector = self._layer in (self.select_layer, self.correction_layer)
        if self._layer >= self.select_layer and not is_selector:
            return super().attend(state, q, k_cache, v_cache, length)
        B, Hq, K = q.shape
        S, Hkv = k_cache.shape[1:3]
        length = jnp.asarray(length, jnp.int32)
        o = full_cache(q, k_cache, v_cache, length, self.implementation)
        if not is_selector:  # a layer before the first selection layer
            return o, state, length.astype(jnp.float32)
        s = head_scores(q, k_cache)
        s = jnp.where((jnp.arange(S) < length)[None, None, :], s, -jnp.inf)
        _, top = jax.lax.top_k(s, state["shared"].shape[-1])  # the valid positions first
        return o, {"shared": top.astype(jnp.int32)}, length.astype(jnp.float32)

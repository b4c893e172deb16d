"""`duo`: DuoAttention's deployment (Xiao et al., arXiv 2410.10819 §3; mit-han-lab/duo-attention
`duo_attn/utils.py::sparsify_attention_heads`): the KV heads with the highest trained gates ("retrieval heads") read
the full cache at decode, the others ("streaming heads") only the first `n_sink` tokens and the most recent ones.

The gates are the model's own parameters: a model built with `attention.duo_gates` and trained with `train.objective:
duo` (configs/passkey/duo_gates.yaml; layers/attention.py mixes α·full + (1 − α)·streaming per KV head). The policy
reads them once, when it is given to the model (`DecoderLM.set_kv_policy` calls `for_mixers`), and turns them into a
static per-layer choice of full heads:

- `full=P` (the official deployment's sparsity target, P = 1 − sparsity): the round(P·N) KV heads with the highest
  gates over all N of the model (ties: the earlier layer and head first, where the official code adds U(0, 1e-6)
  noise); `full=1` reads every head's whole cache, exactly the full-cache model;
- `threshold=τ`: the heads with gate ≥ τ (one of the two; neither gives `full=0.5`, the official GQA setting).

`budget` is what a streaming head reads per step (sinks and recent window included); by default the model's training
sizes (`attention.duo_sink` + `duo_window`). One selection list per KV head (Hs = Hkv), a full head's list naming
every position; a layer without full heads reads one shared sink + recent list (O(budget) gathers). Prefill stays
dense, as the official inference's plain prefill; keys keep their true positions.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection, sink_recent


def full_heads_of(gates: list[np.ndarray], *, full: float = -1.0, threshold: float = -1.0) -> list[np.ndarray]:
    """Which KV heads read the full cache: one bool array per layer, shaped like its gates [Hkv]. `threshold` τ != -1:
    gate >= τ; else the round(full·N) highest of all N gates (full -1: 0.5), ties to the earlier layer and head."""
    flat = np.concatenate([np.asarray(g, np.float64).reshape(-1) for g in gates])
    if threshold != -1:
        chosen = flat >= threshold
    else:
        chosen = np.zeros(flat.size, bool)
        chosen[np.argsort(-flat, kind="stable")[:int(round((0.5 if full == -1 else full) * flat.size))]] = True
    bounds = np.cumsum([0, *(np.size(g) for g in gates)])
    return [chosen[a:b].reshape(np.shape(g)) for a, b, g in zip(bounds[:-1], bounds[1:], gates, strict=True)]


@dataclasses.dataclass(frozen=True)
class DuoPolicy(KVPolicy):
    NAME = "duo"
    budget: int = -1  # a streaming head's reads per step (n_sink + recent); -1: the model's duo_sink + duo_window
    n_sink: int = -1  # -1: the model's duo_sink
    full: float = -1.0  # fraction of all KV heads, the highest gates, that read the full cache; -1: 0.5 (or threshold)
    threshold: float = -1.0  # instead of full: the heads with gate >= threshold read the full cache
    _full_heads: tuple = ()  # per layer, one bool per KV head (True: full cache); set by for_mixers (not an option)
    _layer: int = -1  # set per layer by for_layer (not an option)

    def __post_init__(self):
        if self.dense_layers < 0:
            raise PolicyError(f"kv policy duo: dense_layers must be >= 0, got {self.dense_layers}")
        if self.budget != -1 and self.budget < 1:
            raise PolicyError(f"kv policy duo: budget must be >= 1 (or -1: the model's duo_sink + duo_window), got "
                              f"{self.budget}")
        if self.n_sink != -1 and (self.n_sink < 0 or (self.budget != -1 and self.n_sink >= self.budget)):
            raise PolicyError(f"kv policy duo: n_sink must be in [0, budget={self.budget}), got {self.n_sink}")
        if self.threshold != -1 and not 0 <= self.threshold <= 1:
            raise PolicyError(f"kv policy duo: threshold must be in [0, 1] (gates are), got {self.threshold}")
        if self.full != -1 and not 0 <= self.full <= 1:
            raise PolicyError(f"kv policy duo: full must be a fraction in [0, 1], got {self.full}")
        if self.full != -1 and self.threshold != -1:
            raise PolicyError("kv policy duo: give full=P (a fraction of heads) or threshold=T, not both")

    def for_mixers(self, mixers) -> "DuoPolicy":
        """The policy with the model's sizes filled in and its full heads chosen from the gates of `mixers` (the
        model's layers in order). PolicyError when an attention layer has no gates. On an abstract model (no gate
        values) only the checks and sizes."""
        takers = [(i, m) for i, m in enumerate(mixers) if hasattr(m, "set_kv_policy")]
        missing = [i for i, m in takers if getattr(m, "duo_gate", None) is None]
        if not takers or missing:
            names = sorted({type(mixers[i]).__name__ for i in missing})
            raise PolicyError(f"kv policy duo: the model has no DuoAttention gates (layers {missing}: "
                              f"{', '.join(names)}); train them with model.attention.duo_gates and train.objective duo "
                              "(configs/passkey/duo_gates.yaml)")
        cfg = takers[0][1].config
        n_sink = cfg.duo_sink if self.n_sink == -1 else self.n_sink
        budget = cfg.duo_sink + cfg.duo_window if self.budget == -1 else self.budget
        if not n_sink < budget:
            raise PolicyError(f"kv policy duo: n_sink={n_sink} must be below budget={budget}")
        sized = dataclasses.replace(self, budget=budget, n_sink=n_sink)
        values = [jax.tree.leaves(m.duo_gate)[0] for _, m in takers]  # an abstract model's are ShapeDtypeStructs
        if any(isinstance(v, jax.ShapeDtypeStruct) for v in values):
            return sized
        chosen = full_heads_of([np.asarray(v) for v in values], full=self.full, threshold=self.threshold)
        full_heads = [() for _ in mixers]
        for (i, _), c in zip(takers, chosen, strict=True):
            full_heads[i] = tuple(bool(f) for f in c)
        return dataclasses.replace(sized, _full_heads=tuple(full_heads))

    def for_layer(self, layer: int) -> "DuoPolicy":
        return dataclasses.replace(self, _layer=layer)

    def describe(self) -> str:
        """The options, and the chosen full heads per layer ("full_heads=0:1001,1:0000", 1 = full) once set."""
        heads = ",".join(f"{i}:{''.join('1' if f else '0' for f in h)}" for i, h in enumerate(self._full_heads) if h)
        return super().describe() + (f" full_heads={heads}" if heads else "")

    def select(self, state, q, k_cache, length):
        if self._layer < 0 or not self._full_heads:
            raise PolicyError("kv policy duo: give it to a model with gates (DecoderLM.set_kv_policy), which chooses "
                              "each layer's full heads")
        B, S = q.shape[0], k_cache.shape[1]
        full = self._full_heads[self._layer]
        length = jnp.asarray(length, jnp.int32)
        if all(full):
            return [Selection(jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, 1, S)),
                              jnp.broadcast_to(length, (B, 1)))], state
        stream = sink_recent(B, self.n_sink, self.budget - self.n_sink, length)
        if not any(full):
            return [stream], state
        # One list per KV head of S slots: a full head's lists every position (cnt = length), a streaming head's the
        # sink + recent ones (cnt <= budget; slots past it unused). S >= length, so truncating the K = budget slots
        # of sink_recent at S drops only unused ones.
        K = stream.idx.shape[-1]
        stream_idx = stream.idx[..., :S] if K >= S else jnp.pad(stream.idx, ((0, 0), (0, 0), (0, S - K)))
        is_full = jnp.asarray(full)[None, :, None]
        idx = jnp.where(is_full, jnp.arange(S, dtype=jnp.int32)[None, None, :], stream_idx)
        cnt = jnp.where(is_full[..., 0], length, stream.cnt)
        return [Selection(idx.astype(jnp.int32), cnt.astype(jnp.int32))], state

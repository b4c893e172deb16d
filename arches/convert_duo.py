"""Harden a DuoAttention run's gates: `effarch convert RUN OUT --to duo_hard [full=P | threshold=T]`.

The gates a run trained (`attention.duo_gates`, train.objective duo) become 1 for the KV heads the `duo` KV policy
would let read the full cache (the same rule: layers/kv_policies/duo.py `full_heads_of`) and 0 for the others, so
that OUT's every pass, the prompt's included, computes the deployed model: retrieval heads read every earlier token,
streaming heads `duo_sink` + `duo_window` (DuoAttention, arXiv 2410.10819 §3; its chunked prefill applies the
streaming heads to a long prompt too, there with the current 4096-token chunk read whole). `effarch eval OUT passkey`
then measures that function through the parallel path; `--kv-policy duo` instead keeps the prefill dense and applies
the choice at decode only (eval's default `--kv-prefill context`: the question and the answer). The KV cache is not
shrunk: this evaluates the function, not the memory.
"""

import jax.numpy as jnp
import numpy as np

from effarch.arches.lm import ModelConfig
from effarch.layers.kv_policies.duo import full_heads_of


def harden_duo_gates(config: ModelConfig, params, *, full: float = -1.0, threshold: float = -1.0):
    """(config, params) with every `.../mixer/duo_gate` set to 1.0 (full head) or 0.0 (streaming head). ValueError
    for a model without gates or options out of range (the policy's: layers/kv_policies/duo.py)."""
    from effarch.layers.kv_policies import make_policy

    make_policy("duo", [f"full={full}", f"threshold={threshold}"])  # the policy's checks of the options
    if not config.attention.duo_gates:
        raise ValueError("the model has no DuoAttention gates (model.attention.duo_gates is false)")
    blocks = params["blocks"]
    layers = [i for i in sorted(blocks) if "duo_gate" in blocks[i]["mixer"]]
    gates = [np.asarray(blocks[i]["mixer"]["duo_gate"][...]) for i in layers]
    for i, chosen in zip(layers, full_heads_of(gates, full=full, threshold=threshold), strict=True):
        blocks[i]["mixer"]["duo_gate"][...] = jnp.asarray(chosen, jnp.float32)
    return config, params

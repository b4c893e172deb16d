"""`effarch convert RUN OUT --to duo_hard`: DuoAttention's trained gates set to 1 for the heads the `duo` policy
reads fully and 0 for the others (arches/convert_duo.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.convert_duo import harden_duo_gates
from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.kv_policies import PolicyError

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=2, attention=AttentionConfig(
    n_heads=4, n_kv_heads=2, duo_gates=True, duo_sink=2, duo_window=4))


def params_with(gates):
    m = DecoderLM(CFG, rngs=nnx.Rngs(0))
    for block, g in zip(m.blocks, gates, strict=True):
        block.mixer.duo_gate[...] = jnp.asarray(g, jnp.float32)
    return nnx.state(m, nnx.Param)


def hard(params):
    return [np.asarray(params["blocks"][i]["mixer"]["duo_gate"][...]).tolist() for i in (0, 1)]


def test_gates_become_the_policys_choice():
    gates = ([0.9, 0.1], [0.3, 0.6])
    assert hard(harden_duo_gates(CFG, params_with(gates))[1]) == [[1, 0], [0, 1]]  # full=0.5 by default
    assert hard(harden_duo_gates(CFG, params_with(gates), full=0.75)[1]) == [[1, 0], [1, 1]]
    assert hard(harden_duo_gates(CFG, params_with(gates), threshold=0.95)[1]) == [[0, 0], [0, 0]]
    with pytest.raises(PolicyError, match="kv policy duo: threshold must be in"):
        harden_duo_gates(CFG, params_with(gates), threshold=2.0)
    plain = ModelConfig(vocab_size=16, d_model=16, n_layers=2)
    with pytest.raises(ValueError, match="the model has no DuoAttention gates"):
        harden_duo_gates(plain, nnx.state(DecoderLM(plain, rngs=nnx.Rngs(0)), nnx.Param))

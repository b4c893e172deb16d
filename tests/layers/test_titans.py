"""NeuralMemory (Titans LMM) layer: parallel == chunked prefill with carried state; persistent tokens; config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.axes import Mixer
from effarch.layers.titans import NeuralMemory, NeuralMemoryConfig
from tests.helpers.numerics import assert_close

D, T = 16, 21
CONFIG = NeuralMemoryConfig(n_heads=2, expansion=2, chunk_size=4, batch_size=8, n_persistent=3)


@pytest.mark.slow  # the op's split-call tests and tests/conformance/'s prefill in pieces cover it by default
def test_prefill_in_pieces_equals_one_pass():
    layer = NeuralMemory(D, CONFIG, rngs=nnx.Rngs(0))
    assert isinstance(layer, Mixer)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, D)), jnp.float32)
    full = layer(x)
    state, ys = layer.init_state(2, T), []
    assert state.memory.pos == 3  # the persistent tokens were stored first
    for a, b in [(0, 5), (5, 6), (6, 15), (15, T)]:  # ends inside chunks and inside mini-batches
        state, y = layer.prefill(state, x[:, a:b])
        ys.append(y)
    assert_close("y", jnp.concatenate(ys, 1), full, rtol=1e-5)
    assert state.memory.pos == 3 + T


def test_persistent_tokens_reach_every_query():
    layer = NeuralMemory(D, CONFIG, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 9, D)), jnp.float32)
    before = layer(x)
    layer.persistent[...] = layer.persistent[...] + 1.0
    after = layer(x)
    changed = np.asarray(jnp.max(jnp.abs(after - before), axis=(0, 2))) > 1e-6
    assert changed.all(), changed  # what the persistent tokens wrote is read from the first query on


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="titans.batch_size=6 must be a positive multiple of titans.chunk_size=4"):
        NeuralMemoryConfig(chunk_size=4, batch_size=6)
    with pytest.raises(ValueError, match="titans.n_heads=3 must divide d_model=16"):
        NeuralMemory(16, NeuralMemoryConfig(n_heads=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="titans.max_grad_norm must be positive or null, got 0.0"):
        NeuralMemoryConfig(max_grad_norm=0.0)
    layer = NeuralMemory(D, CONFIG, rngs=nnx.Rngs(0))
    state = layer.init_state(1, 8)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    assert layer.state_size(10) == layer.state_size(10_000) == n_bytes + 4  # + the position


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_memory_depth(depth):
    """titans.depth L: w1..wL (K -> F -> ... -> K; L = 1 is K -> K), every matrix read, the state sized to match."""
    from effarch.train.config import load_config

    assert load_config([], [f"model.titans.depth={depth}"]).model.titans.depth == depth
    cfg = NeuralMemoryConfig(n_heads=2, expansion=2, chunk_size=4, batch_size=8, depth=depth)
    layer = NeuralMemory(D, cfg, rngs=nnx.Rngs(0))
    K, F = D // 2, 2 * D // 2
    widths = [K, *[F] * (depth - 1), K]
    assert [layer._params()[f"w{i + 1}"].shape for i in range(depth)] == [
        (2, a, b) for a, b in zip(widths[:-1], widths[1:])]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, D)), jnp.float32)
    run = nnx.jit(lambda layer, x: layer(x))  # one compilation for both calls
    before = run(layer, x)
    last = getattr(layer, f"w{depth}")
    last[...] = last[...] * 2.0
    assert float(jnp.max(jnp.abs(run(layer, x) - before))) > 1e-6  # the last matrix is part of the memory
    state = layer.init_state(1, 8)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    assert layer.state_size(10) == n_bytes + 4
    with pytest.raises(ValueError, match="titans.depth must be positive, got 0"):
        NeuralMemoryConfig(depth=0)

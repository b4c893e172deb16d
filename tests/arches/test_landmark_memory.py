"""LM-level block-memory inference: chunked prefill with retrieval of every block (no remap) == the parallel pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.landmark_memory import init_memory, memory_generate, memory_prefill
from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.landmark import LandmarkConfig
from tests.helpers.numerics import assert_close

V, L = 19, 4


def make(**kw) -> DecoderLM:
    cfg = ModelConfig(vocab_size=V, d_model=24, n_layers=2, mixers=("landmark",),
                      landmark=LandmarkConfig(n_heads=3, head_dim=8, block_len=L, tile=8, **kw))
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def tokens(T: int) -> jnp.ndarray:
    x = np.random.default_rng(0).integers(0, V - 1, (2, T))
    x[:, np.arange(T) % (L + 1) == L] = V - 1  # landmark token at landmark positions
    return jnp.asarray(x, jnp.int32)


@pytest.mark.slow  # the layer-level test (tests/layers/test_landmark.py) covers this in the default run
def test_chunked_memory_prefill_equals_parallel():
    model, x = make(mem_topk=8, remap=False), tokens(27)
    full = jax.jit(lambda x: model(x))(x)

    @jax.jit
    def chunked(x):
        state = init_memory(model, 2, max_blocks=6, max_chunk=10)
        outs = []
        for a, b in ((0, 10), (10, 13), (13, 23), (23, 27)):
            state, logits = memory_prefill(model, state, x[:, a:b])
            outs.append(logits)
        return jnp.concatenate(outs, axis=1)

    assert_close("logits", chunked(x), full, 1e-5)


@pytest.mark.slow
def test_memory_generate_is_greedy_with_landmarks_inserted():
    model, x = make(mem_topk=8, remap=False), tokens(12)
    out = memory_generate(model, np.asarray(x), 6, chunk=5, landmark_token=V - 1)
    # Greedy by hand with the parallel pass: positions 14 and 19 are landmarks, fed the landmark token.
    seq = np.asarray(x)
    fwd = jax.jit(lambda s: model(s))
    expected = []
    while len(expected) < 6:
        if seq.shape[1] % (L + 1) == L:
            nxt = np.full((2,), V - 1)
        else:
            nxt = np.asarray(fwd(jnp.asarray(seq))[:, -1].argmax(-1))
            expected.append(nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, np.stack(expected, axis=1))


@pytest.mark.slow  # tests/layers/test_landmark.py checks eviction itself in the default run
def test_generation_with_a_bounded_memory(monkeypatch):
    # max_blocks=1: every layer's cache holds one block (+ the slots of one chunk) while the prompt and the generated
    # tokens complete 5, so the oldest are evicted and memory stays what init_memory allocated.
    import effarch.arches.landmark_memory as lm_memory

    model, x = make(mem_topk=2, remap=True), tokens(17)
    allocated = []  # (slots, blocks kept) per layer, read before generation donates the state
    real_init = lm_memory.init_memory

    def spy(*args):
        state = real_init(*args)
        allocated.extend((s["mem_k"].shape[1], int(s["max_blocks"])) for s in state)
        return state

    monkeypatch.setattr(lm_memory, "init_memory", spy)
    out = memory_generate(model, np.asarray(x), 8, chunk=5, landmark_token=V - 1, max_blocks=1)
    assert out.shape == (2, 8) and ((out >= 0) & (out < V)).all()
    assert allocated == [(1 + 2, 1)] * 2
    with pytest.raises(ValueError, match="max_blocks must be >= 1"):
        memory_generate(model, np.asarray(x), 1, chunk=5, landmark_token=V - 1, max_blocks=0)


def test_non_landmark_mixer_is_rejected():
    cfg = ModelConfig(vocab_size=V, d_model=24, n_layers=1, mixers=("attention",))
    with pytest.raises(ValueError, match="landmark mixers"):
        init_memory(DecoderLM(cfg, rngs=nnx.Rngs(0)), 1, 4, 4)

"""Titans MAC / MAG / MAL (layers/titans_mac.py, titans_mag.py, titans_mal.py) and their prefixed attention.

Decoding == parallel and causality for all three run in tests/conformance/ (every registered mixer); here:
persistent tokens reach the first query, MAC's memory carries information across segments, MAC's segment scan against
its per-segment loop (and prefill in pieces), MAC's sliding window (titans_attention.sliding), SW-Attn* against dense
masked attention, and config errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers import titans_mac
from effarch.layers.axes import Mixer
from effarch.layers.titans import NeuralMemoryConfig
from effarch.layers.titans_attention import (
    TitansAttentionConfig,
    make_attention,
    persistent_key_values,
    window_prefix_attention,
)
from effarch.layers.titans_mac import MemoryAsContext
from effarch.layers.titans_mag import MemoryAsGate
from effarch.layers.titans_mal import MemoryAsLayer
from effarch.pallas_kernels.attention.reference import attention_reference
from tests.helpers.numerics import assert_close

D = 16
MEMORY = NeuralMemoryConfig(n_heads=2, expansion=2, chunk_size=4, batch_size=8, n_persistent=2)
ATTENTION = TitansAttentionConfig(n_heads=2, window=5, segment_len=8)


def inputs(t, seed=0, b=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D)), jnp.float32)


@pytest.mark.parametrize("cls", [pytest.param(MemoryAsContext, marks=pytest.mark.slow), MemoryAsGate, MemoryAsLayer])
def test_persistent_tokens_reach_the_first_query(cls):
    layer = cls(D, MEMORY, ATTENTION, rngs=nnx.Rngs(0))
    assert isinstance(layer, Mixer)
    x = inputs(6)
    before = layer(x)
    persistent = layer.persistent if cls is MemoryAsContext else layer.memory.persistent
    persistent[...] = persistent[...] + 1.0
    changed = np.asarray(jnp.max(jnp.abs(layer(x) - before), axis=(0, 2))) > 1e-6
    assert changed.all(), changed  # token 0 included: the prefix is visible to every query


def test_mac_memory_carries_across_segments():
    # Attention never leaves a segment, so token 2 can reach segment 1 (tokens 8..15) only through the memory: the
    # retrieved tokens h and the gate M*(y).
    layer = MemoryAsContext(D, MEMORY, ATTENTION, rngs=nnx.Rngs(1))
    x = inputs(16)
    a, b = layer(x), layer(x.at[:, 2].add(1.0))
    assert float(jnp.max(jnp.abs(a[:, 8:] - b[:, 8:]))) > 1e-5


@pytest.mark.slow  # MAC decode == parallel (tests/conformance/) covers the scan in the default run
def test_mac_segment_scan_equals_the_segment_loop_and_pieces():
    # The parallel form runs whole segments under lax.scan; the per-segment Python loop (taken when batch_size does
    # not divide segment_len) is the sequential oracle. Both, and a prefill in pieces on the loop, agree.
    unaligned = NeuralMemoryConfig(n_heads=2, expansion=2, chunk_size=4, batch_size=16)
    assert not MemoryAsContext(D, unaligned, ATTENTION, rngs=nnx.Rngs(0)).aligned
    layer = MemoryAsContext(D, MEMORY, ATTENTION, rngs=nnx.Rngs(2))
    assert layer.aligned
    x = inputs(24, b=2)
    scanned = layer(x)  # three whole segments in one lax.scan
    layer.aligned = False
    assert_close("MAC loop", layer(x), scanned, rtol=1e-5)
    state, ys = layer.init_state(2, 24), []
    for a, b in [(0, 3), (3, 24)]:  # inside a segment; then its rest and two whole segments
        state, y = layer.prefill(state, x[:, a:b])
        ys.append(y)
    assert_close("MAC pieces", jnp.concatenate(ys, 1), scanned, rtol=1e-5)
    assert state.pos == 24


def test_mac_segment_groups_divide_the_segments():
    assert [titans_mac.segment_group(n) for n in (1, 2, 4, 12, 16, 32, 36, 37)] == [1, 1, 1, 1, 4, 4, 6, 1]


@pytest.mark.slow  # two MAC fwd+bwd compiles, ~20 s of CPU
def test_mac_grouped_segment_scan_equals_the_plain_scan_with_gradients(monkeypatch):
    # 16 whole segments run as 4 rematerialised groups of 4 (segment_group); the same scan without groups (whose
    # equality to the per-segment loop test_mac_segment_scan_equals_the_segment_loop_and_pieces checks) is the
    # oracle, in values and in the gradients of the parameters and the input.
    graphdef, params = nnx.split(MemoryAsContext(D, MEMORY, ATTENTION, rngs=nnx.Rngs(3)), nnx.Param)
    x, cot = inputs(128, seed=4, b=2), inputs(128, seed=5, b=2)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x) * cot)

    grouped = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    monkeypatch.setattr(titans_mac, "segment_group", lambda n: 1)
    plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert_close("loss", grouped[0], plain[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grouped[1]), jax.tree.leaves(plain[1]), strict=True):
        assert_close("grad", a, b, rtol=1e-5)


@pytest.mark.slow  # ~10 s: the slow suite (the default suite's 10-minute budget)
def test_mac_sliding_window_crosses_segments_and_decodes_like_the_parallel_pass():
    # titans_attention.sliding: query t sees the h and x of t - L < j <= t. Inside the first segment that is the
    # segment attention itself (same parameters, same outputs); later it reaches back across the segment start.
    # The parallel pass (first segment alone, then the scan over two) equals a prefill ending inside a segment
    # followed by token-by-token decoding.
    sliding = MemoryAsContext(D, MEMORY, TitansAttentionConfig(n_heads=2, segment_len=8, sliding=True),
                              rngs=nnx.Rngs(2))
    segment = MemoryAsContext(D, MEMORY, ATTENTION, rngs=nnx.Rngs(2))
    x = inputs(27)
    full, inside = jax.jit(sliding)(x), jax.jit(segment)(x)
    assert_close("first segment", full[:, :8], inside[:, :8], rtol=1e-6)
    assert float(jnp.max(jnp.abs(full[:, 8:] - inside[:, 8:]))) > 1e-3
    _, _, _, _, visible = sliding._sliding_keys(sliding.init_state(1, 27)._replace(pos=13), x[:, :3], x[:, :3])
    key_pos = 13 - 8 + np.arange(11)  # the cache's 8 tokens, then the piece's 3
    want = (key_pos[None] <= 13 + np.arange(3)[:, None]) & (key_pos[None] > 13 + np.arange(3)[:, None] - 8)
    np.testing.assert_array_equal(np.asarray(visible[0]), np.concatenate([want, want], 1))  # h keys, then x keys
    state, y = sliding.prefill(sliding.init_state(1, 27), x[:, :5])  # ends inside the first segment
    ys = [y]
    step = jax.jit(sliding.decode_step)
    for t in range(5, 27):  # across three segment starts
        state, y = step(state, x[:, t])
        ys.append(y[:, None])
    assert_close("MAC sliding prefill + decode", jnp.concatenate(ys, 1), full, rtol=1e-5)


@pytest.mark.parametrize("pos,T", [(3, 1), (7, 12)])  # a decode step near the start; a longer call
def test_window_prefix_attention_equals_dense_masked_attention(pos, T):
    W, P, H = 5, 3, 2
    attn = make_attention(D, TitansAttentionConfig(n_heads=H, window=W), nnx.Rngs(3))
    x = inputs(W + T, seed=4, b=2)  # the W tokens before the call, then the call's T
    positions = pos - W + jnp.arange(W + T)
    q, k, v = attn.project_qkv(x, positions)
    pk, pv = persistent_key_values(attn, jnp.asarray(np.random.default_rng(5).standard_normal((P, D)),
                                                     jnp.float32), 2)
    got = window_prefix_attention(attn, q[:, W:], k[:, W:], v[:, W:], k[:, :W], v[:, :W], pos, pk, pv)
    qp, kp = positions[W:, None], positions[None, :]
    visible = (kp <= qp) & (kp > qp - W) & (kp >= 0)
    mask = jnp.broadcast_to(jnp.concatenate([jnp.ones((T, P), bool), visible], 1), (2, T, P + W + T))
    want = attention_reference(q[:, W:], jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), causal=False,
                               mask=mask)
    assert_close("SW-Attn*", got, want, rtol=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="titans_attention.window must be positive"):
        TitansAttentionConfig(window=0)
    with pytest.raises(ValueError, match="titans_attention.segment_len=6 must be a multiple of titans.chunk_size=4"):
        MemoryAsContext(D, MEMORY, TitansAttentionConfig(segment_len=6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="titans_attention.n_heads=3 must divide d_model=16"):
        MemoryAsGate(D, MEMORY, TitansAttentionConfig(n_heads=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="titans_attention.n_heads=3 must divide d_model=16"):
        MemoryAsLayer(D, MEMORY, TitansAttentionConfig(n_heads=3), rngs=nnx.Rngs(0))


def test_mac_state_size_counts_the_allocated_state():
    layer = MemoryAsContext(D, MEMORY, ATTENTION, rngs=nnx.Rngs(0))
    state = layer.init_state(1, 8)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    assert layer.state_size(10) == layer.state_size(10_000) == n_bytes + 4  # + the memory's position

"""Landmark layer: block-memory inference == full attention when k covers every block, top-k retrieval, remapped
positions. Prefill + decode == parallel and the rest of the Mixer protocol are in tests/conformance/."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers.landmark import LandmarkAttention, LandmarkConfig, is_landmark_position
from effarch.layers.rope import apply_rope
from tests.helpers.numerics import assert_close

D, L = 24, 4  # blocks of N = 5 positions


def make_layer(**kw) -> LandmarkAttention:
    cfg = LandmarkConfig(n_heads=3, head_dim=8, block_len=L, tile=8, **kw)
    return LandmarkAttention(D, cfg, rngs=nnx.Rngs(0))


def make_x(T: int, B: int = 2):
    return jax.random.normal(jax.random.key(1), (B, T, D))


def test_layout_known_answer():
    np.testing.assert_array_equal(np.asarray(is_landmark_position(jnp.arange(11), 4)),
                                  [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0])


@pytest.mark.parametrize("chunks", [pytest.param((1,) * 23, marks=pytest.mark.slow), (7, 7, 9),
                                    pytest.param((3, 11, 2, 1, 1, 5), marks=pytest.mark.slow)])
def test_memory_with_all_blocks_retrieved_and_no_remap_equals_parallel(chunks):
    # 23 tokens = 4 complete blocks + 3: with k = 5 >= 4 blocks and true positions, retrieval drops nothing.
    layer, x = make_layer(mem_topk=5, remap=False), make_x(23)
    y_full = jax.jit(lambda x: layer(x))(x)

    @jax.jit
    def run(x):
        state = layer.init_memory(2, max_blocks=6, max_chunk=max(chunks))
        ys, t = [], 0
        for c in chunks:
            state, y = layer.memory_prefill(state, x[:, t : t + c])
            ys.append(y)
            t += c
        return jnp.concatenate(ys, axis=1), state

    y, state = run(x)
    assert int(state["n_blocks"]) == 4 and int(state["pos"]) == 23
    assert_close("memory", y, y_full, 1e-5)


def test_memory_retrieves_only_top_k_blocks():
    # With k = 1 a token sees one cached block per head: the output differs from full attention, and poisoning the
    # values of a block no head picked leaves it unchanged, while poisoning a picked one moves it.
    layer, x = make_layer(mem_topk=1, remap=False), make_x(23)
    y_full = jax.jit(lambda x: layer(x))(x)
    state = layer.init_memory(2, max_blocks=6, max_chunk=20)
    state, _ = jax.jit(layer.memory_prefill)(state, x[:, :20])  # 4 blocks cached, incomplete block empty
    assert int(state["n_blocks"]) == 4
    step = jax.jit(layer.memory_step)
    _, y = step(state, x[:, 20])
    assert float(jnp.abs(y - y_full[:, 20]).max()) > 1e-4
    q = apply_rope(layer._qkv(x[:, 20:21])[0], jnp.array([20]), layer.config.rope_theta)
    picked = set(np.asarray(layer._retrieve(state, q)[3][0]).ravel().tolist())
    assert picked and picked < {0, 1, 2, 3}
    unpicked = min({0, 1, 2, 3} - picked)
    for block, moves in ((unpicked, False), (min(picked), True)):
        poisoned = dict(state, mem_v=state["mem_v"].at[0, block].add(10.0))
        _, y2 = step(poisoned, x[:, 20])
        assert (float(jnp.abs(y2[0] - y[0]).max()) > 1e-3) == moves, block


def test_memory_overflow_raises():
    layer, x = make_layer(mem_topk=2), make_x(12)
    state = layer.init_memory(2, max_blocks=1, max_chunk=12)
    with pytest.raises(ValueError, match="block memory"):
        layer.memory_prefill(state, x)


def test_remap_positions_bounded_whatever_the_context():
    # With remapping, the local context starts at (k + 1) * N at most, so a long history does not push the query's
    # RoPE position: the same local tokens after 4 or after 6 cached blocks (of identical content) give equal outputs.
    # Both have >= k = 2 blocks in slot 0, so ties in the top-k pick the same slots.
    layer = make_layer(mem_topk=2, remap=True)
    block = make_x(5, B=1)
    tail = make_x(3, B=1) * 0.5

    def run(n_blocks):
        state = layer.init_memory(1, max_blocks=n_blocks, max_chunk=5)
        for _ in range(n_blocks):
            state, _ = layer.memory_prefill(state, block)
        return layer.memory_prefill(state, tail)[1]

    assert_close("remapped", jax.jit(lambda: run(6))(), jax.jit(lambda: run(4))(), 1e-5)


def test_remap_landmark_scores_match_explicit_slot_rotation():
    # The cache stores landmark keys pre-rotated to slot 0 and rescores only the k most recent blocks: the picks
    # must equal scoring every raw landmark key rotated at its mem_cache.py slot (k most recent: 1..k, others 0).
    layer = make_layer(mem_topk=2, remap=True)
    N, H = layer.block_size, 3
    x = make_x(4 * N + 2, B=1)
    q = apply_rope(layer._qkv(x[:, -1:])[0], jnp.array([3 * N]), layer.config.rope_theta)
    # One block per call, so the jitted prefill and retrieval compile once; the picks are checked after 1, 2 and 4.
    prefill, retrieve = jax.jit(layer.memory_prefill), jax.jit(layer._retrieve)
    state = layer.init_memory(1, max_blocks=4, max_chunk=N)
    for n_blocks in range(1, 5):
        state, _ = prefill(state, x[:, N * (n_blocks - 1) : N * n_blocks])
        if n_blocks == 3:
            continue
        idx = jnp.arange(n_blocks)
        slot = jnp.where(idx >= n_blocks - 2, idx - (n_blocks - 2) + 1, 0)
        raw = state["mem_k"][:, :n_blocks, N - 1]  # [1, n, H, K] unrotated
        lm = jnp.stack([apply_rope(raw[:, m : m + 1], slot[m : m + 1] * N + N - 1, layer.config.rope_theta)[:, 0]
                        for m in range(n_blocks)], axis=1)
        scores = jnp.einsum("bthk,bmhk->bhtm", q, lm)
        want = jnp.sort(jax.lax.top_k(scores, min(2, n_blocks))[1], axis=-1)
        got = retrieve(state, q)[3][..., : min(2, n_blocks)]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"n_blocks={n_blocks}")
        assert got.shape == (1, H, 1, min(2, n_blocks))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="landmark.block_len"):
        LandmarkConfig(block_len=0)
    with pytest.raises(ValueError, match="landmark.head_dim"):
        LandmarkConfig(head_dim=5)

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


def test_full_memory_evicts_the_oldest_blocks():
    # A cache keeping 2 blocks, fed 9 (a ring of 2 + 2 slots, wrapped twice): with true positions and k >= 2, the
    # last chunk sees exactly the 2 newest blocks, as a fresh memory fed only from the first of them does (RoPE is
    # relative, so dropping the evicted prefix changes nothing else). 45 tokens: 9 blocks, chunks of one block.
    layer, x = make_layer(mem_topk=3, remap=False), make_x(45)
    step = jax.jit(layer.memory_prefill)  # two compilations: the 2-block cache and the 9-block one
    state = layer.init_memory(2, max_blocks=2, max_chunk=5)
    assert state["mem_k"].shape[1] == 4  # bounded: 2 kept + 2 for a chunk's blocks, whatever the context
    everything = layer.init_memory(2, max_blocks=9, max_chunk=5)
    for t in range(0, 45, 5):
        state, y = step(state, x[:, t : t + 5])
        everything, y_all = step(everything, x[:, t : t + 5])
    assert int(state["n_blocks"]) == 9
    fresh = layer.init_memory(2, max_blocks=9, max_chunk=5)
    for t in (30, 35, 40):  # blocks 6 and 7 of the long run, then its last chunk
        fresh, want = step(fresh, x[:, t : t + 5])
    assert_close("evicted", y, want, 1e-5)
    assert float(jnp.abs(y - y_all).max()) > 1e-3  # keeping every block gives another answer
    with pytest.raises(ValueError, match="longer than the block memory was made for"):
        layer.memory_prefill(layer.init_memory(2, max_blocks=2, max_chunk=5), x[:, :12])


@pytest.mark.slow  # ~10 s; test_full_memory_evicts_the_oldest_blocks covers the ring in the default run
def test_remapped_retrieval_from_a_wrapped_ring():
    # Remapping after eviction: 6 blocks through a cache keeping 2 (slots 4 % 4 = 0 and 5 % 4 = 1), k = 3. Only
    # blocks 4 and 5 are candidates; they are the most recent, so they sit in remapped slots 1 and 2 (mem_cache.py
    # ranks blocks by age, whatever ring slot they occupy) and their keys are read at positions N.. and 2N...
    layer, x = make_layer(mem_topk=3, remap=True), make_x(31, B=1)
    N = layer.block_size
    state = layer.init_memory(1, max_blocks=2, max_chunk=N)
    prefill = jax.jit(layer.memory_prefill)
    for b in range(6):
        state, _ = prefill(state, x[:, b * N : (b + 1) * N])
    q = apply_rope(layer._qkv(x[:, 30:31])[0], jnp.array([3 * N]), layer.config.rope_theta)
    s_sel, v_sel, valid, picked = jax.jit(layer._retrieve)(state, q)
    np.testing.assert_array_equal(np.asarray(picked[..., :2]), np.broadcast_to([4, 5], picked.shape[:3] + (2,)))
    assert np.asarray(valid[..., :2]).all() and not np.asarray(valid[..., 2]).any()
    for i, slot in enumerate((0, 1)):  # block 4 in slot 0, block 5 in slot 1
        k = apply_rope(state["mem_k"][:, slot], (i + 1) * N + jnp.arange(N), layer.config.rope_theta)  # [1, N, H, K]
        want = jnp.einsum("bthk,bnhk->bhtn", q, k) * layer.head_dim**-0.5
        assert_close(f"scores of block {4 + i}", s_sel[:, :, :, i], want, 1e-5)
        np.testing.assert_array_equal(np.asarray(v_sel[0, :, 0, i]), np.asarray(state["mem_v"][0, slot].swapaxes(0, 1)))


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

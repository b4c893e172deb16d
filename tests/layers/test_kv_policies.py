"""Decode-time KV policies: each policy's selection on a hand-computed case, the budget it reads, that its decode step
gathers only the selected entries of the value cache, and the option parser's one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.layers.kv_policies import (
    PolicyError,
    QuestPolicy,
    RecycledPolicy,
    RetrievalPolicy,
    WindowPolicy,
    make_policy,
)

# The policies whose every step reads at most the budget (recycled's full steps read the whole cache: its own tests).
BOUNDED = ["window", "quest", "retrieval", "tokenselect"]


def selected_tokens(part, b=0, g=0, length=None):
    """The sorted token positions one list of a Selection names (blocks expanded, clipped at length)."""
    ids = np.asarray(part.idx[b, g, : int(part.cnt[b, g])])
    if part.granularity == "block":
        ids = np.concatenate([np.arange(i * part.block, (i + 1) * part.block) for i in ids])
        ids = ids[ids < length] if length is not None else ids
    return sorted(ids.tolist())


def test_window_selection_by_hand():
    p = WindowPolicy(budget=5, n_sink=2)
    q, k = jnp.zeros((1, 2, 4)), jnp.zeros((1, 16, 1, 4))
    (part,), _ = p.select({}, q, k, jnp.int32(9))
    assert selected_tokens(part) == [0, 1, 6, 7, 8]
    (part,), _ = p.select({}, q, k, jnp.int32(4))  # shorter than the budget: every token, once
    assert selected_tokens(part) == [0, 1, 2, 3]


def test_quest_selection_by_hand():
    # One KV head, D = 2, pages of 2, q = (1, -1). Page bounds Σ_d max(q_d kmax_d, q_d kmin_d):
    #   page 0: keys (1, 0), (0, 0):  kmax (1, 0), kmin (0, 0)   -> max(1, 0) + max(0, 0)  = 1
    #   page 1: keys (0, -3), (0, 1): kmax (0, 1), kmin (0, -3)  -> max(0, 0) + max(-1, 3) = 3
    #   page 2: keys (2, 2), (-1, 2): kmax (2, 2), kmin (-1, 2)  -> max(2, -1) + max(-2, -2) = 0
    #   page 3: token 6 only, the current page: always read.
    # budget 5: the current page's 1 token + floor(4 / 2) = 2 whole pages, the best by bound: 1 then 0.
    keys = jnp.array([[1, 0], [0, 0], [0, -3], [0, 1], [2, 2], [-1, 2], [5, 5], [0, 0]], jnp.float32)
    k = keys.reshape(1, 8, 1, 2)
    p = QuestPolicy(budget=5, page=2)
    state = p.update(p.init_state(1, 8, 1, 2), k[:, :7], jnp.int32(0))
    q = jnp.array([[[1.0, -1.0]]])
    np.testing.assert_allclose(p.page_bounds(state, q)[0, 0, :3], [1, 3, 0])
    (part,), _ = p.select(state, q, k, jnp.int32(7))
    assert part.granularity == "block" and np.asarray(part.idx[0, 0, :3]).tolist() == [3, 1, 0]
    assert selected_tokens(part, length=7) == [0, 1, 2, 3, 6]
    assert int(part.tokens(jnp.int32(7))[0, 0]) == 5
    # A decode step's update (token 7 into page 3) keeps the other pages' bounds.
    state2 = p.update(state, k[:, 7:8], jnp.int32(7))
    (kmax, kmin), (kmax2, kmin2) = p.kmax_kmin(state), p.kmax_kmin(state2)  # [B, Hkv, K, pages]
    np.testing.assert_allclose(kmax2[..., :3], kmax[..., :3])
    np.testing.assert_allclose(kmin2[..., :3], kmin[..., :3])
    np.testing.assert_allclose(kmax[0, 0, :, :3].T, [[1, 0], [0, 1], [2, 2]])
    np.testing.assert_allclose(kmin[0, 0, :, :3].T, [[0, 0], [0, -3], [-1, 2]])
    np.testing.assert_allclose(kmax2[0, 0, :, 3], [5, 5])
    np.testing.assert_allclose(kmin2[0, 0, :, 3], [0, 0])


def test_quest_every_n_steps_reuses_its_choice():
    # The by-hand case above (pages 1 then 0 best for q = (1, -1)) with every=3: the choice is made at decode steps
    # 0, 3, 6, ...; in between it is read again even when the bounds would now choose otherwise.
    keys = jnp.array([[1, 0], [0, 0], [0, -3], [0, 1], [2, 2], [-1, 2], [5, 5], [0, 0]], jnp.float32)
    k = keys.reshape(1, 8, 1, 2)
    p = QuestPolicy(budget=5, page=2, every=3)
    state = p.update(p.init_state(1, 8, 1, 2), k[:, :7], jnp.int32(0))
    q = jnp.array([[[1.0, -1.0]]])
    chosen = []
    for step in range(4):
        if step == 1:  # page 2 now bounds highest: kmax = kmin = (0, -9) gives max(0, 0) + max(9, 9) = 9 > 3
            state = {**state, "bounds": state["bounds"].at[0, 0, :, 2].set(jnp.array([0.0, -9.0, 0.0, 9.0]))}
        (part,), state = p.select(state, q, k, jnp.int32(7))
        chosen.append(np.asarray(part.idx[0, 0, : int(part.cnt[0, 0])]).tolist())
    assert chosen == [[3, 1, 0], [3, 1, 0], [3, 1, 0], [3, 2, 1]]
    # A budget that holds every complete page reads them all, reused choice or not (the pages completed since too).
    p = QuestPolicy(budget=8, page=2, every=4)
    state = p.update(p.init_state(1, 8, 1, 2), k[:, :3], jnp.int32(0))
    (part,), state = p.select(state, q, k, jnp.int32(3))  # step 0 chooses among page 0 alone
    state = p.update(state, k[:, 3:6], jnp.int32(3))
    (part,), _ = p.select(state, q, k, jnp.int32(6))  # a reused step: pages 0, 1 complete, 2 current
    assert selected_tokens(part, length=6) == [0, 1, 2, 3, 4, 5]


def test_retrieval_selection_by_hand():
    # D = 1, q = 1: logits are the keys. Static: sink {0} and recent {7}; candidates 1..6 = (5, -1, 3, 2, 9, 0);
    # top 2 = positions 5 (9) and 1 (5).
    keys = jnp.array([0, 5, -1, 3, 2, 9, 0, 7], jnp.float32).reshape(1, 8, 1, 1)
    p = RetrievalPolicy(budget=4, n_sink=1, n_recent=1)
    static, retrieved = p.select({}, jnp.ones((1, 1, 1)), keys, jnp.int32(8))[0]
    assert selected_tokens(static) == [0, 7]
    assert selected_tokens(retrieved) == [1, 5]
    # GQA: a group of two query heads votes with the sum of its softmaxes. Head 0 prefers position 5 strongly, head 1
    # mildly prefers position 1: the vote picks 5 first.
    q2 = jnp.array([[[1.0], [-0.1]]])
    _, retrieved = RetrievalPolicy(budget=3, n_sink=1, n_recent=1).select({}, q2, keys, jnp.int32(8))[0]
    assert selected_tokens(retrieved) == [5]


def list_of_each_position(state, S: int) -> np.ndarray:
    """[B, H, S]: the IVF list holding each cache position (−1: in none), read from the index's lists."""
    lists = np.asarray(state["lists"])
    out = np.full((*lists.shape[:2], S), -1)
    for b, h, c, j in zip(*np.nonzero(lists >= 0), strict=True):
        out[b, h, lists[b, h, c, j]] = c
    return out


def ivf_and_exact(B, S, Hkv, D, nprobe, nlist=32, seed=0, Hq=None, reads=False):
    """(exact's retrieved part, ivf's retrieved part, ivf's reported reads (with reads=True), ivf's state) on random
    keys at length S."""
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    q = jnp.asarray(2 * rng.standard_normal((B, Hq or Hkv, D)), jnp.float32)
    opts = ["budget=64", "n_sink=4", "n_recent=12"]
    ivf = make_policy("retrieval", [*opts, "index=ivf", f"nlist={nlist}", f"nprobe={nprobe}"])
    state = ivf.update(ivf.init_state(B, S, Hkv, D), k, jnp.int32(0))
    (_, exact), _ = make_policy("retrieval", opts).select({}, q, k, jnp.int32(S))
    (static, approx), _ = ivf.select(state, q, k, jnp.int32(S))
    assert selected_tokens(static) == [0, 1, 2, 3, *range(S - 12, S)]
    return exact, approx, float(ivf.attend(state, q, k, k, jnp.int32(S))[2]) if reads else None, state


@pytest.mark.slow  # ~4-5 s: the slow suite (the default suite's 10-minute budget)
def test_ivf_probing_every_list_is_exact_top_k():
    exact, approx, reads, _ = ivf_and_exact(2, 128, 2, 8, nprobe=8, nlist=8, Hq=4, reads=True)  # GQA: the vote
    for b in range(2):
        for h in range(2):
            assert selected_tokens(approx, b, h) == selected_tokens(exact, b, h)
    # Reads: 64 attended + (8 centroids + every candidate, 128 - 4 sinks - 12 recent, scanned) / 2 key-only reads.
    assert reads == 64 + 0.5 * (8 + 112)


@pytest.mark.slow  # ~5 s of CPU: the fast case is test_ivf_probing_every_list_is_exact_top_k
def test_ivf_recall_at_small_nprobe_and_honest_reads():
    # 512 random keys in 16 dims, 32 lists: scanning 8 lists (a quarter of the keys) finds far more of the exact top
    # 48 than a quarter of them (measured: 0.69 mean recall; 1 list: 0.09, 32 lists: 1.0).
    exact, approx, reads, state = ivf_and_exact(2, 512, 2, 16, nprobe=8, reads=True)
    recall = [len(set(selected_tokens(approx, b, h)) & set(selected_tokens(exact, b, h))) / int(exact.cnt[b, h])
              for b in range(2) for h in range(2)]
    assert np.mean(recall) > 0.5, recall
    # Reads: 64 attended tokens + (32 centroids + the members of the 8 probed lists among the candidates) / 2.
    assign = list_of_each_position(state, 512)
    assert assign.min() >= 0 and assign.max() < 32
    assert 64 + 0.5 * 32 < reads < 64 + 0.5 * (32 + 512)
    assert float(jnp.asarray(approx.cnt).min()) == 48


def test_ivf_keys_written_at_decode_join_their_nearest_list():
    B, S, Hkv, D = 1, 64, 1, 4
    rng = np.random.default_rng(2)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    p = make_policy("retrieval", ["budget=16", "n_sink=1", "n_recent=4", "index=ivf", "nlist=4", "nprobe=1"])
    state = p.update(p.init_state(B, S, Hkv, D), k[:, :48], jnp.int32(0))
    centroids = state["centroids"]
    state = p.update(state, k[:, 48:49], jnp.int32(48))  # a decode step: the index stays, the key joins a list
    np.testing.assert_array_equal(state["centroids"], centroids)
    d = np.sum((np.asarray(centroids)[0, 0] - np.asarray(k)[0, 48, 0]) ** 2, axis=-1)
    assign = list_of_each_position(state, S)
    assert int(assign[0, 0, 48]) == int(np.argmin(d))
    assert int(assign[0, 0, 49]) == -1  # not written yet


def test_ivf_lists_are_balanced_and_hold_every_key_once():
    from effarch.layers.kv_policies import ivf

    # By hand: 1-D points, two lists with room 2 each: three points want list 0 (at 0); the farthest of them (0.9)
    # goes to list 1 (at 5), its next nearest, with the point already nearest to list 1.
    x = jnp.array([0.1, 0.9, -0.2, 4.0])[:, None]
    d = (x - jnp.array([0.0, 5.0])[None, :]) ** 2
    assert np.asarray(ivf.place(d, jnp.array([2, 2]))).tolist() == [0, 1, 0, 1]
    # A cache written by a prefill (clustered keys: most want one list) and then token by token: every position sits
    # in exactly one list, no list past its capacity; nlist=0 gives ceil(max_len / list_size).
    B, S, Hkv, D = 2, 96, 2, 4
    rng = np.random.default_rng(3)
    k = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    k[:, 8:72] = 3.0  # 64 equal keys: the lists they want cannot hold them all
    p = make_policy("retrieval", ["budget=32", "index=ivf", "list_size=16", "slack=1.5", "nprobe=2"])
    state = p.init_state(B, S, Hkv, D)
    assert state["lists"].shape == (B, Hkv, 6, 24)  # 96 / 16 lists of 1.5 * 16 slots
    state = jax.jit(p.update)(state, jnp.asarray(k[:, :80]), jnp.int32(0))
    assert int(state["fill"].max()) == 24  # full lists: the overflow went to the next nearest
    step = jax.jit(p.update)
    for t in range(80, S):
        state = step(state, jnp.asarray(k[:, t : t + 1]), jnp.int32(t))
    lists, fill = (np.asarray(state[n]) for n in ("lists", "fill"))
    for b in range(B):
        for h in range(Hkv):
            held = lists[b, h][lists[b, h] >= 0]
            assert sorted(held.tolist()) == list(range(S))
            assert (fill[b, h] == (lists[b, h] >= 0).sum(-1)).all() and fill[b, h].max() <= 24


@pytest.mark.parametrize("name", BOUNDED)
def test_reads_at_most_the_budget(name):
    B, S, Hq, Hkv, D, budget = 2, 512, 4, 2, 8, 64
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    p = make_policy(name, [f"budget={budget}"])
    state = p.update(p.init_state(B, S, Hkv, D), k, jnp.int32(0))
    unit = getattr(p, "page", 1)  # quest reads whole pages: within a page of the budget
    for length in (3, 100, S):
        parts, _ = p.select(state, q, k, jnp.int32(length))
        read = sum(np.asarray(part.tokens(jnp.int32(length))).max() for part in parts)
        assert min(budget, length) - unit < read <= min(budget, length)
        reported = float(p.attend(state, q, k, k, jnp.int32(length))[2])  # what the eval reports
        assert min(budget, length) - unit < reported <= min(budget, length)


@pytest.mark.parametrize("name", [*BOUNDED, "longheads"])
def test_decode_step_gathers_only_the_selected_values(name):
    # The value cache is touched only by the op's gathers, of at most `budget` tokens per list (quest: its list slots,
    # budget // page + 1 pages, the current page being partial): O(budget), not O(S).
    from effarch.layers.rope import rope_frequencies

    B, S, Hq, Hkv, D, budget = 1, 4096, 4, 2, 8, 64
    p = make_policy(name, [f"budget={budget}"]).bind_rope(tuple(np.asarray(rope_frequencies(D)).tolist()))
    k = v = jnp.zeros((B, S, Hkv, D))
    state = p.init_state(B, S, Hkv, D, n_heads=Hq)
    jaxpr = jax.make_jaxpr(lambda st, q, k, v: p.attend(st, q, k, v, jnp.int32(S))[0])(state, jnp.zeros((B, Hq, D)),
                                                                                        k, v).jaxpr
    v_var = jaxpr.invars[-1]
    reads = [e for e in jaxpr.eqns if any(x is v_var for x in e.invars)]
    assert reads and all(e.primitive.name == "gather" for e in reads)
    per_list = [int(np.prod(e.outvars[0].aval.shape)) // (B * D) for e in reads]
    assert sum(per_list) <= (budget + getattr(p, "page", 0)) * Hq  # quest's lists are per query head
    assert sum(per_list) < S // 8


def test_tokenselect_by_hand():
    # D = 1, two query heads on one KV head, q = (1, -1): head 0 prefers large keys, head 1 small ones. Sink {0},
    # recent {7}; candidates 1..6 = (5, -1, 3, 2, 9, -4). Soft vote = softmax(k) + softmax(-k): position 5 (9) for
    # head 0 and position 6 (-4) for head 1 dominate; a per-KV-head top-1 by q·k of head 0 alone would miss 6.
    keys = jnp.array([0, 5, -1, 3, 2, 9, -4, 7], jnp.float32).reshape(1, 8, 1, 1)
    q = jnp.array([[[1.0], [-1.0]]])
    p = make_policy("tokenselect", ["budget=4", "n_sink=1", "n_recent=1"])
    static, chosen = p.select({}, q, keys, jnp.int32(8))[0]
    assert selected_tokens(static) == [0, 7] and chosen.idx.shape[1] == 1  # one list for all heads
    assert selected_tokens(chosen) == [5, 6]
    # The selection cache: a similar query (cos >= reuse_cos) reads the previous selection again.
    p = make_policy("tokenselect", ["budget=3", "n_sink=1", "n_recent=1", "reuse_cos=0.9"])
    state = p.init_state(1, 8, 1, 1, n_heads=2)
    (_, first), state = p.select(state, q, keys, jnp.int32(8))
    assert selected_tokens(first) == [5]
    flipped = keys.at[0, 6, 0, 0].set(-20.0)  # now position 6 wins the vote of a fresh selection
    assert selected_tokens(p.select(p.init_state(1, 8, 1, 1, n_heads=2), q, flipped, jnp.int32(8))[0][1]) == [6]
    (_, again), _ = p.select(state, 1.01 * q, flipped, jnp.int32(8))  # cos = 1: reused
    assert selected_tokens(again) == [5]
    (_, fresh), _ = p.select(state, jnp.array([[[-1.0], [-1.0]]]), flipped, jnp.int32(8))  # cos = 0: anew
    assert selected_tokens(fresh) == [6]
    # Two rows, one similar and one not: the batch votes (the vote is skipped only when every row reuses), and each
    # row keeps or replaces its own choice.
    both = jax.tree.map(lambda x: jnp.concatenate([x, x]) if x.ndim else x, state)
    q2 = jnp.concatenate([1.01 * q, jnp.array([[[-1.0], [-1.0]]])])
    (_, mixed), _ = p.select(both, q2, jnp.concatenate([flipped, flipped]), jnp.int32(8))
    assert selected_tokens(mixed, b=0) == [5] and selected_tokens(mixed, b=1) == [6]


def test_tidal_by_hand():
    # D = 1, two query heads on one KV head, q = (1, -1); select_layer 1 (layer 0 reads everything).
    keys = jnp.array([0, 5, -1, 3, 2, 9, -4, 7], jnp.float32).reshape(1, 8, 1, 1)
    v = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1, 1)
    q = jnp.array([[[1.0], [-1.0]]])
    p = make_policy("tidal", ["budget=2", "select_layer=1"])
    state = p.init_state(1, 8, 1, 1, n_heads=2)
    dense = jax.nn.softmax(jnp.array([1.0, -1.0])[:, None] * keys.ravel()[None, :], axis=-1) @ np.arange(8.0)
    o0, s0, read0 = p.for_layer(0).attend(state, q, keys, v, jnp.int32(8))
    np.testing.assert_allclose(o0[0, :, 0], dense, rtol=1e-5)
    assert s0 is state and float(read0) == 8  # a layer before the selection layer records nothing
    o1, s1, _ = p.for_layer(1).attend(state, q, keys, v, jnp.int32(8))  # full attention, then top-2 per head
    np.testing.assert_allclose(o1[0, :, 0], dense, rtol=1e-5)
    assert np.asarray(s1["shared"][0]).tolist() == [[5, 7], [6, 2]]
    o2, _, read2 = p.for_layer(2).attend(s1, q, keys, v, jnp.int32(8))  # reads the recorded positions only
    assert float(read2) == 2
    for h, (pos, sign) in enumerate((([5, 7], 1.0), ([6, 2], -1.0))):
        w = jax.nn.softmax(sign * keys.ravel()[jnp.array(pos)])
        np.testing.assert_allclose(o2[0, h, 0], w @ np.asarray(pos, float), rtol=1e-5)
    with pytest.raises(PolicyError, match="tidal: give it to a model"):
        p.attend(state, q, keys, v, jnp.int32(8))


def test_recycled_by_hand():
    # D = 1, q = 1, one head: logits are the keys. stride 2, budget 4.
    keys = jnp.array([0, 3, 1, 2, 0, 0, 0, 0], jnp.float32).reshape(1, 8, 1, 1)
    v = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1, 1)
    p = RecycledPolicy(budget=4, stride=2)
    q = jnp.ones((1, 1, 1))
    state = p.init_state(1, 8, 1, 1)
    # Length 5: the first decode step is a full step. It ranks positions 0..3 by attention: 1, 3, 2, 0.
    o, state, read = p.attend(state, q, keys, v, jnp.int32(5))
    assert float(read) == 5
    w = np.exp([0, 3, 1, 2, 0]) / np.exp([0, 3, 1, 2, 0]).sum()
    np.testing.assert_allclose(o[0, 0, 0], w @ np.arange(5), rtol=1e-5)
    assert int(state["anchor"]) == 4 and np.asarray(state["ranked"][0, 0, :4]).tolist() == [1, 3, 2, 0]
    # Length 6: tokens 4, 5 (since the full step) and the best 4 - 2 = 2 ranked positions, 1 and 3.
    new, ranked = p.select(state, q, keys, jnp.int32(6))[0]
    assert selected_tokens(new) + selected_tokens(ranked) == [4, 5, 1, 3]
    o, state2, read = p.attend(state, q, keys, v, jnp.int32(6))
    assert float(read) == 4
    sel = [1, 3, 4, 5]
    w = np.exp(np.asarray(keys).ravel()[sel]) / np.exp(np.asarray(keys).ravel()[sel]).sum()
    np.testing.assert_allclose(o[0, 0, 0], w @ np.asarray(sel, float), rtol=1e-5)
    assert int(state2["anchor"]) == 4  # not a full step
    # Length 7: three tokens since the full step > stride: full again, anchored at 6.
    _, state3, _ = p.attend(state2, q, keys, v, jnp.int32(7))
    assert int(state3["anchor"]) == 6


def test_full_budget_selects_everything():
    B, S, Hkv, D = 1, 40, 1, 4
    k = jnp.asarray(np.random.default_rng(1).standard_normal((B, S, Hkv, D)), jnp.float32)
    q = jnp.ones((B, 2, D))
    for name, opts in (("window", []), ("quest", ["page=16"]), ("retrieval", []),
                       ("retrieval", ["index=ivf", "nlist=4", "nprobe=1"])):
        p = make_policy(name, ["budget=48", *opts])
        state = p.update(p.init_state(B, S, Hkv, D), k[:, :37], jnp.int32(0))
        parts, _ = p.select(state, q, k, jnp.int32(37))
        got = sorted(t for part in parts for t in selected_tokens(part, g=0, length=37))
        assert got == list(range(37)), name


def test_options_and_errors():
    p = make_policy("quest", ["budget=128", "page=32", "dense_layers=2"])
    assert (p.budget, p.page, p.dense_layers) == (128, 32, 2)
    assert make_policy("retrieval", ["budget=64"]).n_recent == 16  # budget // 4
    assert "budget=128" in p.describe()
    with pytest.raises(PolicyError, match="unknown kv policy 'nope'"):
        make_policy("nope")
    with pytest.raises(PolicyError, match="kv policy quest: expected option=value"):
        make_policy("quest", ["size=4"])
    with pytest.raises(PolicyError, match="kv policy window: budget must be an integer"):
        make_policy("window", ["budget=lots"])
    with pytest.raises(PolicyError, match="kv policy quest: page"):
        make_policy("quest", ["budget=8", "page=16"])
    with pytest.raises(PolicyError, match="kv policy window: n_sink"):
        make_policy("window", ["budget=4", "n_sink=4"])
    with pytest.raises(PolicyError, match="kv policy recycled: stride"):
        make_policy("recycled", ["budget=8", "stride=9"])
    with pytest.raises(PolicyError, match="kv policy tidal: need 0 <= select_layer < correction_layer"):
        make_policy("tidal", ["select_layer=3", "correction_layer=2"])
    with pytest.raises(PolicyError, match="expected option=value"):
        make_policy("tidal", ["_layer=3"])  # private: set by the model, not an option
    with pytest.raises(PolicyError, match="kv policy retrieval"):
        make_policy("retrieval", ["budget=8", "n_recent=6", "n_sink=2"])
    with pytest.raises(PolicyError, match="kv policy retrieval: index must be exact or ivf"):
        make_policy("retrieval", ["index=hnsw"])
    with pytest.raises(PolicyError, match="kv policy retrieval: need nlist >= 0 .* and 1 <= nprobe <= nlist"):
        make_policy("retrieval", ["index=ivf", "nlist=4", "nprobe=5"])
    with pytest.raises(PolicyError, match="kv policy quest: every must be >= 1"):
        make_policy("quest", ["every=0"])
    hash(p)  # static configuration: a model's graphdef holds it


@pytest.mark.slow  # interprets the kernels (~30 s on a busy host)
@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_policies_run_on_the_decode_kernels(monkeypatch, implementation):
    # `implementation=` reaches sparse_decode_attention: quest's block lists and retrieval's token lists merged with
    # its recent window give the xla path's output through the opt-in kernels (interpreted here).
    monkeypatch.setenv("EFFARCH_PALLAS_INTERPRET", "1")
    B, S, Hq, Hkv, D = 2, 96, 4, 2, 16
    rng = np.random.default_rng(2)
    k, v = (jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    for name, opts in (("quest", ["page=8"]), ("retrieval", [])):
        outs = []
        for impl in ("xla", implementation):
            p = make_policy(name, ["budget=32", f"implementation={impl}", *opts])
            state = p.update(p.init_state(B, S, Hkv, D), k, jnp.int32(0))
            outs.append(jax.jit(lambda st, q, k, v, p=p: p.attend(st, q, k, v, jnp.int32(70))[0])(state, q, k, v))
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-4, err_msg=name)
    monkeypatch.delenv("EFFARCH_PALLAS_INTERPRET")  # the kernel really ran: compiled, it refuses on this CPU host
    with pytest.raises(NotImplementedError, match=implementation):
        p.attend(state, q, k, v, jnp.int32(70))


def test_longheads_chunk_key_by_hand():
    # One chunk of 2 tokens, one head, D = 2. Non-causal attention inside the chunk: q_i·k_j / √2 with q = k rows.
    from effarch.layers.kv_policies.longheads import chunk_keys

    q = np.array([[1.0, 0.0], [0.0, 2.0]])
    k = np.array([[1.0, 1.0], [0.0, -1.0]])
    v = np.array([[2.0, 0.0], [0.0, 4.0]])
    s = q @ k.T / np.sqrt(2)
    o = np.exp(s) / np.exp(s).sum(1, keepdims=True) @ v
    c = o.mean(0)
    p = np.exp(c @ k.T / np.sqrt(2))
    want = (p / p.sum()) @ k
    got = chunk_keys(*(jnp.asarray(x, jnp.float32).reshape(1, 2, 1, 2) for x in (q, k, v)), 2)
    np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-5)


@pytest.mark.slow  # ~4-5 s: the slow suite (the default suite's 10-minute budget)
def test_longheads_chunk_keys_same_from_prefill_or_steps():
    # Chunk keys use chunk-local positions: writing 21 tokens at once or 7 then one by one gives the same keys.
    from effarch.layers.rope import apply_rope, rope_frequencies

    B, S, Hq, Hkv, D, w = 1, 24, 2, 1, 4, 4
    rng = np.random.default_rng(5)
    freqs = rope_frequencies(D)
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, h, D)), jnp.float32) for h in (Hq, Hkv, Hkv))
    q, k = apply_rope(q, jnp.arange(S), freqs=freqs), apply_rope(k, jnp.arange(S), freqs=freqs)
    p = make_policy("longheads", ["budget=16", f"chunk={w}"]).bind_rope(tuple(np.asarray(freqs).tolist()))
    observe = jax.jit(p.observe)
    at_once = observe(p.init_state(B, S, Hkv, D, n_heads=Hq), q[:, :21], k[:, :21], v[:, :21], jnp.int32(0))
    steps = observe(p.init_state(B, S, Hkv, D, n_heads=Hq), q[:, :7], k[:, :7], v[:, :7], jnp.int32(0))
    for t in range(7, 21):
        steps = observe(steps, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], jnp.int32(t))
    np.testing.assert_allclose(steps["keys"][:, :, :5], at_once["keys"][:, :, :5], atol=1e-5)  # chunks 0..4 complete
    assert float(jnp.abs(at_once["keys"][:, :, 5:]).max()) == 0  # chunk 5 (tokens 20, 21..) is not
    np.testing.assert_allclose(steps["buf_k"][:, :1], at_once["buf_k"][:, :1], atol=1e-6)  # token 20: the buffer
    # Shifting the whole sequence keeps the chunk keys (chunk-local RoPE): chunk 1 of tokens 4..7 at 8..11.
    def moved(x):
        x4 = apply_rope(apply_rope(x, -jnp.arange(S), freqs=freqs), jnp.arange(S) + 4, freqs=freqs)
        return jnp.pad(x4, ((0, 0), (4, 0), (0, 0), (0, 0)))[:, :12]

    shifted = observe(p.init_state(B, S + 4, Hkv, D, n_heads=Hq), moved(q), moved(k),
                      jnp.pad(v, ((0, 0), (4, 0), (0, 0), (0, 0)))[:, :12], jnp.int32(0))
    np.testing.assert_allclose(shifted["keys"][:, :, 2], at_once["keys"][:, :, 1], atol=1e-5)


def test_longheads_selection_and_positions_by_hand():
    # chunk 2, budget 8: 4 chunks (first, previous, current + 1 by score). One head, D = 2, length 11: chunks 0..4
    # complete, chunk 5 holds token 10. Chunk keys: chunk 2 scores best with the unrotated query (1, 0).
    from effarch.layers.rope import apply_rope, rope_frequencies

    B, S, D, length = 1, 12, 2, 11
    freqs = rope_frequencies(D)
    p = make_policy("longheads", ["budget=8", "chunk=2", "train_len=8"]).bind_rope(tuple(np.asarray(freqs).tolist()))
    state = p.init_state(B, S, 1, D)
    state["keys"] = state["keys"].at[0, 0, :5].set(jnp.array([[0, 0], [1, 0], [5, 0], [2, 0], [-9, 0]], jnp.float32))
    q_raw = jnp.array([[[1.0, 0.0]]])
    q = apply_rope(q_raw[:, None], jnp.array([length - 1]), freqs=freqs)[:, 0]  # the query arrives rotated at 10
    (part,), _ = p.select(state, q, jnp.zeros((B, S, 1, D)), jnp.int32(length))
    assert selected_tokens(part, length=length) == [0, 1, 4, 5, 8, 9, 10]  # chunks 0, 2, 4 and 5
    # Attention: chunks laid out at 0, 2, 4, 6 (token 10 at 6), the query at 6; keys rotated afresh there.
    rng = np.random.default_rng(0)
    k0 = jnp.asarray(rng.standard_normal((B, S, 1, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, 1, D)), jnp.float32)
    o, _, reads = p.attend(state, q, apply_rope(k0, jnp.arange(S), freqs=freqs), v, jnp.int32(length))
    read, new_pos = [0, 1, 4, 5, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6]
    keys = apply_rope(k0[:, jnp.array(read)], jnp.array(new_pos), freqs=freqs)[0, :, 0]
    q6 = apply_rope(q_raw[:, None], jnp.array([6]), freqs=freqs)[0, 0, 0]
    wts = jax.nn.softmax(keys @ q6 / np.sqrt(D))
    np.testing.assert_allclose(o[0, 0], wts @ v[0, jnp.array(read), 0], atol=1e-5)
    assert float(reads) == 7
    with pytest.raises(PolicyError, match="longheads: give it to a model"):
        make_policy("longheads", ["budget=8", "chunk=2"]).attend(state, q, k0, v, jnp.int32(length))
    with pytest.raises(PolicyError, match="longheads: need 1 <= chunk <= min"):
        make_policy("longheads", ["budget=64", "chunk=32", "train_len=16"])


def test_act_calibrates_only_the_chosen_heads_by_hand():
    # Two query heads on one KV head; layer 0 calibrates head 1 only. Prefill 5 tokens, then the step at length 6.
    rng = np.random.default_rng(4)
    B, S, Hq, D = 1, 6, 2, 4
    q = jnp.asarray(rng.standard_normal((B, S, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, 1, D)), jnp.float32)
    k = k.at[0, 2, 0].set(3 * q[0, 3:, 1].mean(0))  # token 2: a hidden sink for head 1's later rows
    v = jnp.asarray(rng.standard_normal((B, S, 1, D)), jnp.float32)
    beta, tau = 0.4, 0.2
    p = make_policy("act", ["heads=0:1", f"beta={beta}", f"tau={tau}"]).for_layer(0)
    state = p.observe(p.init_state(B, S, 1, D, n_heads=Hq), q[:, :5], k[:, :5], v[:, :5], jnp.int32(0))
    o, state2, reads = p.attend(state, q[:, 5], k, v, jnp.int32(6))
    assert float(reads) == 6
    logits = np.einsum("thd,sd->hts", np.asarray(q[0]), np.asarray(k[0, :, 0])) / np.sqrt(D)
    P = np.where(np.tril(np.ones((S, S), bool))[None], np.exp(logits), 0.0)
    P /= P.sum(-1, keepdims=True)  # [h, row, col]: rows 0..5, the last is the decode row
    np.testing.assert_allclose(o[0, 0], P[0, 5] @ np.asarray(v[0, :, 0]), rtol=1e-5, atol=1e-6)  # head 0: untouched
    colmean = P[1].sum(0) / (S - np.arange(S))  # rows j..5 see column j
    in_s = colmean > tau
    in_s[np.argmax(in_s)] = False  # the first member (the initial sink) stays
    assert in_s.any() and not in_s[0]
    m = P[1, 5][in_s].sum()
    row = np.where(in_s, beta * P[1, 5], P[1, 5] * (1 - beta * m) / (1 - m))
    np.testing.assert_allclose(row.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(o[0, 1], row @ np.asarray(v[0, :, 0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state2["colsum"][0, 1], P[1].sum(0), rtol=1e-5)
    # Another layer, or beta = 1, or no heads: the full cache's attention.
    for other in (p.for_layer(1), make_policy("act", ["heads=0:1", "beta=1"]).for_layer(0),
                  make_policy("act").for_layer(0)):
        o2, _, _ = other.attend(other.observe(other.init_state(B, S, 1, D, n_heads=Hq), q[:, :5], k[:, :5], v[:, :5],
                                              jnp.int32(0)), q[:, 5], k, v, jnp.int32(6))
        np.testing.assert_allclose(o2[0], np.einsum("hs,sd->hd", P[:, 5], np.asarray(v[0, :, 0])), rtol=1e-5,
                                   atol=1e-6)


def test_act_options_and_calibration_file(tmp_path):
    path = tmp_path / "act.json"
    path.write_text(json.dumps({"heads": [[1, 3], [0, 2]], "beta": 0.5, "tau": 0.15}))
    p = make_policy("act", [f"calibration={path}"])
    assert p._heads == ((0, 2), (1, 3)) and (p.beta, p.tau) == (0.5, 0.15)
    assert p.for_layer(1).layer_heads() == (3,)
    with pytest.raises(PolicyError, match="kv policy act: heads must be LAYER:HEAD"):
        make_policy("act", ["heads=1-2"])
    with pytest.raises(PolicyError, match="kv policy act: beta must be in"):
        make_policy("act", ["beta=2"])
    with pytest.raises(PolicyError, match="kv policy act: calibration .* is not an act-search JSON"):
        make_policy("act", [f"calibration={tmp_path / 'missing.json'}"])
    with pytest.raises(PolicyError, match="layer 0 has 2 query heads, not head 5"):
        make_policy("act", ["heads=0:5"]).for_layer(0).init_state(1, 4, 1, 2, n_heads=2)

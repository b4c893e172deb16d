"""neural_memory_scan: the parallel form == the sequential oracle (values and gradients), state carried across split
calls, token-by-token decoding == one pass, the clamped update (max_grad_norm), and the semantics pinned on cases
small enough to compute by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.titans import (
    neural_memory_init_state,
    neural_memory_retrieve,
    neural_memory_scan,
    neural_memory_step,
    reference,
    xla,
)
from tests.helpers.numerics import assert_close

B, T, H, D, F = 2, 19, 3, 8, 16  # T = 19: not a multiple of any chunk size below


def inputs(seed=0, T=T, depth=2, gates_for=None):
    """l2-normalised q and k as the layer gives them, theta in (0, 1), eta in (0, 1), alpha in (0, 0.3)."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    dims = [D] + [F] * (depth - 1) + [D]
    params = {f"w{i + 1}": r(H, a, b, scale=a**-0.5) for i, (a, b) in enumerate(zip(dims, dims[1:]))}
    k, v, q = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    k, q = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (k, q))
    lr = jax.nn.sigmoid(r(B, T, H))
    n = gates_for if gates_for is not None else T
    momentum, decay = jax.nn.sigmoid(r(B, n, H)), 0.3 * jax.nn.sigmoid(r(B, n, H))
    return params, k, v, q, lr, momentum, decay


# In the default suite: chunks of one token refreshed every 4 (the token-level edge) and chunks of 5 that do not
# divide T; the other three with the slow tests.
SLOW = pytest.mark.slow
CASES = [pytest.param(1, None, marks=SLOW), pytest.param(4, None, marks=SLOW), pytest.param(4, 8, marks=SLOW), (1, 4),
         (5, None)]


@pytest.mark.parametrize("chunk_size, batch_size", CASES)
def test_xla_matches_reference_values_and_gradients(chunk_size, batch_size):
    params, k, v, q, lr, momentum, decay = inputs()
    n = T // chunk_size
    momentum, decay = momentum[:, :n], decay[:, :n]
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)

    def loss(impl):
        @jax.jit
        def f(*args):
            y = neural_memory_scan(*args, chunk_size=chunk_size, batch_size=batch_size, implementation=impl)
            return jnp.sum(y * cot), y

        return jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True)(params, k, v, q, lr, momentum, decay)

    (_, y_ref), g_ref = loss("reference")
    (_, y_xla), g_xla = loss("xla")
    assert_close("y", y_xla, y_ref, rtol=1e-5)
    names = ("params", "keys", "values", "queries", "lr", "momentum", "decay")
    for name, a, b in zip(names, g_xla, g_ref):
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert_close(f"d{name}", leaf_a, leaf_b, rtol=1e-5)
    assert float(jnp.max(jnp.abs(g_ref[5]))) > 0  # momentum is exercised (not the C = 1 trivial path only)


@pytest.mark.slow  # ~9 s: the slow suite (the default suite's 10-minute budget)
def test_clamped_chunk_gradients_match_and_bound_the_update():
    # max_grad_norm c: xla == reference (values and gradients) with a c small enough to clamp every chunk; one chunk
    # from a fresh state moves S by exactly clamp(g_0), whose norm is below c.
    C, c, T = 4, 0.05, 11  # two chunks, a refresh after them, an open tail
    params, k, v, q, lr, momentum, decay = inputs(6, T=T, gates_for=T // C)
    cot = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, H, D)), jnp.float32)

    def run(impl, max_grad_norm):
        @jax.jit
        def f(*args):
            y = neural_memory_scan(*args, chunk_size=C, batch_size=8, implementation=impl, max_grad_norm=max_grad_norm)
            return jnp.sum(y * cot), y

        return jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True)(params, k, v, q, lr, momentum, decay)

    (_, y_ref), g_ref = run("reference", c)
    (_, y_xla), g_xla = run("xla", c)
    assert_close("y", y_xla, y_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_ref)):
        assert_close("grad", a, b, rtol=1e-5)
    y_plain = neural_memory_scan(params, k, v, q, lr, momentum, decay, chunk_size=C, batch_size=8)
    assert float(jnp.max(jnp.abs(y_plain - y_xla))) > 1e-3  # the clamp is active at this c

    _, state = neural_memory_scan(params, k[:, :C], v[:, :C], q[:, :C], lr[:, :C], momentum[:, :1], decay[:, :1],
                                  chunk_size=C, return_state=True, max_grad_norm=c)
    g0 = jax.vmap(jax.vmap(jax.grad(lambda w, kk, vv, th: jnp.sum(th * reference.token_losses(w, kk, vv)))))(
        jax.tree.map(lambda p: jnp.broadcast_to(p, (B, *p.shape)), params), *(jnp.moveaxis(x[:, :C], 1, 2)
                                                                           for x in (k, v, lr)))
    for name in ("w1", "w2"):
        norm = np.linalg.norm(np.asarray(g0[name]), axis=(-2, -1))
        assert norm.min() > c  # every chunk gradient is clamped here
        want = -np.asarray(g0[name]) * (c * np.tanh(norm / c) / norm)[..., None, None]
        assert_close(f"S_0 {name}", state.s[name], want, rtol=1e-5)
        assert np.linalg.norm(np.asarray(state.s[name]), axis=(-2, -1)).max() <= c * (1 + 1e-6)  # tanh <= 1
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        neural_memory_scan(params, k, v, q, lr, momentum, decay, chunk_size=C, max_grad_norm=0.0)


@pytest.mark.parametrize("chunk_size, batch_size", [pytest.param(4, 8, marks=SLOW), (5, None)])
def test_split_calls_with_carried_state_equal_one_pass(chunk_size, batch_size):
    params, k, v, q, lr, momentum, decay = inputs(2)
    C = chunk_size
    y_one, s_one = neural_memory_scan(params, k, v, q, lr, momentum[:, : T // C], decay[:, : T // C],
                                      chunk_size=C, batch_size=batch_size, return_state=True)
    ys, state, done = [], None, 0
    for a, b in [(0, 6), (6, 7), (7, 14), (14, 19)]:  # boundaries inside chunks and inside mini-batches
        pos = 0 if state is None else state.pos
        n0, n1 = pos // C, (pos % C + (b - a)) // C + pos // C
        y, state = neural_memory_scan(params, k[:, a:b], v[:, a:b], q[:, a:b], lr[:, a:b], momentum[:, n0:n1],
                                      decay[:, n0:n1], chunk_size=C, batch_size=batch_size, initial_state=state,
                                      return_state=True)
        ys.append(y)
        done = n1
    assert done == T // C and state.pos == T
    assert_close("y", jnp.concatenate(ys, 1), y_one, rtol=1e-5)
    for name in ("w", "s", "wref", "grad"):
        for a, b in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(s_one, name))):
            assert_close(name, a, b, rtol=1e-5)
    if T % C:  # the last T % C tokens stay open: their gradient sum is part of the state
        assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(state.grad))


@pytest.mark.parametrize("chunk_size, batch_size", [(4, 8)])
def test_token_by_token_decoding_equals_the_parallel_pass(chunk_size, batch_size):
    params, k, v, q, lr, momentum, decay = inputs(3)
    C = chunk_size
    y_par, s_par = neural_memory_scan(params, k, v, q, lr, momentum[:, : T // C], decay[:, : T // C], chunk_size=C,
                                      batch_size=batch_size, return_state=True)
    idx = jnp.minimum(jnp.arange(T) // C, T // C - 1)  # each token carries its chunk's gates

    @jax.jit
    def decode(state):
        def step(state, xs):
            return neural_memory_step(state, *xs, chunk_size=C, batch_size=batch_size)

        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (k, v, q, lr, momentum[:, idx], decay[:, idx]))
        return jax.lax.scan(step, state, xs)

    init = neural_memory_init_state(params, B)
    state, ys = decode(init._replace(pos=jnp.int32(0)))
    assert_close("y", jnp.moveaxis(ys, 0, 1), y_par, rtol=1e-5)
    assert int(state.pos) == T
    for a, b in zip(jax.tree.leaves(state.w), jax.tree.leaves(s_par.w)):
        assert_close("w", a, b, rtol=1e-5)


def test_one_step_by_hand():
    # C = 1, one token: W1 = (1 - a) W0 - theta grad l(W0), y = M_W1(q); grad by hand for the 2-layer GELU MLP.
    params, k, v, q, lr, momentum, decay = inputs(4, T=1)
    y = neural_memory_scan(params, k, v, q, lr, momentum, decay, implementation="xla")
    w1, w2 = (np.asarray(params[n], np.float64) for n in ("w1", "w2"))
    kk, vv, qq = (np.asarray(x, np.float64)[:, 0] for x in (k, v, q))  # [B, H, D]
    th, a = np.asarray(lr, np.float64)[:, 0], np.asarray(decay, np.float64)[:, 0]
    from scipy.special import erf  # exact GELU and its derivative

    gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))  # noqa: E731
    dgelu = lambda x: 0.5 * (1 + erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)  # noqa: E731
    h = np.einsum("bhd,hdf->bhf", kk, w1)
    err = np.einsum("bhf,hfd->bhd", gelu(h), w2) - vv
    d_out = 2 * err / D
    g2 = np.einsum("bhf,bhd->bhfd", gelu(h), d_out)
    g1 = np.einsum("bhd,bhf->bhdf", kk, np.einsum("bhd,hfd->bhf", d_out, w2) * dgelu(h))
    keep = (1 - a)[..., None, None]
    n1 = keep * w1[None] - th[..., None, None] * g1
    n2 = keep * w2[None] - th[..., None, None] * g2
    want = np.einsum("bhf,bhfd->bhd", gelu(np.einsum("bhd,bhdf->bhf", qq, n1)), n2)
    assert_close("y", np.asarray(y)[:, 0], want, rtol=1e-5)


def test_retrieval_sees_exactly_the_chunks_that_ended():
    # y_t = M_{W[floor((t+1)/C)]}(q_t): changing the value of a token of chunk n changes y only from n's last token.
    C = 4
    params, k, v, q, lr, momentum, decay = inputs(5, T=12, gates_for=3)
    y0 = neural_memory_scan(params, k, v, q, lr, momentum, decay, chunk_size=C)
    y1 = neural_memory_scan(params, k, v.at[:, 5].add(1.0), q, lr, momentum, decay, chunk_size=C)
    changed = np.asarray(jnp.max(jnp.abs(y1 - y0), axis=(0, 2, 3))) > 1e-6
    np.testing.assert_array_equal(changed, np.arange(12) >= 7)  # token 5 is in chunk 1 = tokens 4..7


def test_retrieve_reads_the_state_without_updating_it():
    # From the state after the first 8 tokens, retrieval equals what the scan answers when nothing more is learned
    # (no learning rate, momentum or decay: chunk 2 leaves W as it is), and differs from the initial weights'.
    params, k, v, q, lr, momentum, decay = inputs(7, T=12, gates_for=3)
    y, state = neural_memory_scan(params, k[:, :8], v[:, :8], q[:, :8], lr[:, :8], momentum[:, :2], decay[:, :2],
                                  chunk_size=4, return_state=True)
    got = neural_memory_retrieve(state.w, q[:, 8:])
    y_next = neural_memory_scan(params, k[:, 8:], v[:, 8:], q[:, 8:], 0.0 * lr[:, 8:], 0.0 * momentum[:, 2:],
                                0.0 * decay[:, 2:], chunk_size=4, initial_state=state)
    assert_close("retrieve", got, y_next, rtol=1e-5)
    fresh = neural_memory_retrieve(neural_memory_init_state(params, B).w, q[:, 8:])
    assert float(jnp.max(jnp.abs(fresh - got))) > 1e-3


@pytest.mark.parametrize("depth, residual", [(2, False), pytest.param(3, True, marks=SLOW)])
def test_fixed_gradient_point_over_scanned_blocks_and_a_remainder(depth, residual):
    """batch_size None (Wref a scan constant): blocks of two chunks, so four scanned blocks, a shorter remainder of one
    chunk and an open chunk; values and gradients equal the oracle's."""
    params, k, v, q, lr, momentum, decay = inputs(8, depth=depth, gates_for=T // 2)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, H, D)), jnp.float32)

    def loss(f):
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * cot), argnums=tuple(range(7)))(
            params, k, v, q, lr, momentum, decay)

    def blocked(*a):
        return xla.neural_memory_chunked(*a, chunk_size=2, residual=residual, block_chunks=2)[0]

    def oracle(*a):
        return neural_memory_scan(*a, chunk_size=2, residual=residual, implementation="reference")

    (l_xla, g_xla), (l_ref, g_ref) = loss(jax.jit(blocked)), loss(oracle)
    assert_close("loss", l_xla, l_ref, rtol=1e-5)
    for name, a, b in zip(("params", "keys", "values", "queries", "lr", "momentum", "decay"), g_xla, g_ref):
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert_close(f"d{name}", leaf_a, leaf_b, rtol=1e-5)


@pytest.mark.parametrize("depth, residual", [(1, False), (3, True)])
def test_other_memory_depths(depth, residual):
    params, k, v, q, lr, momentum, decay = inputs(6, T=13, depth=depth, gates_for=3)
    kw = dict(chunk_size=4, batch_size=8, residual=residual)
    y_ref = neural_memory_scan(params, k, v, q, lr, momentum, decay, implementation="reference", **kw)
    y_xla = neural_memory_scan(params, k, v, q, lr, momentum, decay, implementation="xla", **kw)
    assert_close("y", y_xla, y_ref, rtol=1e-5)


def test_bad_inputs_name_what_is_wrong():
    params, k, v, q, lr, momentum, decay = inputs(7, T=8, gates_for=2)
    with pytest.raises(ValueError, match="batch_size \\(6\\) must be a positive multiple of chunk_size \\(4\\)"):
        neural_memory_scan(params, k, v, q, lr, momentum, decay, chunk_size=4, batch_size=6)
    with pytest.raises(ValueError, match="momentum must be \\[B, N, H\\] with N = 2"):
        neural_memory_scan(params, k, v, q, lr, momentum[:, :1], decay[:, :1], chunk_size=4)
    with pytest.raises(ValueError, match="named w1..w2"):
        neural_memory_scan({"a": params["w1"], "b": params["w2"]}, k, v, q, lr, momentum, decay, chunk_size=4)
    assert reference.init_state(params, 2).pos == 0

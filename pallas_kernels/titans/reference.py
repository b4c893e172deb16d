"""Titans neural memory: the memory model, its per-token loss, the decode state, and the sequential oracle.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663, §3.1-3.2. Chunk and
batch semantics as lucidrains/titans-pytorch@`titans_pytorch/neural_memory.py` (README.md).

One memory per batch element and head: an MLP M_W(x) = gelu(x @ w1) @ w2 (exact erf GELU, no biases; `params` with
more matrices w1..wL is a deeper MLP, GELU between layers; `residual=True` adds x). The memory learns at test time:

    l_t(W) = mean_features (M_W(k_t) - v_t)^2
    chunk n (tokens nC .. nC+C-1, full chunks only):  g_n = sum_t theta_t grad l_t(W) at W = Wref
    S_n = eta_n S_{n-1} - g_n        W[n+1] = (1 - alpha_n) W[n] + S_n        (W[0] = params, S_{-1} = 0)
    Wref = W every `batch_size` tokens (None: never, so every gradient is taken at params)
    y_t = M_{W[floor((t+1)/C)]}(q_t)

Option `max_grad_norm` c (not in the paper; a choice, see this directory's README.md): g_n of each weight matrix is
replaced by g_n c tanh(|g_n| / c) / |g_n| before it enters S. The plain update is unstable once W is large (the
MLP's curvature grows with its weights, so a fixed theta overshoots more, which grows W further): a trained MAC's
memory reached |W| ~ 1e19 inside one 256-token sequence, its output overflowed and the outer gradient became NaN.
Clamped, each chunk moves S by at most c, so |S| <= c / (1 - eta) and W stays bounded. titans-pytorch's
`max_grad_norm` clamps the same chunk gradient with another function of its norm n, (c/2) tanh(2n/c) + c/2, which
raises every nonzero gradient's norm to at least c/2 where c tanh(n/c) leaves a small one nearly unchanged (README.md).

`memory_step` is that definition for one token, and the oracle `neural_memory_reference` is `memory_step` under
lax.scan. Because Wref is constant inside a chunk (batch_size is a multiple of C), the decode state accumulates the
open chunk's gradient sum instead of buffering its tokens: the state is (W, S, Wref, open-chunk gradient, position)
and has a constant size.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Params = dict[str, Float[Array, "..."]]  # {"w1": [..., D, F], "w2": [..., F, D]} (leading dims: heads, or batch, heads)


class MemoryState(NamedTuple):
    """Decode state of the neural memory, per batch element and head (weights as [B, H, I, O] per matrix)."""

    w: Params  # W[n]: the weights after the n full chunks seen so far
    s: Params  # S_{n-1}: the momentum ("surprise")
    wref: Params  # where gradients are taken
    grad: Params  # sum of theta_t grad l_t(Wref) over the open (incomplete) chunk's tokens
    pos: int | jax.Array  # tokens seen; a Python int lets `neural_memory_scan` resume at a static offset


def layer_names(params: Params) -> list[str]:
    """["w1", "w2", ...] in layer order; checks that the keys are exactly w1..wL."""
    names = [f"w{i + 1}" for i in range(len(params))]
    if sorted(params) != sorted(names):
        raise ValueError(f"neural memory params must be named w1..w{len(params)}, got {sorted(params)}")
    return names


def memory_apply(params: Params, x: Float[Array, "*N S D"], residual: bool = False, *,
                 gelu=functools.partial(jax.nn.gelu, approximate=False)) -> Float[Array, "*N S D"]:
    """M_W(x) for weights [..., I, O] and inputs [..., S, I] sharing the leading dims: x @ w1 -> gelu -> @ w2 ...
    `gelu`: the exact GELU (xla.py passes the same function with a cheaper hand-written derivative)."""
    names = layer_names(params)
    h = x
    for i, name in enumerate(names):
        h = jnp.einsum("...si,...io->...so", h, params[name])
        if i + 1 < len(names):
            h = gelu(h)
    return h + x if residual else h


def token_losses(params: Params, k: Float[Array, "*N S D"], v: Float[Array, "*N S D"],
                 residual: bool = False) -> Float[Array, "*N S"]:
    """l_t(W) = mean over features of (M_W(k_t) - v_t)^2 (titans-pytorch's reduction; the paper sums)."""
    return jnp.mean(jnp.square(memory_apply(params, k, residual) - v), axis=-1)


def clamp_norm(g: Params, max_norm: float | None) -> Params:
    """Soft clamp of each weight matrix's chunk gradient [..., I, O]: g * c tanh(|g| / c) / |g| (Frobenius |g|, c =
    max_norm), ~g while |g| << c and never above c; None: g unchanged. A zero gradient stays zero, with finite
    gradients (the norm is taken of a safe value there)."""
    if max_norm is None:
        return g

    def one(x):
        sq = jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)
        n = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
        return x * jnp.where(sq > 0, max_norm * jnp.tanh(n / max_norm) / n, 1.0)

    return jax.tree.map(one, g)


def init_state(params: Params, batch_size: int) -> MemoryState:
    """The state before any token: W = Wref = params for every batch element, S = 0, no open chunk."""
    w = jax.tree.map(lambda p: jnp.broadcast_to(p.astype(jnp.float32), (batch_size, *p.shape)), params)
    zeros = jax.tree.map(jnp.zeros_like, w)
    return MemoryState(w=w, s=zeros, wref=w, grad=zeros, pos=0)


def memory_step(
    state: MemoryState,
    k_t: Float[Array, "B H D"],
    v_t: Float[Array, "B H D"],
    q_t: Float[Array, "B H D"],
    lr_t: Float[Array, "B H"],
    momentum_t: Float[Array, "B H"],
    decay_t: Float[Array, "B H"],
    *,
    chunk_size: int = 1,
    batch_size: int | None = None,
    residual: bool = False,
    max_grad_norm: float | None = None,
) -> tuple[MemoryState, Float[Array, "B H D"]]:
    """Store one token, then retrieve. momentum_t / decay_t are the gates of the chunk this token belongs to; they
    act only when the token completes it. `state.pos` may be traced (decoding under lax.scan)."""

    def one_loss(w, k, v):
        return token_losses(w, k[None], v[None], residual)[0]

    grad_fn = jax.vmap(jax.vmap(jax.grad(one_loss)))  # over B, H: the weights are per batch element and head
    g = grad_fn(state.wref, k_t.astype(jnp.float32), v_t.astype(jnp.float32))
    lr = lr_t.astype(jnp.float32)[..., None, None]
    grad = jax.tree.map(lambda acc, gi: acc + lr * gi, state.grad, g)
    pos = state.pos + 1
    complete = pos % chunk_size == 0
    eta = momentum_t.astype(jnp.float32)[..., None, None]
    keep = 1.0 - decay_t.astype(jnp.float32)[..., None, None]
    s_new = jax.tree.map(lambda s, gi: eta * s - gi, state.s, clamp_norm(grad, max_grad_norm))
    w_new = jax.tree.map(lambda w, s: keep * w + s, state.w, s_new)
    s = jax.tree.map(lambda a, b: jnp.where(complete, a, b), s_new, state.s)
    w = jax.tree.map(lambda a, b: jnp.where(complete, a, b), w_new, state.w)
    grad = jax.tree.map(lambda gi: jnp.where(complete, jnp.zeros_like(gi), gi), grad)
    refresh = complete & (pos % batch_size == 0) if batch_size else False
    wref = jax.tree.map(lambda a, b: jnp.where(refresh, a, b), w, state.wref)
    y = memory_apply(w, q_t.astype(jnp.float32)[..., None, :], residual)[..., 0, :]
    return MemoryState(w, s, wref, grad, pos), y.astype(q_t.dtype)


def chunk_index(pos0: int | jax.Array, T: int, chunk_size: int) -> jax.Array:
    """For each of T tokens after `pos0`: the index, among the chunks completing in this call, of its chunk."""
    return (pos0 % chunk_size + jnp.arange(T)) // chunk_size


def neural_memory_reference(
    params: Params,
    keys: Float[Array, "B T H D"],
    values: Float[Array, "B T H D"],
    queries: Float[Array, "B T H D"],
    lr: Float[Array, "B T H"],
    momentum: Float[Array, "B N H"],
    decay: Float[Array, "B N H"],
    *,
    chunk_size: int = 1,
    batch_size: int | None = None,
    residual: bool = False,
    initial_state: MemoryState | None = None,
    max_grad_norm: float | None = None,
) -> tuple[Float[Array, "B T H D"], MemoryState]:
    """The oracle: `memory_step` token by token. N = chunks completing in this call ((pos0 % C + T) // C)."""
    state = init_state(params, keys.shape[0]) if initial_state is None else initial_state
    T = keys.shape[1]
    idx = jnp.minimum(chunk_index(state.pos, T, chunk_size), max(momentum.shape[1] - 1, 0))
    if momentum.shape[1] == 0:  # no chunk completes: the gates are never read
        momentum = decay = jnp.zeros((keys.shape[0], 1, keys.shape[2]), jnp.float32)
    gates = (momentum[:, idx], decay[:, idx])  # [B, T, H]: each token carries its chunk's gates

    def step(state, xs):
        return memory_step(state, *xs, chunk_size=chunk_size, batch_size=batch_size, residual=residual,
                           max_grad_norm=max_grad_norm)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (keys, values, queries, lr, *gates))
    state, ys = jax.lax.scan(step, state._replace(pos=jnp.asarray(state.pos, jnp.int32)), xs)
    return jnp.moveaxis(ys, 0, 1), state

"""The parallel (chunked) form of the neural memory scan, Titans §3.2: what trains.

Tokens are processed in blocks of whole chunks inside which the gradient point Wref is constant (a block is
`batch_size` tokens when it is set; otherwise `block_chunks` chunks, Wref being params throughout). Per block:

1. Chunk gradients at Wref, all at once: g_j = sum_{t in chunk j} theta_t grad l_t(Wref), by explicit
   backpropagation through the memory MLP (`_chunk_grads`): the forward and the errors run over the block's tokens
   against the one Wref, and only the weight gradients are summed per chunk, as einsums over the chunk's tokens (the
   paper's vmap(grad) followed by the sum, without a [tokens, D, F] intermediate).
2. Momentum and decay by a sequential `lax.scan` over the block's chunks (`_recurrence`): S_j = eta_j S_{j-1} - g_j,
   then W_{j+1} = (1 - alpha_j) W_j + S_j, from the carried S and W. No cumulative products are divided (they
   underflow). Not an associative scan: its backward aborts XLA's TPU compiler (README.md).
3. Retrieval y_t = M_{W[floor((t+1)/C)]}(q_t): the block's queries shifted right by one token and cut into groups of
   C, so group m (tokens mC-1 .. mC+C-2) is answered by the block's m-th weights [W_0 .. W_nc].

A `lax.scan` runs over the blocks with (W, S) as carry (Wref too where it refreshes, a scan constant where it does
not), and each block is rematerialised in the backward pass (`jax.checkpoint`): the per-chunk weight copies
[B, H, nc, D, F] exist for one block at a time, never for the whole sequence. A state that starts inside a chunk
(`MemoryState.pos`, a Python int here) is first completed token by token with the oracle's scan; the open chunk after
the last full one is stored as its gradient sum.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from effarch.pallas_kernels.titans.reference import (
    MemoryState,
    Params,
    clamp_norm,
    init_state,
    layer_names,
    memory_apply,
    neural_memory_reference,
)
from effarch.pallas_kernels.titans.reference import token_losses as _token_losses


def _recurrence(w, s, g, eta, alpha):
    """Momentum and decay over a block's chunks, one chunk per step of a `lax.scan` (leading axis j):
    S_j = eta_j S_{j-1} - g_j, W_{j+1} = (1 - alpha_j) W_j + S_j. Returns W_0 .. W_{nc-1} (the weights each chunk
    starts from, stacked on a leading axis) and the carry (W_nc, S_{nc-1}).

    Sequential, not `jax.lax.associative_scan`: the backward of the associative form's stride-2 slices, recomputed
    inside the checkpointed block, aborts XLA's TPU compiler (libtpu 0.0.52, "Cannot find a valid window for
    %slice_add_fusion"; README.md), and a block holds few chunks (batch_size / chunk_size, 4 in the shipped configs).
    """

    def step(carry, xs):
        w, s = carry
        e, a, gj = xs  # e, a [B, H]; gj per matrix [B, H, I, O]
        s = jax.tree.map(lambda si, gi: e[..., None, None] * si - gi, s, gj)
        w_next = jax.tree.map(lambda wi, si: (1.0 - a[..., None, None]) * wi + si, w, s)
        return (w_next, s), w

    (w, s), w_starts = jax.lax.scan(step, (w, s), (eta, alpha, g))
    return w_starts, w, s


# The exact (erf) GELU and its derivative with hand-written JVPs, so that each derivative costs one erf and one exp
# per element. Autodiff of the formulas instead differentiates erf's polynomial and the exponentials piece by piece:
# the pullback of the chunk gradients' GELU derivative (gelu'' below) was the costliest elementwise pass of the
# Titans fwd+bwd on CPU. Same functions: values to rounding (tests/pallas_kernels/titans: xla == the oracle).
_SQRT_HALF, _INV_SQRT_2PI = 0.7071067811865476, 0.3989422804014327


def _cdf_pdf(z):
    return 0.5 * (1.0 + jax.lax.erf(z * _SQRT_HALF)), _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


@jax.custom_jvp
def _gelu(z):
    """gelu(z) = z Phi(z), the exact GELU (jax.nn.gelu(approximate=False))."""
    return z * _cdf_pdf(z)[0]


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    cdf, pdf = _cdf_pdf(z)
    return z * cdf, (cdf + z * pdf) * dz


@jax.custom_jvp
def _gelu_grad(z):
    """d gelu(z) / dz = Phi(z) + z phi(z)."""
    cdf, pdf = _cdf_pdf(z)
    return cdf + z * pdf


@_gelu_grad.defjvp
def _gelu_grad_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    cdf, pdf = _cdf_pdf(z)
    return cdf + z * pdf, pdf * (2.0 - z * z) * dz  # gelu''(z) = phi(z) (2 - z^2)


def _apply(params: Params, x, residual: bool):
    """M_W(x) (reference.py's `memory_apply`) with the GELU above."""
    return memory_apply(params, x, residual, gelu=_gelu)


def _chunk_grads(wref: Params, k, v, lr, C: int, residual: bool) -> Params:
    """g_j = sum_{t in chunk j} theta_t grad l_t(Wref) for every chunk of a block, by explicit backpropagation.

    k, v [B, H, L, D], lr [B, H, L]; returns [nc, B, H, I, O] per matrix. The memory's forward and the errors'
    backward run over all L tokens at once against the one Wref of the block (one [L, I] x [I, O] product per layer
    and head); only the weight gradients are summed per chunk. `jax.grad` of the chunks' summed losses with Wref
    broadcast to one copy per chunk (the same numbers) turns every product into nc small ones against nc copies,
    forward and, in the outer backward, again (README.md, "The parallel form").
    """
    names = layer_names(wref)
    B, H, L, D = k.shape
    nc = L // C
    ins, pre = [], []  # each layer's input and pre-activation, [B, H, L, *]
    h = k
    for i, name in enumerate(names):
        ins.append(h)
        z = jnp.einsum("bhti,bhio->bhto", h, wref[name])
        pre.append(z)
        h = _gelu(z) if i + 1 < len(names) else z
    pred = h + k if residual else h
    # d/d pred of sum_t theta_t mean_features (pred_t - v_t)^2 (token_losses)
    delta = (2.0 / D) * lr[..., None] * (pred - v)
    grads = {}
    for i in reversed(range(len(names))):
        x = ins[i]
        grads[names[i]] = jnp.einsum("bhnci,bhnco->nbhio", x.reshape(B, H, nc, C, x.shape[-1]),
                                     delta.reshape(B, H, nc, C, delta.shape[-1]))
        if i:
            delta = jnp.einsum("bhto,bhio->bhti", delta, wref[names[i]]) * _gelu_grad(pre[i - 1])
    return grads


def _block(carry, xs, *, chunk_size: int, refresh: bool, residual: bool, max_grad_norm: float | None):
    """One block of nc whole chunks: (W, S, Wref) -> new carry and the block's outputs [B, H, nc*C, D]."""
    w, s, wref = carry
    k, v, q, lr, eta, alpha = xs  # k, v, q [B, H, L, D]; lr [B, H, L]; eta, alpha [B, H, nc]
    B, H, L, D = k.shape
    C = chunk_size
    nc = L // C

    def chunks(x):  # [B, H, L, ...] -> [nc, B, H, C, ...]: the chunk axis leads (scanned, then batched over)
        return jnp.moveaxis(x.reshape(B, H, nc, C, *x.shape[3:]), 2, 0)

    g = clamp_norm(_chunk_grads(wref, k, v, lr, C, residual), max_grad_norm)  # [nc, B, H, I, O] per matrix
    w_starts, w_end, s_end = _recurrence(w, s, g, jnp.moveaxis(eta, 2, 0), jnp.moveaxis(alpha, 2, 0))
    # Group m of the queries shifted right by one holds tokens mC-1 .. mC+C-2, all answered by W_m: groups
    # 0 .. nc-1 by the weights each chunk starts from; the block's last token alone by W_nc (one row, not a padded
    # group of C: with one chunk per block that group would double the retrieval's work).
    q_shift = chunks(jnp.pad(q[:, :, : L - 1], ((0, 0), (0, 0), (1, 0), (0, 0))))
    y = _apply(w_starts, q_shift, residual)  # [nc, B, H, C, D]
    y = jnp.moveaxis(y, 0, 2).reshape(B, H, L, D)[:, :, 1:]
    y = jnp.concatenate([y, _apply(w_end, q[:, :, L - 1 :], residual)], axis=2)
    return (w_end, s_end, w_end if refresh else wref), y


def _run_blocks(carry, k, v, q, lr, eta, alpha, *, block_tokens: int, chunk_size: int, refresh: bool, residual: bool,
                max_grad_norm: float | None):
    """Whole blocks of `block_tokens` under lax.scan (rematerialised), then one shorter block for the remainder."""
    B, H, L, D = k.shape
    n_blocks, rem = divmod(L, block_tokens)
    nc = block_tokens // chunk_size
    block = jax.checkpoint(functools.partial(_block, chunk_size=chunk_size, refresh=refresh, residual=residual,
                                             max_grad_norm=max_grad_norm))
    if refresh:
        body = block
    else:
        # Wref stays fixed over these blocks: a scan constant, not a carry, so the scan does not save a copy of it
        # per block for the backward pass (with batch_size None that was 1/3 of the saved weights, zero-filled and
        # copied every call).
        wref = carry[2]

        def body(wsc, xs):
            (w, s, _), y = block((*wsc, wref), xs)
            return (w, s), y

        carry = carry[:2]
    ys = []
    if n_blocks:
        def split(x, per):
            head = x[:, :, : n_blocks * per]
            return jnp.moveaxis(head.reshape(B, H, n_blocks, per, *x.shape[3:]), 2, 0)

        xs = tuple(split(x, block_tokens) for x in (k, v, q, lr)) + tuple(split(x, nc) for x in (eta, alpha))
        carry, y = jax.lax.scan(body, carry, xs)  # y [n_blocks, B, H, block_tokens, D]
        ys.append(jnp.moveaxis(y, 0, 2).reshape(B, H, n_blocks * block_tokens, D))
    if rem:
        start, c0 = n_blocks * block_tokens, n_blocks * nc
        carry, y = body(carry, (k[:, :, start:], v[:, :, start:], q[:, :, start:], lr[:, :, start:],
                                eta[:, :, c0:], alpha[:, :, c0:]))
        ys.append(y)
    return (carry if refresh else (*carry, wref)), ys


def neural_memory_chunked(
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
    block_chunks: int | None = None,
    max_grad_norm: float | None = None,
) -> tuple[Float[Array, "B T H D"], MemoryState]:
    """The parallel form; same arguments and results as `neural_memory_reference`.

    `block_chunks`: chunks per scan step when batch_size is None (default: 64 tokens' worth, at least one chunk);
    with batch_size set a block is always batch_size tokens.
    """
    C = chunk_size
    B, T, H, D = keys.shape
    state = init_state(params, B) if initial_state is None else initial_state
    try:
        pos = int(state.pos)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError("neural_memory_scan: the parallel path needs the state's position as a concrete integer; "
                         "decode with neural_memory_step, or use implementation='reference'") from None
    out_dtype = queries.dtype
    f32 = jnp.float32
    k, v, q = (jnp.moveaxis(x.astype(f32), 1, 2) for x in (keys, values, queries))  # [B, H, T, D]
    th = jnp.moveaxis(lr.astype(f32), 1, 2)  # [B, H, T]
    eta, alpha = (jnp.moveaxis(x.astype(f32), 1, 2) for x in (momentum, decay))  # [B, H, N]
    n_expected = (pos % C + T) // C
    if eta.shape[2] != n_expected:
        raise ValueError(f"neural_memory_scan: momentum/decay need one entry per chunk completing in this call "
                         f"((pos % C + T) // C = {n_expected}), got {eta.shape[2]}")
    ys = []

    # 1. Finish an open chunk (the state came from a call that ended inside one) with the oracle's token scan.
    head = min((C - pos % C) % C, T)
    c0 = 1 if head and (pos + head) % C == 0 else 0  # gates used by that chunk, if it completes here
    if head:
        y_head, state = neural_memory_reference(
            params, keys[:, :head], values[:, :head], queries[:, :head], lr[:, :head], momentum[:, :c0],
            decay[:, :c0], chunk_size=C, batch_size=batch_size, residual=residual, initial_state=state,
            max_grad_norm=max_grad_norm)
        ys.append(jnp.moveaxis(y_head.astype(f32), 1, 2))
        pos += head
        state = state._replace(pos=pos)

    # 2. Whole chunks in spans of constant Wref: up to the next refresh, whole mini-batches (each refreshing at its
    #    end), and a shorter last span that does not reach a refresh.
    L = (T - head) // C * C
    seg = (k[:, :, head:head + L], v[:, :, head:head + L], q[:, :, head:head + L], th[:, :, head:head + L],
           eta[:, :, c0:], alpha[:, :, c0:])
    if batch_size:
        to_refresh = (batch_size - pos % batch_size) % batch_size
        first = min(to_refresh, L)
        whole = first + (L - first) // batch_size * batch_size
        plan = [(0, first, first, first == to_refresh), (first, whole, batch_size, True), (whole, L, L - whole, False)]
    else:
        plan = [(0, L, C * (block_chunks or max(1, 64 // C)), False)]
    carry = (state.w, state.s, state.wref)
    for a, b, block, refresh in plan:
        if b > a:
            carry, y = _run_blocks(carry, *(x[:, :, a:b] for x in seg[:4]), *(x[:, :, a // C:b // C] for x in seg[4:]),
                                   block_tokens=block, chunk_size=C, refresh=refresh, residual=residual,
                                   max_grad_norm=max_grad_norm)
            ys += y
    pos += L
    w, s, wref = carry

    # 3. The open chunk after the last full one: its gradient sum at Wref is stored; its queries see W.
    tail = T - head - L
    grad = state.grad  # zero unless the call ended inside the chunk it started in
    if tail:
        a = T - tail

        def tail_loss(wr):
            return jnp.sum(th[:, :, a:] * _token_losses(wr, k[:, :, a:], v[:, :, a:], residual))

        g = jax.grad(tail_loss)(wref)
        grad = jax.tree.map(jnp.add, grad, g)
        ys.append(_apply(w, q[:, :, a:], residual))
        pos += tail
    y = jnp.concatenate(ys, axis=2) if len(ys) > 1 else ys[0]
    return jnp.moveaxis(y, 1, 2).astype(out_dtype), MemoryState(w, s, wref, grad, pos)

"""BASED Taylor linear attention, chunked form in plain XLA (derivation in README.md).

Paper: arXiv 2402.18668. Reference: fla-org/flash-linear-attention@bc3b101, fla/ops/based/naive.py
(`naive_chunk_based`), which splits the kernel into its 0th/1st/2nd-order terms; here the inter-chunk term goes
through the explicit (symmetric) feature map phi instead, so the carried state is exactly the decoding state of
reference.py.

A `lax.scan` runs over chunks of C tokens. Inside a chunk the weights 1 + s + s^2/2 are formed for the [C, C]
causal block; earlier chunks enter through the running state S = sum phi(k) [v, 1]^T, whose last column is the
denominator's sum phi(k). Nothing of size [T, T] is built: memory is O(T (H F + H V) + (T / C) H P V) and time
O(T (C + P) H V). The backward (`jax.custom_vjp`) is a second scan, in reverse, that recomputes each chunk's
feature maps and [C, C] block from q, k, v and reads the state before the chunk from the forward's residuals
(README.md, "Backward"). Both scans slice their chunks in place along T, so each step's working set is one chunk:
on a CPU this beats batching all chunks at once (fla's `naive_chunk_based` layout), whose T x P feature maps and
(T / C) x P x V states do not stay in cache.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from effarch.pallas_kernels.based.reference import BasedState, based_init_state, taylor_feature_map, taylor_kernel


def based_chunked(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: BasedState | None = None,
) -> tuple[Float[Array, "B T H V"], BasedState]:
    """Causal BASED attention over chunks of `chunk_size` tokens, with a carried state.

    Args:
      q: queries, [B, T, H, F].
      k: keys, [B, T, H, F].
      v: values, [B, T, H, V].
      eps: added to the denominator.
      chunk_size: C; T need not be a multiple (the tail is zero-padded and masked). Capped at T.
      initial_state: state after earlier tokens (reference.BasedState); None means the empty state.

    Returns:
      (o [B, T, H, V] in v's dtype, float32 state after the last token).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, t, h, f = q.shape
    vd = v.shape[-1]
    state = based_init_state(b, h, f, vd) if initial_state is None else initial_state
    s0 = jnp.concatenate([state.kv, state.k[..., None]], axis=-1)  # [B, H, P, V + 1]
    o, s_last = _chunked_attention(q, k, v, s0, eps, min(chunk_size, t))
    return o.astype(v.dtype), BasedState(kv=s_last[..., :vd], k=s_last[..., vd])


def _pad_to_chunks(x: Float[Array, "B T H X"], c: int) -> Float[Array, "B L H X"]:
    """float32, zero-padded along T to a multiple of c (a copy only when c does not divide T or x is not float32)."""
    pad = -x.shape[1] % c
    x = x.astype(jnp.float32)
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def _block(x: Float[Array, "B L H X"], i, c: int) -> Float[Array, "B H C X"]:
    """Chunk i of x, read in place (no chunk-major copy of the whole array), heads first."""
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1).swapaxes(1, 2)


def _put(out: Float[Array, "B L H X"], block: Float[Array, "B H C X"], i, c: int) -> Float[Array, "B L H X"]:
    return jax.lax.dynamic_update_slice_in_dim(out, block.swapaxes(1, 2), i * c, axis=1)


def _with_ones(v_c: Float[Array, "B H C V"], i, c: int, t: int) -> Float[Array, "B H C W"]:
    """[v, 1]: the denominator rides along as a last value column of ones. phi(0) = e_0 is not zero, so that column
    is 0 on padded keys, which keeps them out of the state (inside a chunk the causal mask already hides them)."""
    ones = (i * c + jnp.arange(c) < t).astype(jnp.float32)
    return jnp.concatenate([v_c, jnp.broadcast_to(ones[:, None], (*v_c.shape[:-1], 1))], axis=-1)


def _chunk_weights(q_c, k_c):
    """(scores s = q . k / sqrt(F), causal weights tril(1 + s + s^2/2)) of one [C, C] diagonal block."""
    c, f = q_c.shape[-2:]
    s = jnp.einsum("BHCF,BHSF->BHCS", q_c, k_c) * (1.0 / math.sqrt(f))
    return s, jnp.where(jnp.tril(jnp.ones((c, c), dtype=bool)), taylor_kernel(s), 0.0)


def _forward(q, k, v, s0, eps, c, keep_states):
    """(o float32 [B, T, H, V], state after the last chunk, den [N, B, H, C, 1], states before each chunk or None)."""
    t, vd = q.shape[1], v.shape[-1]
    q, k, v = (_pad_to_chunks(x, c) for x in (q, k, v))

    def chunk(carry, i):
        state, o = carry
        q_c, k_c, v_c = _block(q, i, c), _block(k, i, c), _with_ones(_block(v, i, c), i, c, t)
        _, w = _chunk_weights(q_c, k_c)
        num = jnp.einsum("BHCP,BHPW->BHCW", taylor_feature_map(q_c), state) + jnp.einsum("BHCS,BHSW->BHCW", w, v_c)
        den = num[..., vd:] + eps
        new_state = state + jnp.einsum("BHCP,BHCW->BHPW", taylor_feature_map(k_c), v_c)
        return (new_state, _put(o, num[..., :vd] / den, i, c)), (den, state if keep_states else None)

    (s_last, o), (den, states) = jax.lax.scan(chunk, (s0, jnp.zeros_like(v)), jnp.arange(q.shape[1] // c))
    return o[:, :t], s_last, den, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_attention(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    s0: Float[Array, "B H P W"],
    eps: float,
    c: int,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H P W"]]:
    """(o in float32, state after the last token) from chunks of c tokens; s0 = [kv, k] of the initial state."""
    o, s_last, _, _ = _forward(q, k, v, s0, eps, c, keep_states=False)
    return o, s_last


def _chunked_attention_fwd(q, k, v, s0, eps, c):
    o, s_last, den, states = _forward(q, k, v, s0, eps, c, keep_states=True)
    # The caller's q, k, v and the returned o are saved as they are (no chunked copies): they are alive anyway.
    return (o, s_last), (q, k, v, o, den, states)


def _chunked_attention_bwd(eps, c, residuals, cotangents):
    del eps
    q, k, v, o, den, states = residuals
    d_o, d_s_last = cotangents
    t = q.shape[1]
    q_p, k_p, v_p, o_p, d_o_p = (_pad_to_chunks(x, c) for x in (q, k, v, o, d_o))
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    scale = 1.0 / math.sqrt(q.shape[-1])

    def chunk(carry, xs):
        # d_after: cotangent of the state after this chunk, which is state + phi(k_c)^T v1_c.
        d_after, d_q_all, d_k_all, d_v_all = carry
        i, state, den_c = xs
        q_c, k_c, v_c = _block(q_p, i, c), _block(k_p, i, c), _with_ones(_block(v_p, i, c), i, c, t)
        d_o_c, o_c = _block(d_o_p, i, c), _block(o_p, i, c)
        # o = num_v / den: d num_v = d_o / den, d den = -<d_o, o> / den; the ones column of v1 carries d den.
        g_c = jnp.concatenate([d_o_c, -jnp.sum(d_o_c * o_c, axis=-1, keepdims=True)], axis=-1) / den_c
        phi_q, phi_q_vjp = jax.vjp(taylor_feature_map, q_c)
        phi_k, phi_k_vjp = jax.vjp(taylor_feature_map, k_c)
        s, w = _chunk_weights(q_c, k_c)
        d_phi_q = jnp.einsum("BHCW,BHPW->BHCP", g_c, state)
        d_phi_k = jnp.einsum("BHCW,BHPW->BHCP", v_c, d_after)
        d_v = jnp.einsum("BHCP,BHPW->BHCW", phi_k, d_after) + jnp.einsum("BHCS,BHCW->BHSW", w, g_c)
        d_s = jnp.where(causal, jnp.einsum("BHCW,BHSW->BHCS", g_c, v_c) * (1.0 + s), 0.0) * scale
        d_q = jnp.einsum("BHCS,BHSF->BHCF", d_s, k_c) + phi_q_vjp(d_phi_q)[0]
        d_k = jnp.einsum("BHCS,BHCF->BHSF", d_s, q_c) + phi_k_vjp(d_phi_k)[0]
        d_before = d_after + jnp.einsum("BHCP,BHCW->BHPW", phi_q, g_c)
        outs = (_put(d_q_all, d_q, i, c), _put(d_k_all, d_k, i, c), _put(d_v_all, d_v[..., :-1], i, c))
        return (d_before, *outs), None

    zeros = tuple(jnp.zeros_like(x) for x in (q_p, k_p, v_p))
    xs = (jnp.arange(q_p.shape[1] // c), states, den)
    (d_s0, d_q, d_k, d_v), _ = jax.lax.scan(chunk, (d_s_last, *zeros), xs, reverse=True)
    return d_q[:, :t].astype(q.dtype), d_k[:, :t].astype(k.dtype), d_v[:, :t].astype(v.dtype), d_s0


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)

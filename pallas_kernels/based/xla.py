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
(README.md, "Backward").
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
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    state = based_init_state(b, h, f, vd) if initial_state is None else initial_state

    def to_chunks(x):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n, c, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)  # [N, B, H, C, *]

    # The denominator rides along as a last value column of ones. phi(0) = e_0 is not zero, so that column is 0 on
    # padded keys, which keeps them out of the state (inside a chunk the causal mask already hides them).
    ones = (jnp.arange(n * c) < t).astype(jnp.float32).reshape(n, 1, 1, c, 1)
    v1 = jnp.concatenate([to_chunks(v), jnp.broadcast_to(ones, (n, b, h, c, 1))], axis=-1)
    s0 = jnp.concatenate([state.kv, state.k[..., None]], axis=-1)  # [B, H, P, V + 1]

    o, s_last = _chunk_scan(to_chunks(q), to_chunks(k), v1, s0, eps)
    o = o.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, vd)[:, :t]
    return o.astype(v.dtype), BasedState(kv=s_last[..., :vd], k=s_last[..., vd])


def _chunk_weights(q_c, k_c):
    """(scores s = q . k / sqrt(F), causal weights tril(1 + s + s^2/2)) of one [C, C] diagonal block."""
    c, f = q_c.shape[-2:]
    s = jnp.einsum("BHCF,BHSF->BHCS", q_c, k_c) * (1.0 / math.sqrt(f))
    return s, jnp.where(jnp.tril(jnp.ones((c, c), dtype=bool)), taylor_kernel(s), 0.0)


def _forward(q, k, v1, s0, eps, keep_states):
    vd = v1.shape[-1] - 1

    def chunk(state, xs):
        q_c, k_c, v_c = xs
        _, w = _chunk_weights(q_c, k_c)
        num = jnp.einsum("BHCP,BHPW->BHCW", taylor_feature_map(q_c), state) + jnp.einsum("BHCS,BHSW->BHCW", w, v_c)
        den = num[..., vd:] + eps
        new_state = state + jnp.einsum("BHCP,BHCW->BHPW", taylor_feature_map(k_c), v_c)
        return new_state, (num[..., :vd] / den, den) + ((state,) if keep_states else ())

    s_last, out = jax.lax.scan(chunk, s0, (q, k, v1))
    return s_last, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_scan(
    q: Float[Array, "N B H C F"],
    k: Float[Array, "N B H C F"],
    v1: Float[Array, "N B H C W"],
    s0: Float[Array, "B H P W"],
    eps: float,
) -> tuple[Float[Array, "N B H C V"], Float[Array, "B H P W"]]:
    """(o, state after the last chunk) on the chunk-major layout; v1 = [v, 1] with the ones column 0 on padding."""
    s_last, (o, _) = _forward(q, k, v1, s0, eps, keep_states=False)
    return o, s_last


def _chunk_scan_fwd(q, k, v1, s0, eps):
    s_last, (o, den, states) = _forward(q, k, v1, s0, eps, keep_states=True)
    return (o, s_last), (q, k, v1, states, o, den)


def _chunk_scan_bwd(eps, residuals, cotangents):
    del eps
    q, k, v1, states, o, den = residuals
    d_o, d_s_last = cotangents
    # o = num_v / den: d num_v = d_o / den, d den = -<d_o, o> / den; the ones column of v1 carries d den.
    g = jnp.concatenate([d_o, -jnp.sum(d_o * o, axis=-1, keepdims=True)], axis=-1) / den
    causal = jnp.tril(jnp.ones(q.shape[-2:-1] * 2, dtype=bool))
    scale = 1.0 / math.sqrt(q.shape[-1])

    def chunk(d_after, xs):
        # d_after: gradient w.r.t. the state after this chunk, which is state + phi(k_c)^T v1_c.
        q_c, k_c, v_c, state, g_c = xs
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
        return d_before, (d_q, d_k, d_v)

    d_s0, (d_q, d_k, d_v1) = jax.lax.scan(chunk, d_s_last, (q, k, v1, states, g), reverse=True)
    return d_q, d_k, d_v1, d_s0


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)

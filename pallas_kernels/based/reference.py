"""BASED Taylor linear attention: the readable jnp oracles and the recurrent (decoding) form.

Paper: Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff",
arXiv 2402.18668, §3.1 and App. (Taylor feature map).
Reference: HazyResearch/based@32c1bd4, based/models/mixers/linear_attention.py (`TaylorExp`,
`LinearAttention.parallel_forward` / `recurrent_forward`); fla-org/flash-linear-attention@bc3b101,
fla/ops/based/naive.py (`naive_parallel_based`).

With s = q_t . k_j / sqrt(F) and w_tj = 1 + s + s^2/2 = phi(q_t) . phi(k_j):

    o_t = sum_{j<=t} w_tj v_j / (sum_{j<=t} w_tj + eps)

- `based_quadratic` materialises the [T, T] weights: the oracle for the parallel form.
- `based_recurrent` is the token-by-token scan over the explicit Taylor state: the oracle for decoding, built
  from `based_step`, which is also the production decode step.

Extra axis letter used here: P = 1 + F + F(F+1)/2, the length of the Taylor feature map. Its 2nd-order part keeps
only the products x_i x_j with i <= j (off-diagonal ones weighted by sqrt(2)), the symmetric form of fla's
`TaylorFeatureMap`, instead of based's `TaylorExp` full outer product (1 + F + F^2): the same kernel with 153 instead
of 273 features per head at F = 16 (README.md, "Feature map").
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class BasedState(NamedTuple):
    """Recurrent state of one BASED layer, float32.

    Attributes:
      kv: sum_j phi(k_j) v_j^T, [B, H, P, V] (numerator).
      k: sum_j phi(k_j), [B, H, P] (denominator).
    """

    kv: Float[Array, "B H P V"]
    k: Float[Array, "B H P"]


def feature_dim_expanded(feature_dim: int) -> int:
    """P = 1 + F + F(F+1)/2: length of the Taylor feature map of an F-dim vector (153 at F = 16)."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def taylor_feature_map(x: Float[Array, "*batch F"]) -> Float[Array, "*batch P"]:
    """phi(x) = [1, x / F^(1/4), (c_ij x_i x_j for i <= j, row-major) / (sqrt(2) sqrt(F))], in float32.

    c_ii = 1 and c_ij = sqrt(2) for i < j, so that sum_{i<=j} c_ij^2 q_i q_j k_i k_j = (q . k)^2 and
    phi(q) . phi(k) = 1 + s + s^2/2 with s = q . k / sqrt(F), the 2nd-order Taylor expansion of exp(s).
    """
    x = x.astype(jnp.float32)
    f = x.shape[-1]
    # Row i of the upper triangle is x_i * x[i:]: static slices, whose gradient is pads and adds; a gather of the pairs
    # would have a scatter as its gradient, 4x slower on the CPU.
    rows = [x[..., i : i + 1] * x[..., i:] for i in range(f)]
    weights = np.concatenate([[1.0] + [math.sqrt(2.0)] * (f - 1 - i) for i in range(f)]) / math.sqrt(2.0 * f)
    square = jnp.concatenate(rows, axis=-1) * weights.astype(np.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / f**0.25, square], axis=-1)


def taylor_kernel(s: Float[Array, "*batch"]) -> Float[Array, "*batch"]:
    """1 + s + s^2/2; never below 1/2, so BASED's denominator cannot vanish."""
    return 1.0 + s + 0.5 * s * s


def based_quadratic(
    q: Float[Array, "B T H F"], k: Float[Array, "B T H F"], v: Float[Array, "B T H V"], *, eps: float = 1e-6
) -> Float[Array, "B T H V"]:
    """Causal BASED attention through the [T, T] weight matrix, float32 accumulation.

    Args:
      q: queries, [B, T, H, F] (F the feature dim, 16 in the paper).
      k: keys, [B, T, H, F].
      v: values, [B, T, H, V].
      eps: added to the denominator.

    Returns:
      [B, T, H, V] in v's dtype.
    """
    t = q.shape[1]
    s = jnp.einsum("BTHF,BSHF->BHTS", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    w = jnp.where(causal, taylor_kernel(s), 0.0)
    num = jnp.einsum("BHTS,BSHV->BTHV", w, v.astype(jnp.float32))
    den = jnp.einsum("BHTS->BTH", w)
    return (num / (den[..., None] + eps)).astype(v.dtype)


def based_init_state(batch_size: int, n_heads: int, feature_dim: int, value_dim: int) -> BasedState:
    """The empty state: zero numerator and denominator sums, float32."""
    p = feature_dim_expanded(feature_dim)
    return BasedState(
        kv=jnp.zeros((batch_size, n_heads, p, value_dim), jnp.float32),
        k=jnp.zeros((batch_size, n_heads, p), jnp.float32),
    )


def based_step(
    state: BasedState,
    q_t: Float[Array, "B H F"],
    k_t: Float[Array, "B H F"],
    v_t: Float[Array, "B H V"],
    *,
    eps: float = 1e-6,
) -> tuple[BasedState, Float[Array, "B H V"]]:
    """One decoding step: add token t to the state, then read it with q_t (so o_t includes j = t).

    Returns:
      (state after token t, o_t [B, H, V] in v_t's dtype).
    """
    phi_q = taylor_feature_map(q_t)
    phi_k = taylor_feature_map(k_t)
    kv = state.kv + jnp.einsum("BHP,BHV->BHPV", phi_k, v_t.astype(jnp.float32))
    k_sum = state.k + phi_k
    num = jnp.einsum("BHP,BHPV->BHV", phi_q, kv)
    den = jnp.einsum("BHP,BHP->BH", phi_q, k_sum)
    return BasedState(kv, k_sum), (num / (den[..., None] + eps)).astype(v_t.dtype)


def based_recurrent(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    *,
    eps: float = 1e-6,
    initial_state: BasedState | None = None,
) -> tuple[Float[Array, "B T H V"], BasedState]:
    """Token-by-token `lax.scan` of `based_step`: O(T) time steps, each O(H P V).

    Returns:
      (o [B, T, H, V], state after the last token).
    """
    b, _, h, f = q.shape
    state = based_init_state(b, h, f, v.shape[-1]) if initial_state is None else initial_state

    def step(state, qkv_t):
        return based_step(state, *qkv_t, eps=eps)

    state, o = jax.lax.scan(step, state, (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1)))
    return o.swapaxes(0, 1), state

"""The tiled layout the block-sparse kernels (pallas_tpu.py, pallas_gpu.py) share: padded blocks, program heads, the
visibility predicate on positions, and the online-softmax step.

Padding without changing the lists. A kernel tiles the sequence at exactly the caller's q_block / kv_block (the lists
name those blocks), but a backend wants tiles of its own sizes (Mosaic: a multiple of 16 rows; Triton: a power of
2 ≥ 16). So each block is padded *inside* to the tile size, bq ≥ q_block and bk ≥ kv_block rows, and the padded rows
get position -1: the contract's own padding rule (a negative position is never visible) keeps them out of every
softmax and every gradient, so no separate length mask is needed. The head dims are zero-padded (a zero column adds
nothing to q·k or to p·v; the scale stays that of the real D).

Program heads. When one list serves a whole GQA group (Hs ∈ {1, Hkv}), a program takes the group's G = Hq / Hkv query
heads together as gq = G × bq rows against one K/V block, so a listed K/V block is loaded once for the group; with one
list per query head (Hs = Hq) a program takes gq = 1 head. q is viewed as [B, Hp, gq, T, D] with Hp = Hq / gq, and
program head h reads list group `0 if Hs == 1 else h` and KV head `h // G if gq == 1 else h`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30  # masked logit: finite, so the running max never meets inf - inf; masked probabilities are set to 0


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static shape of one kernel call (hashable: a custom_vjp non-differentiable argument)."""

    q_block: int
    kv_block: int
    bq: int  # tile rows of a query block (q_block padded)
    bk: int  # tile rows of a key block (kv_block padded)
    n_q_blocks: int
    n_kv_blocks: int
    kmax: int  # list length (grid steps per query block)
    n_groups: int  # Hs
    n_q_heads: int  # Hq
    heads_per_program: int  # gq: query heads of one program
    density: float  # listed pairs / list slots (B · Hs · nQb · Kmax): the cost estimates' share of the grid
    kv_group: int  # G = Hq / Hkv
    d: int  # real head dims
    dv: int
    scale: float
    causal: bool
    has_window: bool
    has_segments: bool

    def list_group(self, h):
        """The list group of program head h (a non-negative grid index; lax.div: floor division lowers through a
        sign Mosaic rejects on scalars)."""
        if self.n_groups == 1:
            return 0
        if self.heads_per_program == 1 and self.n_groups != self.n_q_heads and self.kv_group > 1:
            return jax.lax.div(h, self.kv_group)  # one query head per program, one list per KV head
        return h

    def kv_head(self, h):
        return jax.lax.div(h, self.kv_group) if self.heads_per_program == 1 and self.kv_group > 1 else h


def tiling(q_shape, k_shape, v_shape, idx_shape, *, q_block, kv_block, bq, bk, gq, density, scale, causal,
           has_window, has_segments) -> Tiling:
    B, Tq, Hq, D = q_shape
    Tk, Hkv = k_shape[1], k_shape[2]
    n_groups = idx_shape[1]
    G = Hq // Hkv
    return Tiling(q_block=q_block, kv_block=kv_block, bq=bq, bk=bk, n_q_blocks=-(-Tq // q_block),
                  n_kv_blocks=-(-Tk // kv_block), kmax=max(1, idx_shape[3]), n_groups=n_groups, n_q_heads=Hq,
                  heads_per_program=gq, density=density, kv_group=G, d=D, dv=v_shape[3],
                  scale=D**-0.5 if scale is None else float(scale), causal=causal, has_window=has_window,
                  has_segments=has_segments)


def blocked(x: jax.Array, block: int, tile: int, n_blocks: int, fill=0) -> jax.Array:
    """[B, T, ...] -> [B, n_blocks · tile, ...]: T padded to n_blocks · block, each block padded to `tile` rows."""
    B, T = x.shape[:2]
    rest = x.shape[2:]
    pad = [(0, 0)] * x.ndim
    if T != n_blocks * block:
        pad[1] = (0, n_blocks * block - T)
        x = jnp.pad(x, pad, constant_values=fill)
    if tile == block:
        return x
    x = x.reshape(B, n_blocks, block, *rest)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, tile - block)] + [(0, 0)] * len(rest), constant_values=fill)
    return x.reshape(B, n_blocks * tile, *rest)


def unblocked(x: jax.Array, block: int, tile: int, n_blocks: int, length: int) -> jax.Array:
    """The inverse of `blocked`: [B, n_blocks · tile, ...] -> [B, length, ...]."""
    if tile != block:
        B, rest = x.shape[0], x.shape[2:]
        x = x.reshape(B, n_blocks, tile, *rest)[:, :, :block].reshape(B, n_blocks * block, *rest)
    return x[:, :length]


def pad_last(x: jax.Array, width: int) -> jax.Array:
    if x.shape[-1] == width:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def positions(pos, batch: int, length: int) -> jax.Array:
    """int32 [B, length]: `pos` broadcast, or arange when None."""
    if pos is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, length))


def per_group(value, n_groups: int, missing: int) -> jax.Array:
    """window / n_sink as int32 [Hs] (reference.per_group's rule, without its shape message: api.py checked it)."""
    if value is None:
        return jnp.full((n_groups,), missing, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(value, jnp.int32), (n_groups,))


WINDOW_NONE = int(np.iinfo(np.int32).max)


def visible(t: Tiling, qp, kp, qs, ks, window, sink):
    """The contract's token predicate (README.md) on positions qp [R, 1], kp [1, bk] and segments qs, ks; list
    membership is the kernel's loop. Padding (negative positions) is never visible."""
    vis = (qp >= 0) & (kp >= 0)
    if t.causal:
        vis &= kp <= qp
    if t.has_window:
        vis &= (qp - kp < window) | (kp < sink)
    if t.has_segments:
        vis &= qs == ks
    return vis


def softmax_step(s, vis, m_prev, l_prev, acc_prev, v, *, p_dtype):
    """One online-softmax update with the logits s [R, bk] of a listed block (float32), rows never NaN: masked
    logits are NEG and their probabilities exactly 0, so a row that has seen nothing keeps l = 0."""
    s = jnp.where(vis, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l_new, alpha * acc_prev + dot_nn(p.astype(p_dtype), v)


def finish(m, row_sum, acc):
    """o = acc / row_sum and lse = m + log row_sum, or 0 and -inf on a row that saw no key."""
    seen = row_sum > 0
    l_safe = jnp.where(seen, row_sum, 1.0)
    return jnp.where(seen, acc / l_safe, 0.0), jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def probabilities(s, vis, lse):
    """p = exp(s - lse) on visible entries, 0 elsewhere (lse = -inf only on rows with nothing visible)."""
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    return jnp.where(vis, jnp.exp(s - lse_safe), 0.0)


def _precision(a):
    """HIGHEST for float32 operands (float32 products on the MXU / tensor cores, not one bf16 pass), DEFAULT for
    bf16 ones; explicit, so `jax_default_matmul_precision` ("highest" with bf16 is a type error in Mosaic) does not
    reach the kernels."""
    return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=_precision(a), preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """a [m, k] · b [n, k]ᵀ in float32."""
    return _dot(a, b, ((1,), (1,)))


def dot_tn(a, b):
    """a [k, m]ᵀ · b [k, n] in float32."""
    return _dot(a, b, ((0,), (0,)))


def dot_nn(a, b):
    """a [m, k] · b [k, n] in float32."""
    return _dot(a, b, ((1,), (0,)))

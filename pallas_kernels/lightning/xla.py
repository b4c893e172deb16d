"""Lightning Attention-2 in plain JAX: block tiling with a running KV state, forward and two-pass backward.

Paper: Lightning Attention-2, arXiv 2401.04658, Alg. 5 (forward with decay) and Alg. 6 (backward).
Reference: OpenNLPLab/lightning-attention@d15c385, lightning_attn/ops/triton/lightning_attn2.py
(`_fwd_kernel`, `_bwd_intra_kernel`, `_bwd_inter_kernel`).

The derivation, the index conventions and the handling of a partial last block are in README.md. In short, for a
block of C tokens starting at position nC, with i, j = 0..C−1 inside the block and S the state after the previous
block (exactly the recurrent state kv_{nC−1}):

    O   = [(Q Kᵀ) ⊙ M] V + (Q S) ⊙ qd            M_ij = λ^{i−j} (i ≥ j), qd_i = λ^{i+1}
    S  ← λ^L S + (K ⊙ kd)ᵀ V                     kd_j = λ^{L−1−j} (j < L), L = valid tokens in the block

Only the inputs are kept for the backward; it recomputes the states block by block, so memory is O(T) plus one
[B, H, K, V] state, never one state per block. Everything accumulates in float32.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effarch.pallas_kernels.lightning.reference import decay_mask


def _to_blocks(x: Float[Array, "B T H X"], block_size: int) -> Float[Array, "N B C H X"]:
    """Zero-pads T up to N·C and splits it into blocks, block-major for lax.scan."""
    batch, t_len, heads, dim = x.shape
    n_blocks = -(-t_len // block_size)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n_blocks * block_size - t_len), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(batch, n_blocks, block_size, heads, dim), 1, 0)


def _from_blocks(x: Float[Array, "N B C H X"], t_len: int) -> Float[Array, "B T H X"]:
    n_blocks, batch, block_size, heads, dim = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(batch, n_blocks * block_size, heads, dim)[:, :t_len]


def _block_lengths(t_len: int, block_size: int) -> Int[Array, " N"]:
    """Valid tokens per block: C everywhere except a shorter last block when C does not divide T."""
    n_blocks = -(-t_len // block_size)
    return jnp.minimum(block_size, t_len - block_size * jnp.arange(n_blocks))


class _BlockDecays:
    """Decay factors of one block, computed as exp(−s·n) with n ≥ 0: no Λ⁻¹, so a large s underflows to 0."""

    def __init__(self, decay: Float[Array, " H"], block_size: int):
        self.rate = decay.astype(jnp.float32)
        self.index = jnp.arange(block_size)
        # [H, C, C] intra-block mask and [C, H] query decays, shared by every block.
        self.mask = decay_mask(self.rate, block_size, block_size)
        self.query = jnp.exp(-(self.index[:, None] + 1) * self.rate[None, :])

    def key(self, length) -> Float[Array, "C H"]:
        """kd_j = λ^{L−1−j} for j < L, 0 on padding (where the exponent would be negative)."""
        distance = length - 1 - self.index
        powers = jnp.exp(-jnp.maximum(distance, 0)[:, None] * self.rate[None, :])
        return jnp.where((distance >= 0)[:, None], powers, 0.0)

    def block(self, length) -> Float[Array, " H"]:
        """λ^L: how much the state decays across a block of L tokens."""
        return jnp.exp(-length * self.rate)


def _scale_rows(x, weights_CH):
    """x [B, C, H, X] times per-(position, head) weights [C, H]."""
    return x * weights_CH[None, :, :, None]


def _scale_state(state, weights_H):
    return state * weights_H[None, :, None, None]


# Jitted so that repeated eager calls (tests, decode prefill) reuse one compiled scan per shape.
@functools.partial(jax.jit, static_argnames=("block_size",))
def lightning_fwd(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"],
    block_size: int,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """Alg. 5: returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in float32)."""
    t_len = q.shape[1]
    decays = _BlockDecays(decay, block_size)

    def body(state, block):
        q_b, k_b, v_b, length = block
        # Intra-block left product [(Q Kᵀ) ⊙ M] V, then the inter-block right product (Q S) ⊙ qd.
        scores = jnp.einsum("BTHK,BSHK->BHTS", q_b, k_b) * decays.mask[None]
        o_b = jnp.einsum("BHTS,BSHV->BTHV", scores, v_b)
        o_b = o_b + _scale_rows(jnp.einsum("BTHK,BHKV->BTHV", q_b, state), decays.query)
        k_decayed = _scale_rows(k_b, decays.key(length))
        state = _scale_state(state, decays.block(length)) + jnp.einsum("BSHK,BSHV->BHKV", k_decayed, v_b)
        return state, o_b

    blocks = (*(_to_blocks(x, block_size) for x in (q, k, v)), _block_lengths(t_len, block_size))
    state, o = jax.lax.scan(body, initial_state.astype(jnp.float32), blocks)
    return _from_blocks(o, t_len).astype(v.dtype), state


@functools.partial(jax.jit, static_argnames=("block_size",))
def lightning_bwd(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"],
    d_out: Float[Array, "B T H V"],
    d_final_state: Float[Array, "B H K V"],
    block_size: int,
) -> tuple[Float[Array, "B T H K"], Float[Array, "B T H K"], Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """Alg. 6: (dq, dk, dv, d_initial_state) from the output and final-state cotangents.

    Pass 1 runs forward over blocks, recomputing the state S before each block, and gives dQ. Pass 2 runs in
    reverse carrying dS, the cotangent of the state after the block; dS is used for dK and dV first and only then
    updated (Alg. 6), and what is left after block 0 is the cotangent of the initial state.
    """
    t_len = q.shape[1]
    decays = _BlockDecays(decay, block_size)
    blocks = (*(_to_blocks(x, block_size) for x in (q, k, v, d_out)), _block_lengths(t_len, block_size))

    def pass_1(state, block):
        q_b, k_b, v_b, do_b, length = block
        d_scores = jnp.einsum("BTHV,BSHV->BHTS", do_b, v_b) * decays.mask[None]
        dq_b = jnp.einsum("BHTS,BSHK->BTHK", d_scores, k_b)
        dq_b = dq_b + _scale_rows(jnp.einsum("BTHV,BHKV->BTHK", do_b, state), decays.query)
        k_decayed = _scale_rows(k_b, decays.key(length))
        state = _scale_state(state, decays.block(length)) + jnp.einsum("BSHK,BSHV->BHKV", k_decayed, v_b)
        return state, dq_b

    def pass_2(d_state, block):
        q_b, k_b, v_b, do_b, length = block
        scores = jnp.einsum("BTHK,BSHK->BHTS", q_b, k_b) * decays.mask[None]
        d_scores = jnp.einsum("BTHV,BSHV->BHTS", do_b, v_b) * decays.mask[None]
        key_decay = decays.key(length)
        dk_b = jnp.einsum("BHTS,BTHK->BSHK", d_scores, q_b)
        dk_b = dk_b + _scale_rows(jnp.einsum("BSHV,BHKV->BSHK", v_b, d_state), key_decay)
        dv_b = jnp.einsum("BHTS,BTHV->BSHV", scores, do_b)
        dv_b = dv_b + jnp.einsum("BSHK,BHKV->BSHV", _scale_rows(k_b, key_decay), d_state)
        q_decayed = _scale_rows(q_b, decays.query)
        d_state = _scale_state(d_state, decays.block(length)) + jnp.einsum("BTHK,BTHV->BHKV", q_decayed, do_b)
        return d_state, (dk_b, dv_b)

    _, dq = jax.lax.scan(pass_1, initial_state.astype(jnp.float32), blocks)
    d_initial, (dk, dv) = jax.lax.scan(pass_2, d_final_state.astype(jnp.float32), blocks, reverse=True)
    return (
        _from_blocks(dq, t_len).astype(q.dtype),
        _from_blocks(dk, t_len).astype(k.dtype),
        _from_blocks(dv, t_len).astype(v.dtype),
        d_initial.astype(initial_state.dtype),
    )

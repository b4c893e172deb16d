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

Blocks are read and written in place along the time axis of the [B, T, H, X] arrays (`lax.fori_loop` with
dynamic slices), never laid out block-major: a [N, B, C, H, X] layout is a transposed copy of every input and
output once B > 1. The ⌊T/C⌋ full blocks run in the loop; a partial last block of L = T mod C tokens runs once
after it (before it, in the reverse pass) at its own static length, so nothing is padded.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from effarch.pallas_kernels.lightning.reference import decay_mask


class _BlockDecays:
    """Decay factors of a block of L tokens, as exp(−s·n) with n ≥ 0: no Λ⁻¹, so a large s underflows to 0.

    Full blocks use L = C; a partial last block gets its own instance with L = T mod C, so its key decays and its
    state decay λ^L count only the tokens that exist.
    """

    def __init__(self, decay: Float[Array, " H"], length: int):
        rate = decay.astype(jnp.float32)
        index = jnp.arange(length)
        # [H, L, L] intra-block mask M_ij = λ^{i−j} (i ≥ j).
        self.mask = decay_mask(rate, length, length)
        # [L, H] query decays qd_i = λ^{i+1} and key decays kd_j = λ^{L−1−j}.
        self.query = jnp.exp(-(index[:, None] + 1) * rate[None, :])
        self.key = jnp.exp(-(length - 1 - index)[:, None] * rate[None, :])
        # [H] λ^L: how much the state decays across the block.
        self.block = jnp.exp(-length * rate)


def _scale_rows(x, weights_CH):
    """x [B, C, H, X] times per-(position, head) weights [C, H]."""
    return x * weights_CH[None, :, :, None]


def _scale_state(state, weights_H):
    return state * weights_H[None, :, None, None]


def _over_blocks(
    step: Callable,
    carry: Float[Array, "B H K V"],
    inputs: tuple[Float[Array, "B T H _"], ...],
    outputs: tuple[Float[Array, "B T H _"], ...],
    decay: Float[Array, " H"],
    block_size: int,
    *,
    reverse: bool = False,
) -> tuple[Float[Array, "B H K V"], tuple[Float[Array, "B T H _"], ...]]:
    """Runs `step(decays, carry, *input_blocks) -> (carry, output_blocks)` over the time blocks, in place.

    Input blocks are sliced out of the [B, T, H, X] arrays and cast to float32; output blocks are cast to each
    output buffer's dtype and written into it at the same positions. Blocks run in time order, or reversed.
    Returns (carry, outputs).
    """
    t_len = inputs[0].shape[1]
    n_full, tail = divmod(t_len, block_size)
    full_decays = _BlockDecays(decay, block_size)

    # Block starts are never negative; without the wrap-around select every slice in the loop body waits on one
    # scalar index op, which made the B = 1 backward ~20% slower on a 2-core CPU.
    def slice_block(x, start, length):
        return jax.lax.dynamic_slice_in_dim(x, start, length, axis=1, allow_negative_indices=False)

    def write_block(out, block, start):
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=1, allow_negative_indices=False)

    def run_block(decays, start, length, state_and_outputs):
        state, outs = state_and_outputs
        state, out_blocks = step(decays, state, *(slice_block(x, start, length).astype(jnp.float32) for x in inputs))
        return state, tuple(write_block(o, b.astype(o.dtype), start) for o, b in zip(outs, out_blocks))

    def full_blocks(first, stop, state_and_outputs):
        """Full blocks first .. stop−1 (in reverse: stop−1 .. first) in a loop."""

        def body(i, state_and_outputs):
            n = first + stop - 1 - i if reverse else i
            return run_block(full_decays, n * block_size, block_size, state_and_outputs)

        if first == stop:
            return state_and_outputs
        return jax.lax.fori_loop(first, stop, body, state_and_outputs)

    def tail_block(state_and_outputs):
        return run_block(_BlockDecays(decay, tail), n_full * block_size, tail, state_and_outputs)

    # The first block to run is peeled off the loop with a static position: its write into the zero buffers then
    # fuses with the zero fill. Fed straight into a loop, the zero buffers are one shared constant that XLA copies
    # into each output (a full-size temporary).
    state_and_outputs = (carry, outputs)
    if reverse:
        # The partial block, else the last full block, then the remaining full blocks from the end.
        loop_stop = n_full
        if tail:
            state_and_outputs = tail_block(state_and_outputs)
        elif n_full:
            loop_stop = n_full - 1
            state_and_outputs = run_block(full_decays, loop_stop * block_size, block_size, state_and_outputs)
        return full_blocks(0, loop_stop, state_and_outputs)
    # Block 0, then full blocks 1 .. N_full−1, then the partial block (alone when T < C).
    loop_start = 0
    if n_full:
        loop_start = 1
        state_and_outputs = run_block(full_decays, 0, block_size, state_and_outputs)
    state_and_outputs = full_blocks(loop_start, n_full, state_and_outputs)
    if tail:
        state_and_outputs = tail_block(state_and_outputs)
    return state_and_outputs


def _state_update(decays, state, k_b, v_b):
    """S ← λ^L S + (K ⊙ kd)ᵀ V."""
    k_decayed = _scale_rows(k_b, decays.key)
    return _scale_state(state, decays.block) + jnp.einsum("BSHK,BSHV->BHKV", k_decayed, v_b)


# Jitted so that repeated eager calls (tests, decode prefill) reuse one compiled loop per shape.
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

    def step(decays, state, q_b, k_b, v_b):
        # Intra-block left product [(Q Kᵀ) ⊙ M] V, then the inter-block right product (Q S) ⊙ qd.
        scores = jnp.einsum("BTHK,BSHK->BHTS", q_b, k_b) * decays.mask[None]
        o_b = jnp.einsum("BHTS,BSHV->BTHV", scores, v_b)
        o_b = o_b + _scale_rows(jnp.einsum("BTHK,BHKV->BTHV", q_b, state), decays.query)
        return _state_update(decays, state, k_b, v_b), (o_b,)

    state, (o,) = _over_blocks(
        step, initial_state.astype(jnp.float32), (q, k, v), (jnp.zeros(v.shape, v.dtype),), decay, block_size
    )
    return o, state


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

    def pass_1(decays, state, k_b, v_b, do_b):
        d_scores = jnp.einsum("BTHV,BSHV->BHTS", do_b, v_b) * decays.mask[None]
        dq_b = jnp.einsum("BHTS,BSHK->BTHK", d_scores, k_b)
        dq_b = dq_b + _scale_rows(jnp.einsum("BTHV,BHKV->BTHK", do_b, state), decays.query)
        return _state_update(decays, state, k_b, v_b), (dq_b,)

    def pass_2(decays, d_state, q_b, k_b, v_b, do_b):
        scores = jnp.einsum("BTHK,BSHK->BHTS", q_b, k_b) * decays.mask[None]
        d_scores = jnp.einsum("BTHV,BSHV->BHTS", do_b, v_b) * decays.mask[None]
        dk_b = jnp.einsum("BHTS,BTHK->BSHK", d_scores, q_b)
        dk_b = dk_b + _scale_rows(jnp.einsum("BSHV,BHKV->BSHK", v_b, d_state), decays.key)
        dv_b = jnp.einsum("BHTS,BTHV->BSHV", scores, do_b)
        dv_b = dv_b + jnp.einsum("BSHK,BHKV->BSHV", _scale_rows(k_b, decays.key), d_state)
        q_decayed = _scale_rows(q_b, decays.query)
        d_state = _scale_state(d_state, decays.block) + jnp.einsum("BTHK,BTHV->BHKV", q_decayed, do_b)
        return d_state, (dk_b, dv_b)

    _, (dq,) = _over_blocks(
        pass_1, initial_state.astype(jnp.float32), (k, v, d_out), (jnp.zeros(q.shape, q.dtype),), decay, block_size
    )
    d_initial, (dk, dv) = _over_blocks(
        pass_2,
        d_final_state.astype(jnp.float32),
        (q, k, v, d_out),
        (jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype)),
        decay,
        block_size,
        reverse=True,
    )
    return dq, dk, dv, d_initial.astype(initial_state.dtype)

"""Checks shared by test_pallas_tpu.py and test_pallas_gpu.py: the block-sparse kernels (interpret mode on CPU)
against the dense oracle, values (o and lse) and the gradients of q, k, v through both outputs, and their
cross-lowering for the real backend.

Shapes are small (interpret mode runs every grid step) but awkward where the kernels pad: odd head dims, block sizes
that are not tile sizes, q_block != kv_block, Tq != Tk with partial last blocks, random unsorted per-group lists
with empty ones (rows that see nothing), GQA.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from effarch.pallas_kernels.block_sparse import block_sparse_attention, block_sparse_reference
from effarch.pallas_kernels.block_sparse.pallas_vjp import block_sparse_pallas
from tests.helpers.lowering import count_kernels, lower_text
from tests.helpers.numerics import assert_close, rel_err
from tests.pallas_kernels.block_sparse.test_reference import random_lists


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 1
    tq: int = 40
    tk: int = 56
    hq: int = 4
    hkv: int = 2
    groups: str = "kv"  # Hs: "one", "kv" or "q"
    d: int = 5
    dv: int = 7
    q_block: int = 16
    kv_block: int = 8
    kmax: int = 3
    causal: bool = True
    window: bool = False  # per-group windows and sinks
    positions: bool = False  # permuted positions with padding (-1)
    segments: bool = False
    seed: int = 0


def make(case: Case, dtype=jnp.float32):
    """(q, k, v, block_idx, block_cnt, keyword arguments, cotangents of o and lse)."""
    rng = np.random.default_rng(case.seed)
    nq, nk = -(-case.tq // case.q_block), -(-case.tk // case.kv_block)
    hs = {"one": 1, "kv": case.hkv, "q": case.hq}[case.groups]
    idx, cnt = random_lists(rng, case.b, hs, nq, nk, case.kmax)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in
               ((case.b, case.tq, case.hq, case.d), (case.b, case.tk, case.hkv, case.d),
                (case.b, case.tk, case.hkv, case.dv)))
    kw = dict(q_block=case.q_block, kv_block=case.kv_block, causal=case.causal)
    if case.window:
        kw.update(window=rng.integers(4, 30, size=hs).astype(np.int32),
                  n_sink=rng.integers(0, 5, size=hs).astype(np.int32))
    if case.positions:
        q_pos = np.stack([rng.permutation(case.tq) for _ in range(case.b)]).astype(np.int32)
        kv_pos = np.stack([rng.permutation(case.tk) for _ in range(case.b)]).astype(np.int32)
        q_pos[0, 3] = kv_pos[0, 5] = -1
        kw.update(q_pos=jnp.asarray(q_pos), kv_pos=jnp.asarray(kv_pos))
    if case.segments:
        kw.update(segment_ids=(jnp.asarray(rng.integers(0, 2, size=(case.b, case.tq))),
                               jnp.asarray(rng.integers(0, 2, size=(case.b, case.tk)))))
    d_o = jnp.asarray(rng.standard_normal((case.b, case.tq, case.hq, case.dv)), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal((case.b, case.tq, case.hq)), jnp.float32)
    return q, k, v, jnp.asarray(idx), jnp.asarray(cnt), kw, (d_o, d_lse)


def values_and_grads(attend, q, k, v, cotangents):
    """(o, lse) and d/d(q, k, v) of <o, dO> + <lse, dlse> over the rows that see something."""
    d_o, d_lse = cotangents

    def loss(q, k, v):
        o, lse = attend(q, k, v)
        seen = jnp.isfinite(lse)
        return (jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(jnp.where(seen, lse, 0.0) * d_lse)), (o, lse)

    grads, (o, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, lse, grads


def attend_with(fn, idx, cnt, kw):
    return jax.jit(lambda q, k, v: fn(q, k, v, idx, cnt, return_lse=True, **kw))


def through_api(name):
    return functools.partial(block_sparse_attention, implementation=name)


def check_f32(fn, case: Case):
    """The kernel matches the oracle to 1e-5 relative: o, lse (and which rows are empty), dq, dk, dv."""
    q, k, v, idx, cnt, kw, cts = make(case)
    o, lse, grads = values_and_grads(attend_with(fn, idx, cnt, kw), q, k, v, cts)
    o_ref, lse_ref, grads_ref = values_and_grads(attend_with(block_sparse_reference, idx, cnt, kw), q, k, v, cts)
    empty = np.isneginf(np.asarray(lse_ref))
    assert empty.any() and not empty.all(), "the case must have rows that see nothing and rows that see something"
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("lse", np.where(empty, 0, lse), np.where(empty, 0, lse_ref), 1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, g_ref, 1e-5)


def check_bf16(fn, case: Case):
    """bf16 q, k, v: the kernel's error against the float32 oracle is at most 2x the oracle's own error on the same
    bf16 inputs (o and every gradient)."""
    q, k, v, idx, cnt, kw, cts = make(case)
    truth = values_and_grads(attend_with(block_sparse_reference, idx, cnt, kw), q, k, v, cts)
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    ref = values_and_grads(attend_with(block_sparse_reference, idx, cnt, kw), *bf, cts)
    got = values_and_grads(attend_with(fn, idx, cnt, kw), *bf, cts)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[2])
    for name, g, r, t in zip(("o", "dq", "dk", "dv"), (got[0], *got[2]), (ref[0], *ref[2]), (truth[0], *truth[2])):
        err, ref_err = rel_err(g, t), rel_err(r, t)
        assert ref_err > 0, f"{name}: the bf16 reference has no rounding error, so the test cannot tell"
        assert err <= 2 * ref_err, f"{name}: bf16 kernel error {err:.2e} > 2x the reference's {ref_err:.2e}"


def check_lowering(name: str, platform: str, t_len: int, dtype, groups: str = "kv", block: int = 128):
    """Forward and backward lower for `platform` with the kernels' custom calls: B 2, Hq 8 on Hkv 2, D 128, traced
    lists of 10% of the blocks (the worst case for their sizes), a window with sinks."""
    b, hq, hkv, d = 2, 8, 2, 128
    n = t_len // block
    hs = {"one": 1, "kv": hkv, "q": hq}[groups]
    x = jax.ShapeDtypeStruct((b, t_len, hq, d), dtype)
    kv = jax.ShapeDtypeStruct((b, t_len, hkv, d), dtype)
    idx = jax.ShapeDtypeStruct((b, hs, n, max(1, n // 10)), jnp.int32)
    cnt = jax.ShapeDtypeStruct((b, hs, n), jnp.int32)
    # interpret=False: compile for the target without the platform check (this host is a CPU).
    attend = functools.partial(block_sparse_pallas, name, q_block=block, kv_block=block, window=1024, n_sink=64,
                               interpret=False)

    def loss(q, k, v, idx, cnt):
        return attend(q, k, v, idx, cnt).astype(jnp.float32).sum()

    forward = lower_text(attend, x, kv, kv, idx, cnt, platform=platform)
    backward = lower_text(jax.grad(loss, argnums=(0, 1, 2)), x, kv, kv, idx, cnt, platform=platform)
    assert count_kernels(forward, platform) == 1
    # The backward needs the forward's o and lse, then the dQ and dK/dV kernels.
    assert count_kernels(backward, platform) == 3
    assert "block_sparse_bwd_dq" in backward and "block_sparse_bwd_dkv" in backward

"""Compile jobs for the `pallas_tpu` kernels: each op's forward, and its backward through the op's custom_vjp, on one
chip of a TPU slice described by libtpu (tests/tpu/harness.py).

`OPS` calls each kernel path with `interpret=False` (compiled Mosaic, no host-platform check), since the ops'
`implementation="pallas_tpu"` follows the host's backend and refuses on a CPU host. Once kernel choice follows the
target platform, each entry becomes the op's public call with `implementation="pallas_tpu"`; nothing else changes.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effarch.pallas_kernels.attention.splash import attention_splash
from effarch.pallas_kernels.based.pallas_vjp import based_pallas_impl
from effarch.pallas_kernels.block_sparse import random_causal_lists
from effarch.pallas_kernels.block_sparse.decode_pallas import sparse_decode_pallas
from effarch.pallas_kernels.block_sparse.pallas_vjp import block_sparse_pallas
from effarch.pallas_kernels.lightning import api as lightning_api
from effarch.pallas_kernels.sliding_window.splash import sliding_window_splash
from tests.tpu.harness import Job, tpu_devices


@dataclasses.dataclass(frozen=True)
class Shape:
    """Per-chip shapes: batch, query heads, key/value heads, head dims of q/k and v."""

    b: int
    h: int
    h_kv: int
    k: int
    v: int


# Realistic per-chip shapes: Lightning (TransNormerLLM) heads of 128; BASED's feature dim 16 with value heads of 64
# (arXiv 2402.18668 §3); sliding-window and causal attention with GQA (8 query heads on 2 KV heads) of head dim 128,
# window 512; block-sparse attention with the same GQA heads, one list per KV head, 128-token blocks, 10% of the
# blocks listed; the decode op (one query step against a cache of T tokens, the GQA heads above, one list per KV
# head) reading DECODE_BUDGET tokens, listed one by one or as blocks of DECODE_BLOCK (forward only).
SHAPES = {
    "lightning": Shape(b=2, h=8, h_kv=8, k=128, v=128),
    "based": Shape(b=2, h=8, h_kv=8, k=16, v=64),
    "splash": Shape(b=2, h=8, h_kv=2, k=128, v=128),
    "attention": Shape(b=2, h=8, h_kv=2, k=128, v=128),
    "block_sparse": Shape(b=2, h=8, h_kv=2, k=128, v=128),
    "sparse_decode_token": Shape(b=2, h=8, h_kv=2, k=128, v=128),
    "sparse_decode_block": Shape(b=2, h=8, h_kv=2, k=128, v=128),
}
WINDOW = 512
SPARSE_BLOCK = 128
SPARSE_DENSITY = 0.1
DECODE_BUDGET = 1024
DECODE_BLOCK = 64


def _lightning(q, k, v):
    h = q.shape[2]
    decay = -jnp.log(jnp.linspace(0.9, 0.999, h, dtype=jnp.float32))
    s0 = jnp.zeros((q.shape[0], h, q.shape[3], v.shape[3]), jnp.float32)
    o, state = lightning_api._IMPLS["pallas_tpu"](q, k, v, decay, s0, 64, interpret=False)
    return o, state


def _based(q, k, v):
    return based_pallas_impl("pallas_tpu", q, k, v, chunk_size=64, eps=1e-6, interpret=False)


def _splash(q, k, v):
    return sliding_window_splash(q, k, v, window=WINDOW, interpret=False)


def _attention(q, k, v):
    return attention_splash(q, k, v, causal=True, interpret=False)


def _block_sparse(q, k, v):
    n = q.shape[1] // SPARSE_BLOCK
    idx, cnt = random_causal_lists(q.shape[0], k.shape[2], n, max(1, round(SPARSE_DENSITY * n)))
    return block_sparse_pallas("pallas_tpu", q, k, v, jnp.asarray(idx), jnp.asarray(cnt), q_block=SPARSE_BLOCK,
                               kv_block=SPARSE_BLOCK, interpret=False)


def _sparse_decode(granularity: str, q, k, v):
    """The last query step against the whole cache, DECODE_BUDGET tokens listed per KV head, spread over it (the
    kernel's grid and SMEM are sized by the list length, not by which entries it names)."""
    unit = 1 if granularity == "token" else DECODE_BLOCK
    n = min(DECODE_BUDGET // unit, k.shape[1] // unit)
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) * (k.shape[1] // unit // n), (q.shape[0], k.shape[2], n))
    cnt = jnp.full((q.shape[0], k.shape[2]), n, jnp.int32)
    return sparse_decode_pallas("pallas_tpu", q[:, -1], k, v, idx, cnt, granularity=granularity,
                                block=None if granularity == "token" else DECODE_BLOCK, interpret=False)


# kernel -> f(q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V]) running its pallas_tpu implementation.
OPS = {"lightning": _lightning, "based": _based, "splash": _splash, "attention": _attention,
       "block_sparse": _block_sparse, "sparse_decode_token": functools.partial(_sparse_decode, "token"),
       "sparse_decode_block": functools.partial(_sparse_decode, "block")}
FORWARD_ONLY = ("sparse_decode_token", "sparse_decode_block")  # decode: no backward kernel
CHIPS = ("v5e", "v5p", "v6e")
LENGTHS = (2048, 32768)
DTYPES = ("bfloat16", "float32")
DIRECTIONS = ("fwd", "bwd")


def compile_kernel(kernel: str, chip: str, t: int, dtype: str, direction: str) -> None:
    """Compiles `kernel`'s forward ("fwd") or its vjp, forward and backward kernels ("bwd"), for one `chip`."""
    s = SHAPES[kernel]
    device = tpu_devices(chip)[0]
    sharding = jax.sharding.make_single_device_sharding(device)

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

    args = (spec(s.b, t, s.h, s.k), spec(s.b, t, s.h_kv, s.k), spec(s.b, t, s.h_kv, s.v))
    op = OPS[kernel]
    if direction == "fwd":
        fn = op
    else:
        out = jax.eval_shape(op, *args)
        cotangents = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), out)

        def fn(q, k, v, ct):
            return jax.vjp(op, q, k, v)[1](ct)

        args = (*args, cotangents)
    jax.jit(fn).lower(*args).compile()


def kernel_job(kernel: str, chip: str, t: int, dtype: str, direction: str) -> Job:
    s = SHAPES[kernel]
    shape = f"B{s.b} T{t} H{s.h}" + (f"/{s.h_kv}" if s.h_kv != s.h else "") + f" K{s.k} V{s.v}"
    return Job(
        name=f"{kernel} pallas_tpu {direction} on {chip}, {shape}, {dtype}",
        target="tests.tpu.kernels:compile_kernel",
        kwargs={"kernel": kernel, "chip": chip, "t": t, "dtype": dtype, "direction": direction},
    )


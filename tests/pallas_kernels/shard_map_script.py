"""Run by test_shard_map.py in a subprocess with 8 CPU devices and EFFARCH_PALLAS_INTERPRET=1: the Lightning and
BASED Pallas kernels inside `jax.shard_map` with batch and heads sharded over a (data 2, model 4) mesh, values and
gradients against the unsharded oracles on the same inputs. Command line: a dtype, then cases "op:implementation"
("lightning:pallas_tpu", "based:pallas_gpu", ...), or "mesh:op:implementation": the op called with no shard_map
of its own under `jax.set_mesh` of a (data 2, fsdp 2, tensor 2) mesh, batch and heads sharded
(pallas_kernels/shard.py wraps the kernels; op "swa": splash sliding window, "pallas_tpu" only, GQA H 4 / Hkv 2).
Prints one JSON line {case: max relative error over out and grads}.

check_vma=False: jax's HLO interpreter itself fails the varying-axes check inside shard_map ("Primitive
dynamic_slice requires varying manual axes to match"); the compiled kernels are checked
with check_vma=True by cross-lowering in test_shard_map.py.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.pallas_kernels.based import based_linear_attention
from effarch.pallas_kernels.based import reference as based_reference
from effarch.pallas_kernels.lightning import lightning_attention_with_state
from effarch.pallas_kernels.lightning import reference as lightning_reference
from effarch.pallas_kernels.sliding_window.reference import sliding_window_reference
from effarch.pallas_kernels.sliding_window.splash import sliding_window_splash

jax.config.update("jax_default_matmul_precision", "highest")

X = P("data", None, "model", None)  # [B, T, H, X]: batch over data, heads over model
STATE = P("data", "model", None, None)  # [B, H, K, V]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(dtype, cases):
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    b, t, h, k_dim, v_dim, c = 2, 40, 4, 16, 32, 16

    def put(shape, spec, dtype=jnp.float32):
        return jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype), NamedSharding(mesh, spec))

    q, k = put((b, t, h, k_dim), X), put((b, t, h, k_dim), X)
    v, d_out = put((b, t, h, v_dim), X), put((b, t, h, v_dim), X)
    s0 = put((b, h, k_dim, v_dim), STATE)
    decay = jax.device_put(jnp.array([0.3, 0.02, 1.1, 0.5], jnp.float32), NamedSharding(mesh, P("model")))
    errors = {}
    for case in cases:
        if case.startswith("mesh:"):
            errors[case] = mesh_case(dtype, *case.split(":")[1:])
            continue
        op, name = case.split(":")
        qc, kc, vc = (x.astype(dtype) for x in (q, k, v))
        # The oracles run unsharded, on one device (host copies of the same values).
        qu, ku, vu, s0u, du, decay_u = (jnp.asarray(np.asarray(x)) for x in (qc, kc, vc, s0, d_out, decay))
        if op == "lightning":
            light = jax.shard_map(
                functools.partial(lightning_attention_with_state, block_size=c, implementation=name),
                mesh=mesh, in_specs=(X, X, X, P("model"), STATE), out_specs=(X, STATE), check_vma=False,
            )
            out, pull = jax.vjp(lambda q, k, v, s: light(q, k, v, decay, s), qc, kc, vc, s0)
            assert out[0].sharding.spec == X, out[0].sharding
            grads = pull((d_out.astype(dtype), s0))
            oracle = jax.jit(lambda q, k, v, s: lightning_reference.lightning_quadratic(q, k, v, decay_u, s))
            ref, ref_pull = jax.vjp(oracle, qu, ku, vu, s0u)
            ref_grads = ref_pull((du.astype(dtype), s0u))
            errors[case] = max(rel_err(a, r) for a, r in zip((*out, *grads), (*ref, *ref_grads)))
        else:
            based = jax.shard_map(
                functools.partial(based_linear_attention, chunk_size=c, implementation=name),
                mesh=mesh, in_specs=(X, X, X), out_specs=X, check_vma=False,
            )
            out, pull = jax.vjp(based, qc, kc, vc)
            assert out.sharding.spec == X, out.sharding
            grads = pull(d_out.astype(dtype))
            ref, ref_pull = jax.vjp(jax.jit(based_reference.based_quadratic), qu, ku, vu)
            ref_grads = ref_pull(du.astype(dtype))
            errors[case] = max(rel_err(a, r) for a, r in zip((out, *grads), (ref, *ref_grads)))
    print(json.dumps(errors))


def mesh_case(dtype, op: str, name: str) -> float:
    """Max relative error of `op` called under a 3-axis mesh (the Trainer's axes) without a shard_map of ours."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rng = np.random.default_rng(1)
    x_spec = P(("data", "fsdp"), None, "tensor", None)
    b, t, h, h_kv, k_dim = 4, 128 if op == "swa" else 40, 4, 2, 16

    def put(shape):
        return jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype), NamedSharding(mesh, x_spec))

    q, k = put((b, t, h, k_dim)), put((b, t, h if op != "swa" else h_kv, k_dim))
    v = put((b, t, h if op != "swa" else h_kv, 32))
    d_out = put((b, t, h, 32))
    decay = jnp.array([0.3, 0.02, 1.1, 0.5], jnp.float32)
    fns = {
        "lightning": (lambda q, k, v: lightning_attention_with_state(q, k, v, decay, block_size=16,
                                                                     implementation=name)[0],
                      lambda q, k, v: lightning_reference.lightning_quadratic(q, k, v, decay)[0]),
        "based": (lambda q, k, v: based_linear_attention(q, k, v, chunk_size=16, implementation=name),
                  based_reference.based_quadratic),
        # Splash reads no EFFARCH_PALLAS_INTERPRET (jax's kernel): its interpret mode is asked for directly.
        "swa": (lambda q, k, v: sliding_window_splash(q, k, v, window=48, interpret=True),
                lambda q, k, v: sliding_window_reference(q, k, v, window=48)),
    }
    fn, oracle = fns[op]
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))  # the kernel is split, not replicated
        out, pull = jax.vjp(jax.jit(fn), q, k, v)
        grads = pull(d_out)
    host = [jnp.asarray(np.asarray(x)) for x in (q, k, v, d_out)]
    ref, ref_pull = jax.vjp(jax.jit(oracle), *host[:3])
    return max(rel_err(a, r) for a, r in zip((out, *grads), (ref, *ref_pull(host[3]))))


if __name__ == "__main__":
    main(jnp.dtype(sys.argv[1]).type, sys.argv[2:])

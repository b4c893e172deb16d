"""sparse_decode_attention's "pallas_gpu" (Triton) and "pallas_tpu" (Mosaic) kernels: interpret mode against the
oracle (o and lse; the op has no backward through the kernels), lowering for CUDA and TPU, opt-in dispatch, and the
compiled GPU kernel against the oracle on a GPU (scripts/gpu_check.sh). Real TPU compiles:
tests/tpu/test_kernels_compile.py.

Shapes are small (interpret mode runs every grid step) but awkward where the kernels pad or clamp: odd head dims
(D 5, Dv 3: padded on GPU, whole on TPU), a cache length that is no multiple of the block (a partial last block, read
from a clamped start), caches shorter than one chunk, lengths inside a block, unsorted lists with empty ones, GQA
with every list layout (Hs = 1, Hkv, Hq), and on GPU split-k partials merged by lse.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.pallas_kernels.block_sparse import decode, sparse_decode_attention
from effarch.pallas_kernels.block_sparse.decode_pallas import sparse_decode_pallas
from effarch.pallas_kernels.interpret import ENV_VAR, tpu_interpret_params
from tests.helpers.lowering import ABSTRACT_DEVICES, count_kernels, lower_text
from tests.helpers.numerics import rel_err
from tests.pallas_kernels.block_sparse.test_decode import make, random_selection

KERNELS = ("pallas_gpu", "pallas_tpu")
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture
def interpret_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


def case(seed, granularity, hs, *, B=3, S=37, Hq=4, Hkv=2, D=5, Dv=3, K=5, block=4):
    """(q, k, v, idx, cnt, keyword arguments): lengths [1, 9, S] (1: one visible token, 9: inside a block); row 0's
    first list is empty and the last row's last list full (random_selection), so some rows see nothing and some do.
    """
    rng = np.random.default_rng(seed)
    q, k, v = make(rng, B, S, Hq, Hkv, D, Dv)
    block = block if granularity == "block" else None
    n = -(-S // (block or 1))
    idx, cnt = random_selection(rng, B, {"one": 1, "kv": Hkv, "q": Hq}[hs], n, K=min(K, n))
    lengths = np.array([1, 9, S][-B:], np.int32)
    if B > 2:  # row 1 (length 9) lists the entry holding token 9 in every list: the length must cut it
        for g in range(idx.shape[1]):
            if 9 // (block or 1) not in idx[1, g, : cnt[1, g]]:
                idx[1, g, 0], cnt[1, g] = 9 // (block or 1), max(cnt[1, g], 1)
    return q, k, v, idx, cnt, dict(granularity=granularity, block=block, lengths=lengths, scale=0.7)


def check(fn, q, k, v, idx, cnt, kw):
    """fn's (o, lse) equal the oracle's, empty rows included (o = 0, lse = -inf); the case has both kinds."""
    o, lse = jax.jit(lambda q, k, v: fn(q, k, v, idx, cnt, **kw))(q, k, v)
    o_ref, lse_ref = sparse_decode_attention(q, k, v, idx, cnt, implementation="reference", **kw)
    empty = np.isneginf(np.asarray(lse_ref))
    assert empty.any() and not empty.all(), "the case must have rows that see nothing and rows that see something"
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    np.testing.assert_allclose(o, o_ref, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.where(empty, 0, lse), np.where(empty, 0, lse_ref), atol=ATOL, rtol=RTOL)


def through_api(name):
    return functools.partial(sparse_decode_attention, implementation=name)


def direct(name, **options):
    return functools.partial(sparse_decode_pallas, name, **options)


@pytest.mark.parametrize("name,granularity,hs", [
    ("pallas_gpu", "token", "kv"),
    ("pallas_tpu", "token", "q"),
    pytest.param("pallas_gpu", "block", "q", marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "block", "kv", marks=pytest.mark.slow),
])
def test_matches_reference(interpret_env, name, granularity, hs):
    # A partial last block, lengths inside a block, empty lists, odd head dims, GQA; blocks through the public op,
    # tokens in chunks of 16 (the default 32 costs twice the interpreted steps).
    check(through_api(name) if granularity == "block" else direct(name, chunk=16), *case(1, granularity, hs))


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("granularity,hs", [("token", "one"), ("token", "q"), ("block", "one"), ("block", "kv")])
def test_more_list_layouts_match_reference(interpret_env, name, granularity, hs):
    check(direct(name, chunk=16), *case(2, granularity, hs))


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNELS)
def test_several_steps_short_cache_and_mqa(interpret_env, name):
    # Token lists of 40 in chunks of 16 (3 steps, the last partial; on GPU split over programs), a block of 20 rows
    # (a 32-row chunk on GPU) over a 25-token cache (shorter than one chunk: padded), one list for all heads (MQA).
    check(direct(name, chunk=16), *case(3, "token", "kv", S=64, K=40))
    check(direct(name), *case(4, "block", "one", B=2, S=25, Hq=3, Hkv=1, K=2, block=20))


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNELS)
def test_no_list_slots_and_lengths_past_a_short_cache(interpret_env, name):
    # K = 0 (no slot at all): every row sees nothing. A 10-token cache (padded to one 16-row chunk inside) with
    # lengths past it: the padded rows after the partial last block (tokens 8, 9) stay invisible.
    q, k, v, idx, cnt, kw = case(11, "block", "kv", B=2, S=10, K=3)
    o, lse = direct(name, chunk=16)(q, k, v, idx[..., :0], cnt * 0, **kw)
    assert not np.any(np.asarray(o)) and np.isneginf(np.asarray(lse)).all()
    check(direct(name, chunk=16), q, k, v, idx, cnt, {**kw, "lengths": np.array([9, 30], np.int32)})


@pytest.mark.slow
def test_gpu_splits_merge_like_one_program(interpret_env):
    # The split-k partials merged by lse (decode_pallas.merge_splits) equal one program walking the whole list.
    q, k, v, idx, cnt, kw = case(5, "token", "q", S=80, K=48)
    check(direct("pallas_gpu", chunk=16, splits=1), q, k, v, idx, cnt, kw)
    check(direct("pallas_gpu", chunk=16, splits=3), q, k, v, idx, cnt, kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_bf16_error_within_twice_reference(interpret_env, name, granularity):
    # A bf16 cache of 4 KV heads (on TPU a DMA takes an aligned pair of heads: the kernel keeps its own), D 16:
    # the kernel's error against the float32 oracle is at most 2x the oracle's own on the same bf16 inputs.
    q, k, v, idx, cnt, kw = case(6, granularity, "kv", B=2, S=48, Hq=8, Hkv=4, D=16, Dv=16, K=6, block=16)
    truth = sparse_decode_attention(q, k, v, idx, cnt, implementation="reference", **kw)[0]
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref = sparse_decode_attention(*bf, idx, cnt, implementation="reference", **kw)[0]
    got = jax.jit(lambda q, k, v: sparse_decode_pallas(name, q, k, v, idx, cnt, chunk=16, **kw))(*bf)[0]
    assert got.dtype == jnp.bfloat16
    err, ref_err = rel_err(got, truth), rel_err(ref, truth)
    assert 0 < ref_err and err <= 2 * ref_err, f"bf16 kernel error {err:.2e} vs the reference's {ref_err:.2e}"


@pytest.mark.slow  # the TPU interpreter costs milliseconds per grid step and per DMA
@pytest.mark.parametrize("granularity,hs", [("token", "q"), ("block", "kv")])
def test_tpu_interpreter_dmas_no_races_nan_poisoned_memory(granularity, hs):
    # The TPU interpreter models the DMAs and their semaphores (the HLO interpreter does not) and poisons scratch and
    # outputs with NaN: a buffer read before its copy lands, a running max, sum or accumulator read before its init,
    # or an output left unwritten would show up as NaN. A bf16 cache of 4 KV heads: copies of aligned head pairs.
    q, k, v, idx, cnt, kw = case(10, granularity, hs, B=3, S=40, Hq=8, Hkv=4, D=16, Dv=16, K=20)
    q, k, v = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v))  # bf16-exact values
    attend = direct("pallas_tpu", chunk=16, interpret=tpu_interpret_params())
    check(lambda q, k, v, *a, **kw: attend(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), *a, **kw),
          q, k, v, idx, cnt, kw)


def test_kernels_are_opt_in_everywhere(monkeypatch):
    # Nothing unverified is a default: every platform runs "xla" unless a kernel is named, and a named kernel off
    # its platform (no interpret mode) refuses before any work, so a sequence of implementations can fall back.
    assert decode.DEFAULT_ORDER == {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}
    assert set(KERNELS) <= set(decode.IMPLEMENTATIONS)
    monkeypatch.delenv(ENV_VAR, raising=False)
    q, k, v, idx, cnt, kw = case(7, "token", "kv")
    for name, platform in zip(KERNELS, ("gpu", "tpu")):
        with pytest.raises(NotImplementedError, match=platform):
            sparse_decode_attention(q, k, v, idx, cnt, implementation=name, **kw)
    # longheads' key re-rotation is the xla path's only: a kernel refuses it, and a sequence falls back to xla
    monkeypatch.setenv(ENV_VAR, "1")
    q, k, v, idx, cnt, kw = case(7, "token", "kv", D=4)
    shift = jnp.zeros(idx.shape, jnp.int32)
    freqs = jnp.ones((q.shape[-1] // 2,), jnp.float32)
    for name in KERNELS:
        with pytest.raises(NotImplementedError, match="key_shift"):
            sparse_decode_attention(q, k, v, idx, cnt, implementation=name, key_shift=shift, rope_freqs=freqs, **kw)
        with pytest.warns(UserWarning, match="unavailable"):
            got = sparse_decode_attention(q, k, v, idx, cnt, implementation=(name, "xla"), key_shift=shift,
                                          rope_freqs=freqs, **kw)
        want = sparse_decode_attention(q, k, v, idx, cnt, implementation="xla", key_shift=shift, rope_freqs=freqs,
                                       **kw)
        np.testing.assert_allclose(got[0], want[0])


def lowered(name, platform, granularity, hs, dtype, *, S=8192, Hq=8, Hkv=2, D=128):
    """The kernel at B 2, traced lists (K = 1024 tokens or 16 blocks of 64) and lengths, lowered for `platform`."""
    B = 2
    Hs = {"one": 1, "kv": Hkv, "q": Hq}[hs]
    K, block = (1024, None) if granularity == "token" else (16, 64)
    specs = (jax.ShapeDtypeStruct((B, Hq, D), dtype), jax.ShapeDtypeStruct((B, S, Hkv, D), dtype),
             jax.ShapeDtypeStruct((B, S, Hkv, D), dtype), jax.ShapeDtypeStruct((B, Hs, K), jnp.int32),
             jax.ShapeDtypeStruct((B, Hs), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))

    def attend(q, k, v, idx, cnt, lengths):  # interpret=False: compile for the target without the platform check
        return sparse_decode_pallas(name, q, k, v, idx, cnt, granularity=granularity, block=block, lengths=lengths,
                                    interpret=False)

    return lower_text(attend, *specs, platform=platform)


@pytest.mark.parametrize("name,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
@pytest.mark.parametrize("granularity,hs,dtype", [
    ("token", "kv", jnp.bfloat16),
    pytest.param("block", "q", jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param("token", "q", jnp.float32, marks=pytest.mark.slow),
    pytest.param("block", "one", jnp.float32, marks=pytest.mark.slow),
])
def test_lowers(name, platform, granularity, hs, dtype):
    assert count_kernels(lowered(name, platform, granularity, hs, dtype), platform) == 1


@pytest.mark.slow
def test_sharded_call_lowers_for_a_tpu_mesh():
    # Sharded caches and traced lists under a 4-device TPU mesh (batch over data, heads over tensor), no shard_map of
    # the caller's: shard_kernel splits batch and heads with the per-KV-head lists, or XLA could not partition it.
    m = AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                     abstract_device=ABSTRACT_DEVICES["tpu"])
    B, S, Hq, Hkv, D, K = 4, 1024, 8, 2, 128, 64

    def spec(shape, dtype, *partition):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(m, P(*partition)))

    batch = ("data", "fsdp")
    args = (spec((B, Hq, D), jnp.bfloat16, batch, "tensor"), spec((B, S, Hkv, D), jnp.bfloat16, batch, None, "tensor"),
            spec((B, S, Hkv, D), jnp.bfloat16, batch, None, "tensor"), spec((B, Hkv, K), jnp.int32, batch, "tensor"),
            spec((B, Hkv), jnp.int32, batch, "tensor"), spec((B,), jnp.int32, batch))

    def attend(q, k, v, idx, cnt, lengths):
        return sparse_decode_pallas("pallas_tpu", q, k, v, idx, cnt, lengths=lengths, interpret=False)

    text = lower_text(attend, *args, platform="tpu", mesh=m)
    assert count_kernels(text, "tpu") == 1
    assert "shard_map" in text or "sdy.manual_computation" in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("granularity,hs", [("token", "kv"), ("block", "q")])
def test_compiled_matches_reference_on_gpu(monkeypatch, granularity, hs):
    # The compiled Triton kernel (no interpretation), float32: the awkward case and a larger one (S 5000, D 128,
    # 300 tokens or 20 blocks of 48), split-k on.
    monkeypatch.delenv(ENV_VAR, raising=False)
    check(through_api("pallas_gpu"), *case(8, granularity, hs))
    check(through_api("pallas_gpu"), *case(9, granularity, hs, B=2, S=5000, Hq=8, Hkv=2, D=128, Dv=128,
                                            K=300 if granularity == "token" else 20, block=48))

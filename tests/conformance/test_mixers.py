"""The `Mixer` protocol, checked for every mixer in the registry (arches/registry.py) at its registered small config.

Per mixer, one jitted program runs the parallel pass, a prefill in pieces followed by a decode step, token-by-token
decoding from the empty state, and the gradients; a second runs the parallel pass, its gradients and the decoding in
bfloat16. The tests read their results (cached per mixer), so a mixer costs two compiles. A registration's
`skip={check: reason}` skips a check the mixer genuinely cannot pass, with that reason; `slow={check: reason}` runs
it only with `-m slow`. The 8-device mesh step is in test_mesh.py; docs/adding_a_mixer.md lists the checks.

`VARIANTS` adds cases beyond the registry's small configs: a registered mixer at another config that takes another
code path (attention with DuoAttention's gates; sparse_attention's moa pattern: per-head windows from a plan file,
decoded over the KV cache; sink_window at StreamingLLM's cache positions; its dynamic patterns mean_topk, seer,
routing, hyper and hip), checked exactly like the registered ones; a variant's `skip` skips a check with its reason, as
a registration's does (a case that skips "decode" has its bfloat16 decoding compared with its float32 decoding).

A non-causal mixer (its `causal` property False: sparse_attention's biformer and bidir_window patterns) cannot decode:
the checks of DECODING_CHECKS skip it, its programs run only the parallel pass and the gradients, and
`test_noncausal_reads_both_ways_and_refuses_to_decode` checks what it does instead.
"""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import ModelConfig
from effarch.arches.registry import CONFIGS, MIXERS, build_mixer, state_growth
from effarch.layers.attention import AttentionConfig
from effarch.layers.axes import Mixer
from effarch.layers.sparse_attention import SparseAttentionConfig
from tests.helpers.numerics import assert_close, rel_err

B, T, D = 2, 20, 24
T0 = 11  # the token the causality check changes
PIECES = (0, 5, 13, T - 1)  # prefill pieces ending inside chunks, blocks, windows and segments; then one decode step



@dataclasses.dataclass(frozen=True)
class Variant:
    mixer: str  # the registry name
    configs: dict  # {config key: instance} replacing the registered small configs
    skip: dict = dataclasses.field(default_factory=dict)  # {check: reason}, as a registration's skip


MEAN_QUERY = ("a query block's mean query uses the block's later tokens (layers/sparse_topk.py); decoding equals the "
              "parallel form of each prefix instead")
HYPER = ("where a query falls among the sortLSH blocks depends on the later queries' hashes (the paper's Algorithm 4), "
         "and decoding is exact attention (layers/sparse_hyper.py; tests/layers/test_sparse_hyper.py)")
MOA_PLAN = Path(__file__).parents[1] / "fixtures" / "moa_small_plan.json"
VARIANTS = {
    # DuoAttention's gates (layers/attention.py duo_gates): every pass mixes full and streaming attention (2 sinks + a
    # window of 6: from t = 8 on the streaming half drops keys), prefill and decoding over the KV cache's masks; GQA
    # groups of 2. The gates start at 1 (tests/layers/test_duo.py checks other gates).
    "attention[duo]": Variant("attention", {"attention": AttentionConfig(n_heads=4, n_kv_heads=2, duo_gates=True,
                                                                         duo_sink=2, duo_window=6)}),
    # Spans of 7 and 11 tokens at N = T = 20 (the plan's layer 0), 2 sinks, blocks of 4: the prompt pieces end
    # inside blocks and windows; decoding runs over Attention's KV cache (linear).
    "sparse_attention[moa]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="moa", plan=str(MOA_PLAN), block_size=4, n_sink=2, n_heads=4, n_kv_heads=2)}),
    # StreamingLLM's cache positions: 2 sinks + a window of 6 in blocks of 4, so from t = 8 on the queries score the
    # sinks from position 7 (their window from t); GQA groups of 2. Decoding keeps the sink + ring cache (bounded).
    "sparse_attention[sink_cache]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="sink_window", sink_positions="cache", block_size=4, n_sink=2, window=6, n_heads=4, n_kv_heads=2)}),
    # A dynamic pattern: blocks of 4 (5 at T = 20), top 3 of them per query block with one sink block, so rows from
    # block 3 on choose by content; GQA groups of 2 share a list. Its block-mean queries see the later tokens of
    # their block: tests/layers/test_sparse_topk.py checks decoding against the parallel form of each prefix.
    "sparse_attention[mean_topk]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="mean_topk", block_size=4, top_k=3, sink_blocks=1, n_heads=4, n_kv_heads=2)}, skip={
        "causal": MEAN_QUERY, "decode": MEAN_QUERY}),
    # SeerAttention's gate at inference (distill false): gate width 4 != head dim 6, so both gate matrices exist; one
    # list per query head. Its pooled queries see their block's later tokens, as mean_topk's; the gate has no
    # gradient through the output (it learns from its AuxLoss: tests/layers/test_sparse_seer.py).
    "sparse_attention[seer]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="seer", block_size=4, top_k=3, gate_dim=4, n_heads=4, n_kv_heads=2)}, skip={
        "causal": MEAN_QUERY, "decode": MEAN_QUERY,
        "grad": "the gate only ranks blocks in this pass; it learns from its distillation loss (an AuxLoss)"}),
    # Routing: 3 clusters, windows of 4 (blocks of 4), KV head 1 a local window head; GQA groups of 2. Exactly
    # causal, and decoding recomputes the clusters from the KV cache (layers/sparse_routing.py).
    "sparse_attention[routing]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="routing", block_size=4, routing_clusters=3, routing_local_heads=1, n_heads=4, n_kv_heads=2)}),
    # HyperAttention with min_seq_len 8, so at T = 20 the second half's queries over the first half (10 x 10) are
    # approximated by sortLSH blocks of 4 plus 4 sampled columns, and so are the halves' (5 x 5); 5 tokens are exact.
    "sparse_attention[hyper]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="hyper", block_size=4, hyper_lsh_bits=3, hyper_samples=4, hyper_min_seq_len=8, n_heads=4,
        n_kv_heads=2)}, skip={"causal": HYPER, "decode": HYPER}),
    # HiP's hierarchical search: key blocks of 2 (10 at T = 20), top 4 with one sink block, so the rows of blocks 4
    # on search 2 branches over up to 8 candidate blocks (3 halvings); GQA groups of 2 share a list. A list per token
    # (hip_query_block 1) makes it exactly causal and its decoding exact; lists shared by a block's queries (the
    # default) choose with the block's later queries: tests/layers/test_sparse_hip.py checks decoding against the
    # parallel form of each prefix there.
    "sparse_attention[hip]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="hip", block_size=2, hip_query_block=1, top_k=4, sink_blocks=1, n_heads=4, n_kv_heads=2)}),
    # BiFormer's routing: blocks of 4 (5 regions at T = 20, the last one partial), each region routed to 3, with
    # LCE of kernel 3 on V; GQA groups of 2. Non-causal: no decoding (layers/sparse_biformer.py).
    "sparse_attention[biformer]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="biformer", block_size=4, top_k=3, biformer_lce=3, n_heads=4, n_kv_heads=2)}),
    # Its equal-cost static window: the 3 blocks centred on the query block, non-causal.
    "sparse_attention[bidir_window]": Variant("sparse_attention", {"sparse_attention": SparseAttentionConfig(
        pattern="bidir_window", block_size=4, top_k=3, n_heads=4, n_kv_heads=2)}),
}
NAMES = sorted(MIXERS) + sorted(VARIANTS)
# What a non-causal mixer (the `causal` property of layers/attention.py and layers/sparse_attention.py) skips.
DECODING_CHECKS = ("causal", "decode", "state_size")


def mixer_of(name: str) -> str:
    """The registry name of a case (a registered mixer or a VARIANTS entry)."""
    return VARIANTS[name].mixer if name in VARIANTS else name


def configs_of(name: str) -> dict:
    """{config key: instance} a case builds from: the registered small configs, or a variant's."""
    variant = VARIANTS[name].configs if name in VARIANTS else {}
    return {key: variant.get(key, CONFIGS[key].small) for key in MIXERS[mixer_of(name)].configs}


def small_config(**kw) -> ModelConfig:
    """Every registered config at its `small` instance: each mixer builds from this at d_model D."""
    return ModelConfig(**{"d_model": D, "n_layers": 2, **{key: entry.small for key, entry in CONFIGS.items()}, **kw})


def build_case(name: str, **kw) -> nnx.Module:
    """Layer 0 of the small config of case `name` (`kw`: ModelConfig overrides)."""
    return build_mixer(mixer_of(name), small_config(**configs_of(name), **kw), 0, nnx.Rngs(0))


def is_causal(name: str) -> bool:
    """The mixer's own declaration: its `causal` property (mixers without one are causal decoders)."""
    return getattr(case(name).mixer, "causal", True)


def skip_unless(name: str, check: str):
    if check in DECODING_CHECKS and not is_causal(name):
        pytest.skip(f"{name} is non-causal (its `causal` property is False): it has no decoding to check")
    reason = VARIANTS[name].skip.get(check) if name in VARIANTS else None
    reason = reason or MIXERS[mixer_of(name)].skip.get(check)
    if reason is not None:
        pytest.skip(f"{name} declares it cannot pass {check!r}: {reason}")


def state_bytes(state) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _parallel_and_decoded(graphdef, params, rest, x, x_changed, cotangent, *, grad: bool, decode: bool = True):
    """The parallel pass on x and x_changed (one call on both batches: two calls could compile to differently rounded
    programs), the parameters' gradient of <y, cotangent> (where `grad`), and x decoded token by token from the empty
    state (lax.scan: the carry must keep its structure and dtypes; where `decode`)."""
    def parallel(params):
        return nnx.merge(graphdef, params, rest, copy=True)(jnp.concatenate([x, x_changed]))

    if grad:
        y_both, vjp = jax.vjp(parallel, params)
        (grads,) = vjp(jnp.concatenate([cotangent, jnp.zeros_like(cotangent)]).astype(y_both.dtype))
    else:
        y_both, grads = parallel(params), None
    y, y_changed = jnp.split(y_both, 2)
    if not decode:
        return dict(y=y, y_changed=y_changed, grads=grads)
    mixer = nnx.merge(graphdef, params, rest, copy=True)
    init = mixer.init_state(B, T)
    decoded_state, y_tokens = jax.lax.scan(mixer.decode_step, init, x.swapaxes(0, 1))
    return dict(y=y, y_changed=y_changed, tokens=y_tokens.swapaxes(0, 1), init_state=init,
                decoded_state=decoded_state, grads=grads)


def _pieces(mixer, x):
    """Prefill in pieces, then one decode step: the state each piece leaves must carry on exactly."""
    state, ys = mixer.init_state(B, T), []
    for lo, hi in zip(PIECES[:-1], PIECES[1:]):
        state, y_piece = mixer.prefill(state, x[:, lo:hi])
        ys.append(y_piece)
    state, y_last = mixer.decode_step(state, x[:, T - 1])
    return jnp.concatenate([*ys, y_last[:, None]], axis=1), state


@dataclasses.dataclass
class Case:
    mixer: nnx.Module
    split: tuple  # nnx.split(mixer, nnx.Param, ...)
    inputs: tuple  # x, x_changed (token T0 moved), cotangent: [B, T, D] float32


@functools.cache
def case(name: str) -> Case:
    mixer = build_case(name)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    return Case(mixer, nnx.split(mixer, nnx.Param, ...), (x, x.at[:, T0].add(1.0), cotangent))


@functools.cache
def float32(name: str) -> dict:
    """One compile per mixer: the parallel pass, both decodings, and the gradients unless they are slow for it."""
    c = case(name)
    graphdef, params, rest = c.split
    grad = "grad" not in MIXERS[mixer_of(name)].slow
    decode = is_causal(name)

    @jax.jit
    def run(params, x, x_changed, cotangent):
        out = _parallel_and_decoded(graphdef, params, rest, x, x_changed, cotangent, grad=grad, decode=decode)
        if not decode:
            return out
        pieces, pieces_state = _pieces(nnx.merge(graphdef, params, rest, copy=True), x)
        return dict(**out, pieces=pieces, pieces_state=pieces_state)

    return run(params, *c.inputs)


@functools.cache
def bfloat16(name: str) -> dict:
    """Parameters and inputs in bfloat16 (the train step's compute dtype): the parallel pass, its gradients and the
    token-by-token decoding."""
    graphdef, params, rest = case(name).split
    run = jax.jit(functools.partial(_parallel_and_decoded, graphdef, grad=True, decode=is_causal(name)))
    return run(_cast(params, jnp.bfloat16), rest, *(a.astype(jnp.bfloat16) for a in case(name).inputs))


def gradients(name: str) -> list:
    grads = float32(name)["grads"]
    if grads is None:  # slow for this mixer: its own compile
        graphdef, params, rest = case(name).split
        grads = jax.jit(functools.partial(_parallel_and_decoded, graphdef, grad=True, decode=is_causal(name)))(
            params, rest, *case(name).inputs)["grads"]
    return jax.tree.leaves(grads)


def names_for(check: str) -> list:
    """The registry's names, those whose registration defers `check` to the slow tests marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if check in MIXERS[mixer_of(n)].slow else n for n in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_is_a_mixer(name):
    assert isinstance(case(name).mixer, Mixer), f"{name} does not implement layers.axes.Mixer"
    y = float32(name)["y"]
    assert y.shape == (B, T, D) and y.dtype == jnp.float32


@pytest.mark.parametrize("name", names_for("causal"))
def test_causal(name):
    """Changing token T0 changes no output before T0, and does change the output at T0."""
    skip_unless(name, "causal")
    y, y_changed = np.asarray(float32(name)["y"]), np.asarray(float32(name)["y_changed"])
    np.testing.assert_array_equal(y_changed[:, :T0], y[:, :T0], err_msg=f"{name}: a later token changed the past")
    assert rel_err(y_changed[:, T0], y[:, T0]) > 1e-4, f"{name}: token {T0} does not reach its own output"


@pytest.mark.parametrize("name", names_for("causal"))
def test_noncausal_reads_both_ways_and_refuses_to_decode(name):
    """A non-causal mixer: changing token T0 changes an output before T0 (it reads the future) and T0's own; its
    init_state, prefill and decode_step fail with one line naming why."""
    if is_causal(name):
        pytest.skip(f"{name} is causal (test_causal checks it)")
    y, y_changed = np.asarray(float32(name)["y"]), np.asarray(float32(name)["y_changed"])
    assert rel_err(y_changed[:, :T0], y[:, :T0]) > 1e-4, f"{name}: no earlier output reads token {T0}"
    assert rel_err(y_changed[:, T0], y[:, T0]) > 1e-4, f"{name}: token {T0} does not reach its own output"
    mixer, x = case(name).mixer, case(name).inputs[0]
    for call in (lambda: mixer.init_state(B, T), lambda: mixer.prefill({}, x), lambda: mixer.decode_step({}, x[:, 0])):
        with pytest.raises(ValueError) as e:
            call()
        assert "non-causal" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", names_for("decode"))
@pytest.mark.parametrize("path", ["pieces", "tokens"])
def test_decoding_equals_the_parallel_pass(name, path):
    """Prefill in pieces then a decode step (prompts ending inside chunks, windows, segments), and decoding token by
    token from the empty state, give the parallel pass's outputs."""
    skip_unless(name, "decode")
    assert_close(f"{name} {path}", float32(name)[path], float32(name)["y"], rtol=1e-5)


@pytest.mark.parametrize("name", names_for("decode"))
def test_prefill_and_decode_steps_leave_the_same_state(name):
    """After T tokens, the state of the prefill pieces (+ a step) equals that of T decode steps from the empty state."""
    skip_unless(name, "decode")
    out = float32(name)
    a, b = jax.tree.leaves(out["pieces_state"]), jax.tree.leaves(out["decoded_state"])
    assert len(a) == len(b)
    for i, (u, w) in enumerate(zip(a, b)):
        if jnp.issubdtype(u.dtype, jnp.floating):
            assert_close(f"{name} state leaf {i}", u, w, rtol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(u), np.asarray(w), err_msg=f"{name} state leaf {i}")


@pytest.mark.parametrize("name", names_for("state_size"))
def test_state_size_counts_the_decode_state(name):
    """state_size(T) is the bytes of one sequence's decode state after T tokens (with or without the counters the
    batch shares), and grows as registered: linearly (a KV cache, plus any constant part) or not past some length
    (bounded)."""
    skip_unless(name, "state_size")
    mixer, out = case(name).mixer, float32(name)
    init_1 = jax.eval_shape(lambda: mixer.init_state(1, T))
    decoded = out["decoded_state"]
    assert jax.tree.structure(decoded) == jax.tree.structure(out["init_state"])
    per_sequence = state_bytes(decoded) - state_bytes(init_1)  # what a second sequence adds
    # Mixers differ in whether they count the position counters the batch shares (a few int32 scalars): accept
    # anything from what a second sequence adds to what a batch of one holds.
    assert per_sequence <= mixer.state_size(T) <= state_bytes(init_1), \
        f"{name}: state_size({T}) = {mixer.state_size(T)}; the decode state holds {per_sequence} bytes per " \
        f"sequence, {state_bytes(init_1)} for a batch of one"
    if state_growth(mixer_of(name), mixer) == "linear":  # a KV cache, plus any constant part (hip's query block)
        sizes = [mixer.state_size(n) for n in (100, 200, 300)]
        assert sizes[2] - sizes[1] == sizes[1] - sizes[0] > 0, sizes
    else:
        assert mixer.state_size(10**4) == mixer.state_size(10**5) >= mixer.state_size(T) > 0


@pytest.mark.parametrize("name", names_for("grad"))
def test_gradients_reach_every_parameter(name):
    """Under jit, every parameter gets a finite, non-zero gradient."""
    skip_unless(name, "grad")
    grads = gradients(name)
    assert grads, f"{name} has no parameters"
    for i, g in enumerate(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all(), f"{name}: non-finite gradient in parameter {i}"
        assert np.abs(g).max() > 0, f"{name}: zero gradient for parameter {i} of shape {g.shape}"


@pytest.mark.parametrize("name", names_for("bf16"))
def test_bfloat16(name):
    """In bfloat16 the decode state keeps its dtypes through lax.scan, the parallel pass and the decoding stay close
    to float32, and the gradients are bfloat16 and finite."""
    skip_unless(name, "bf16")
    low = bfloat16(name)
    paths = ("y", "tokens") if is_causal(name) else ("y",)  # a non-causal mixer: the parallel pass only
    if is_causal(name):
        assert [a.dtype for a in jax.tree.leaves(low["decoded_state"])] == \
            [a.dtype for a in jax.tree.leaves(low["init_state"])]
    # A case that skips "decode" (its decoding is not the parallel pass) compares its decoding with float32's.
    decodes_parallel = (VARIANTS[name].skip if name in VARIANTS else MIXERS[mixer_of(name)].skip).get("decode") is None
    for path in paths:
        assert low[path].dtype == jnp.bfloat16, f"{name} {path}: {low[path].dtype}"
        # bfloat16 keeps 8 bits of mantissa: a few roundings of 2^-9 through a handful of matmuls and norms.
        expected = float32(name)["y" if decodes_parallel or path == "y" else "tokens"]
        assert_close(f"{name} bf16 {path}", np.asarray(low[path], np.float32), expected, rtol=5e-2)
    for i, g in enumerate(jax.tree.leaves(low["grads"])):
        assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all(), f"{name}: bf16 grad {i}"


@pytest.mark.parametrize("name", names_for("config"))
def test_config_loads_from_yaml_and_bad_keys_fail_in_one_line(name):
    """Each config the mixer reads round-trips through the YAML loader (`model.<key>.<field>=value`: every field's
    type is one the loader reads), and an unknown key fails with one line naming it."""
    from effarch.train.config import ConfigError, load_config, to_dict

    skip_unless(name, "config")
    for key, small in configs_of(name).items():
        overrides = [f"model.{key}.{field}={_yaml(value)}" for field, value in to_dict(small).items()]
        assert getattr(load_config([], overrides).model, key) == small, key
        with pytest.raises(ConfigError) as e:
            load_config([], [f"model.{key}.no_such_field=1"])
        assert str(e.value).startswith(f"model.{key}.no_such_field: unknown key") and "\n" not in str(e.value)


@pytest.mark.parametrize("name", names_for("config"))
def test_a_d_model_the_config_cannot_serve_fails_in_one_line_naming_the_key(name):
    """At d_model 7 (prime: no head count divides it) the mixer builds, or raises a one-line ValueError that names
    one of the config keys it reads (`<key>.field` or `<key>:`), as the user wrote it in model.<key>."""
    skip_unless(name, "config")
    try:
        build_case(name, d_model=7)
    except ValueError as e:
        message, keys = str(e), MIXERS[mixer_of(name)].configs
        assert "\n" not in message and message.startswith(tuple(f"{k}{c}" for k in keys for c in ".:")), \
            f"{name}: {message!r} does not name one of {keys}"


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

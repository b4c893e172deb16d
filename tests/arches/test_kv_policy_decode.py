"""A KV policy given to a model (`DecoderLM.set_kv_policy`): with a budget that covers the context, decoding equals the
full-cache model for every policy and every mixer that takes one; a small budget changes it; unsupported mixers get
one line naming the policy and the mixer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.diffqkv import DiffQKVConfig
from effarch.layers.kv_policies import POLICIES, make_policy
from effarch.layers.moh import MoHConfig
from effarch.layers.sparse_attention import SparseAttentionConfig

B, T, V = 2, 16, 32
FULL = {"window": ["budget=32"], "quest": ["budget=32", "page=4"], "retrieval": ["budget=32"],
        "recycled": ["budget=32", "stride=4"], "tokenselect": ["budget=32", "reuse_cos=0.5"],
        "tidal": ["budget=32", "select_layer=0"], "longheads": ["budget=32", "chunk=4", "train_len=32"],
        "act": [],  # act: no heads calibrated
        "razor": ["budget=32", "top=1"], "duo": ["full=1"]}

MODELS = {
    "attention_gqa": dict(mixers=("attention",), attention=AttentionConfig(n_heads=4, n_kv_heads=2)),
    # duo reads the gates of a model trained with them (tests/layers/test_duo.py: gates other than their init 1)
    "attention_gqa_duo": dict(mixers=("attention",), attention=AttentionConfig(n_heads=4, n_kv_heads=2, duo_gates=True,
                                                                               duo_sink=2, duo_window=4)),
    "moh": dict(mixers=("moh",), moh=MoHConfig(n_heads=4, n_shared=1, top_k=2)),
    "diffqkv": dict(mixers=("diffqkv",), diffqkv=DiffQKVConfig(n_q_heads=4, n_k_heads=2, n_v_heads=2, aug_q_hidden=8)),
    "sparse_attention": dict(mixers=("sparse_attention",), sparse_attention=SparseAttentionConfig(
        pattern="s2", block_size=4, local_blocks=2, vert_stride=2, n_heads=4, n_kv_heads=2)),
}


def model(kind: str, n_layers: int = 1) -> DecoderLM:
    return DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=n_layers, **MODELS[kind]), rngs=nnx.Rngs(0))


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def decoded_logits(m: DecoderLM, toks, n_prompt: int):
    """Logits [B, T - 1, V] for positions 0..T-2: a dense prefill of n_prompt tokens, then one decode step each."""
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state, toks):
        mm = nnx.merge(graphdef, state)
        st, first = mm.prefill(mm.init_state(B, T), toks[:, :n_prompt])
        _, rest = jax.lax.scan(lambda st, t: mm.decode_step(st, t), st, toks[:, n_prompt:-1].T)
        return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)

    return run(state, toks)


@pytest.mark.parametrize("name", list(POLICIES))
def test_full_budget_equals_full_cache_gqa(name, tmp_path):
    m, toks = model("attention_gqa_duo" if name == "duo" else "attention_gqa"), tokens()
    want = m(toks)[:, : T - 1]
    options = FULL[name]
    if name == "razor":  # its retrieval heads: a heads file (effarch heads) for this 1-layer, 4-head model
        (tmp_path / "heads.json").write_text(json.dumps({"scores": [[0.9, 0.0, 0.0, 0.0]]}))
        options = [*options, f"heads={tmp_path / 'heads.json'}"]
    m.set_kv_policy(make_policy(name, options))
    np.testing.assert_allclose(decoded_logits(m, toks, n_prompt=5), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name,options", [
    # The index is built at the prefill, but a budget that covers the context reads every token.
    ("retrieval", ["budget=32", "index=ivf", "nlist=4", "nprobe=1"]),
    # A reused page choice lacks the pages completed since it was made, but a budget that holds them all reads them.
    ("quest", ["budget=32", "page=4", "every=3"])])
def test_approximate_and_reused_selections_at_full_budget_equal_full_cache(name, options):
    m, toks = model("attention_gqa"), tokens()
    want = m(toks)[:, : T - 1]
    m.set_kv_policy(make_policy(name, options))
    np.testing.assert_allclose(decoded_logits(m, toks, n_prompt=5), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", [pytest.param("moh", marks=pytest.mark.slow),
                                  pytest.param("diffqkv", marks=pytest.mark.slow), "sparse_attention"])
def test_full_budget_equals_full_cache_other_mixers(kind):
    m, toks = model(kind), tokens(1)
    if kind == "sparse_attention":
        # The pattern decides prefill; the policy replaces it at decode. A one-token prompt sees only itself under
        # any pattern, so with a full budget the whole run is dense attention with the same weights.
        dense = model("attention_gqa")
        nnx.update(dense, nnx.state(m, nnx.Param))
        want, n_prompt = dense(toks)[:, : T - 1], 1
    else:
        want, n_prompt = m(toks)[:, : T - 1], 5
    m.set_kv_policy(make_policy("quest", FULL["quest"]))
    np.testing.assert_allclose(decoded_logits(m, toks, n_prompt), want, atol=2e-5, rtol=1e-4)


def test_small_budget_changes_decoding_and_dense_layers_do_not():
    m, toks = model("attention_gqa", n_layers=2), tokens(2)
    full = m(toks)[:, : T - 1]
    m.set_kv_policy(make_policy("window", ["budget=6"]))
    small = decoded_logits(m, toks, n_prompt=5)
    np.testing.assert_allclose(small[:, :6], full[:, :6], atol=2e-5, rtol=1e-4)  # up to 6 tokens: all of them
    assert float(jnp.max(jnp.abs(small[:, 8:] - full[:, 8:]))) > 1e-3
    m.set_kv_policy(make_policy("window", ["budget=6", "dense_layers=2"]))  # every layer dense again
    assert m.kv_policy is None
    np.testing.assert_allclose(decoded_logits(m, toks, n_prompt=5), full, atol=2e-5, rtol=1e-4)


def test_tidal_hands_the_selection_to_the_following_layers():
    m, toks = model("attention_gqa", n_layers=3), tokens(3)
    full = m(toks)[:, : T - 1]
    m.set_kv_policy(make_policy("tidal", ["budget=16", "select_layer=1"]))  # 16 >= 16 tokens: everything
    np.testing.assert_allclose(decoded_logits(m, toks, n_prompt=5), full, atol=2e-5, rtol=1e-4)
    m.set_kv_policy(make_policy("tidal", ["budget=3", "select_layer=1"]))

    @nnx.jit
    def one_step(m, toks):
        st, _ = m.prefill(m.init_state(B, T), toks[:, :8])
        return m.decode_step(st, toks[:, 8])[0]

    shared = [np.asarray(s["policy"]["shared"]) for s in one_step(m, toks)]
    np.testing.assert_array_equal(shared[2], shared[1])  # layer 2 read (and passed on) layer 1's selection
    assert not np.array_equal(shared[1], shared[0])
    assert (shared[1] < 9).all()  # positions of the 9 tokens in the cache


def test_unsupported_mixers_name_the_policy_and_the_mixer():
    policy = make_policy("quest", ["budget=32"])
    swa = DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=2, mixers=("sliding_window",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kv policy quest: no layer .* \\(mixers sliding_window\\)"):
        swa.set_kv_policy(policy)
    # A hybrid: the attention layers take the policy, the others decode as before.
    hybrid = DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=2, mixers=("sliding_window", "attention")),
                       rngs=nnx.Rngs(0))
    assert hybrid.set_kv_policy(policy) == [1] and hybrid.kv_policy is policy
    sink = DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=1, mixers=("sparse_attention",),
                                 sparse_attention=SparseAttentionConfig(block_size=4, window=8)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kv policy quest: mixer sparse_attention with pattern sink_window"):
        sink.set_kv_policy(policy)
    topk = DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=1, mixers=("sparse_attention",),
                                 sparse_attention=SparseAttentionConfig(pattern="mean_topk", block_size=4)),
                     rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kv policy quest: mixer sparse_attention with pattern mean_topk chooses"):
        topk.set_kv_policy(policy)
    small = DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=1, mixers=("diffqkv",),
                                  diffqkv=DiffQKVConfig(n_q_heads=4, n_k_heads=1, n_v_heads=2, aug_q_hidden=8)),
                      rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kv policy quest: mixer diffqkv needs n_k_heads == n_v_heads"):
        small.set_kv_policy(policy)

"""`razor` (RazorAttention): the compensation token against a hand computation (the bulk fold of the first decode
step and the one-token fold of the next), equal evicted keys and values give full attention exactly, a full budget or
every head a retrieval head equals the full cache, heads are chosen per KV head, and the heads file's errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.kv_policies import PolicyError, RazorPolicy, make_policy
from effarch.layers.kv_policies.razor import retrieval_heads


def heads_file(tmp_path, scores, name="heads.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"scores": scores}))
    return str(path)


def hand_razor(q, k, v, length, n_sink, n_recent):
    """One query head over one KV head: kept = sinks + recent, D = the rest, compensated as RazorAttention §3.3."""
    d = q.shape[-1]
    kept = [j for j in range(length) if j < n_sink or j >= length - n_recent]
    evicted = [j for j in range(length) if j not in kept]
    logits = [q @ k[j] / np.sqrt(d) for j in kept]
    num = sum(np.exp(s) * v[j] for s, j in zip(logits, kept, strict=True))
    den = sum(np.exp(s) for s in logits)
    if evicted:
        k_hat, v_hat = k[evicted].mean(0), v[evicted].mean(0)
        w = len(evicted) * np.exp(q @ k_hat / np.sqrt(d))
        num, den = num + w * v_hat, den + w
    return num / den


def test_compensation_token_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    S, D = 16, 4
    k = rng.standard_normal((1, S, 1, D)).astype(np.float32)
    v = rng.standard_normal((1, S, 1, D)).astype(np.float32)
    q = rng.standard_normal((1, 1, D)).astype(np.float32)
    p = RazorPolicy(budget=5, n_sink=1, heads=heads_file(tmp_path, [[0.0]]), top=0.0).for_layer(0)
    assert p.n_recent == 3
    state = p.init_state(1, S, 1, D)
    attend = jax.jit(p.attend)  # one compile for both steps (the length is traced)
    # Length 10 (the first decode step after a 9-token prefill): D = {1..6}, six tokens folded at once.
    o, state, reads = attend(state, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(10))
    np.testing.assert_allclose(o[0, 0], hand_razor(q[0, 0], k[0, :, 0], v[0, :, 0], 10, 1, 3), rtol=1e-5)
    assert int(state["done"]) == 7 and float(reads) == 5  # 1 sink + 3 recent + the compensation token
    # Length 11: token 7 leaves the window and joins D (the one-token fold).
    o, state, _ = attend(state, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(11))
    np.testing.assert_allclose(o[0, 0], hand_razor(q[0, 0], k[0, :, 0], v[0, :, 0], 11, 1, 3), rtol=1e-5)
    np.testing.assert_allclose(state["sum_k"][0, 0], k[0, 1:8, 0].sum(0), rtol=1e-5)


def test_equal_evicted_tokens_give_full_attention(tmp_path):
    # Evicted keys and values all equal: the compensation token stands for them exactly.
    rng = np.random.default_rng(1)
    S, D, L = 12, 4, 12
    k = rng.standard_normal((1, S, 1, D)).astype(np.float32)
    v = rng.standard_normal((1, S, 1, D)).astype(np.float32)
    k[0, 2:8], v[0, 2:8] = k[0, 2], v[0, 2]
    q = rng.standard_normal((1, 1, D)).astype(np.float32)
    p = RazorPolicy(budget=7, n_sink=2, heads=heads_file(tmp_path, [[0.0]]), top=0.0).for_layer(0)
    o, _, _ = jax.jit(p.attend)(p.init_state(1, S, 1, D), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                jnp.int32(L))
    s = k[0, :L, 0] @ q[0, 0] / np.sqrt(D)
    want = jax.nn.softmax(s) @ v[0, :L, 0]
    np.testing.assert_allclose(o[0, 0], want, rtol=1e-5)


def test_retrieval_heads_pick_the_top_scores_and_kv_heads_follow(tmp_path):
    scores = [[0.1, 0.9, 0.0, 0.0], [0.5, 0.0, 0.0, 0.3]]
    assert retrieval_heads(scores, 2) == {(0, 1), (1, 0)}
    assert retrieval_heads(scores, 0.25) == {(0, 1), (1, 0)}  # 25% of 8 heads
    p = RazorPolicy(budget=8, heads=heads_file(tmp_path, scores), top=3.0)
    # GQA with 2 KV heads (groups {0, 1}, {2, 3}): layer 0's head 1 makes KV head 0 full; layer 1: heads 0 and 3.
    assert p.for_layer(0).full_kv_heads(4, 2).tolist() == [True, False]
    assert p.for_layer(1).full_kv_heads(4, 2).tolist() == [True, True]


B, T, V = 2, 16, 32


def gqa_model(n_layers=2) -> DecoderLM:
    return DecoderLM(ModelConfig(vocab_size=V, d_model=16, n_layers=n_layers, mixers=("attention",),
                                 attention=AttentionConfig(n_heads=4, n_kv_heads=2)), rngs=nnx.Rngs(0))


def decoded_logits(m: DecoderLM, toks, n_prompt: int):
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state, toks):
        mm = nnx.merge(graphdef, state)
        st, first = mm.prefill(mm.init_state(B, T), toks[:, :n_prompt])
        _, rest = jax.lax.scan(lambda st, t: mm.decode_step(st, t), st, toks[:, n_prompt:-1].T)
        return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)

    return run(state, toks)


@pytest.mark.slow
def test_full_budget_and_all_heads_full_equal_the_full_cache(tmp_path):
    # (The default suite's full-budget case: tests/arches/test_kv_policy_decode.py, every policy.)
    m = gqa_model()
    toks = jnp.asarray(np.random.default_rng(2).integers(0, V, (B, T)), jnp.int32)
    want = m(toks)[:, : T - 1]
    path = heads_file(tmp_path, [[0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    m.set_kv_policy(make_policy("razor", [f"heads={path}", "top=1", f"budget={T}"]))
    np.testing.assert_allclose(decoded_logits(m, toks, 5), want, atol=2e-5, rtol=1e-4)
    m.set_kv_policy(make_policy("razor", [f"heads={path}", "top=8", "budget=4", "n_sink=1"]))  # all 8 heads: full
    np.testing.assert_allclose(decoded_logits(m, toks, 5), want, atol=2e-5, rtol=1e-4)
    m.set_kv_policy(make_policy("razor", [f"heads={path}", "top=0", "budget=4", "n_sink=1"]))  # window heads only
    assert float(jnp.max(jnp.abs(decoded_logits(m, toks, 5)[:, 8:] - want[:, 8:]))) > 1e-3


def test_heads_file_errors(tmp_path):
    with pytest.raises(PolicyError, match="kv policy razor: give heads=PATH"):
        make_policy("razor", [])
    with pytest.raises(PolicyError, match="heads file .*nope.json' does not exist"):
        make_policy("razor", [f"heads={tmp_path / 'nope.json'}"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PolicyError, match="is not a heads file"):
        make_policy("razor", [f"heads={tmp_path / 'bad.json'}"])
    with pytest.raises(PolicyError, match="top must be a fraction"):
        make_policy("razor", [f"heads={heads_file(tmp_path, [[0.0]])}", "top=2.5"])
    m = gqa_model()
    with pytest.raises(ValueError, match="kv policy razor: heads file .* scores 1 layers, the model has 2"):
        m.set_kv_policy(make_policy("razor", [f"heads={heads_file(tmp_path, [[0.0] * 4])}"]))
    with pytest.raises(ValueError, match="has 3 heads for layer 1, whose attention has 4 query heads"):
        m.set_kv_policy(make_policy("razor", [f"heads={heads_file(tmp_path, [[0.0] * 4, [0.0] * 3])}"]))
    assert m.kv_policy is None  # nothing changed


def test_result_file_names_the_heads_file_by_its_path_without_separators(tmp_path):
    from effarch.train.evals.common import result_name

    path = heads_file(tmp_path, [[0.0]], 'run_heads.json')
    p = make_policy("razor", [f"heads={path}", "top=2", "budget=64"])
    name = result_name("passkey", p)
    assert "/" not in name and name.startswith("passkey.kv-razor-budget64-heads") and name.endswith(
        "run_heads.json-top2.0")
    assert str(path).strip("/").replace("/", "_") in name  # two heads files of one stem give two names

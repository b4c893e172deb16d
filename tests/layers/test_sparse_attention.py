"""SparseAttention: each pattern's parallel form is softmax attention over the token set its paper defines, decoding
equals the parallel form for every pattern (the conformance suite decodes the registered sink_window config; the
others run here through its own helpers), sink_window's decode state is flat in the context length, LongLoRA's
lists leak nothing across the sequence ends, S2's heads cover the context together, infer_dense decodes with
full attention, MoA's per-head spans are the elastic rule's token sets at every N, and bad configs and plan files
fail in one line."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.layers import sparse_patterns
from effarch.layers.attention import Attention
from effarch.layers.sparse_attention import PATTERNS, SparseAttention, SparseAttentionConfig
from tests.conformance import test_mixers as conformance
from tests.helpers.numerics import assert_close

B, T, D = conformance.B, conformance.T, conformance.D  # 2, 20, 24: the suite's prompt pieces end inside blocks

SINK = SparseAttentionConfig(pattern="sink_window", block_size=4, n_sink=3, window=6, n_heads=3, n_kv_heads=1)
S2 = SparseAttentionConfig(pattern="s2", block_size=2, local_blocks=2, vert_stride=3, n_heads=4, n_kv_heads=2)
LONGLORA = SparseAttentionConfig(pattern="longlora", block_size=2, group_size=8, n_heads=4, n_kv_heads=2)
MOA = conformance.VARIANTS["sparse_attention[moa]"].configs["sparse_attention"]  # spans 7 and 11 at N = 20


def moa_band(alpha: float, beta: float, n: int, n_sink: int) -> np.ndarray:
    """visible [N, N] of one head under MoA's elastic rule, written out per query: a span of S = α + β·N tokens
    (floored, at least 1, at most N), the sinks first: query t sees min(t + 1, S) keys, the first min(n_sink, S - 1)
    tokens and the newest others."""
    span = min(max(int(np.floor(alpha + beta * n)), 1), n)
    sink = min(n_sink, span - 1)
    visible = np.zeros((n, n), bool)
    for t in range(n):
        keys = set(range(min(sink, t + 1))) | set(range(max(0, t - (span - sink) + 1), t + 1))
        assert len(keys) == min(t + 1, span)
        visible[t, sorted(keys)] = True
    return visible


def make_x(seed=0, t=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D)), jnp.float32)


def token_rule(cfg: SparseAttentionConfig, t: int) -> np.ndarray:
    """visible [H, T, T] for every query head, written from the papers' definitions (no block lists)."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    causal = j <= i
    H, hkv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    kv_head = np.arange(H) // (H // hkv)
    if cfg.pattern == "sink_window":  # StreamingLLM: sinks + the last `window` keys
        return np.broadcast_to(causal & ((i - j < cfg.window) | (j < cfg.n_sink)), (H, t, t))
    if cfg.pattern == "s2":  # dkernel get_sparse_attn_mask: local blocks | (J + h s) % V == 0, h the KV head;
        # the last dense_heads KV heads dense
        bi, bj, step = i // cfg.block_size, j // cfg.block_size, max(1, int(cfg.vert_stride / H))
        return np.stack([causal & ((bi - bj < cfg.local_blocks) | ((bj + h * step) % cfg.vert_stride == 0)
                                   | (h >= hkv - cfg.dense_heads)) for h in kv_head])
    # LongLoRA's flash path: groups [kG, (k+1)G) for the first half of the heads, the groups shifted by G/2 (the
    # first and last G/2 tokens their own groups) for the second half; causal within a group.
    if cfg.pattern == "moa":  # the plan's layer 0, per KV head
        rule = json.loads(Path(cfg.plan).read_text())["layers"][0]
        bands = [moa_band(a, b, t, cfg.n_sink) for a, b in zip(rule["alpha"], rule["beta"], strict=True)]
        return np.stack([bands[h] for h in kv_head])
    G = cfg.group_size
    plain, shifted = causal & (i // G == j // G), causal & ((i + G // 2) // G == (j + G // 2) // G)
    return np.stack([plain if h < H // 2 else shifted for h in range(H)])


def dense_masked(layer: SparseAttention, x, visible):
    """Softmax attention of the layer's q, k, v over `visible` [H, T, T]: the truth for its parallel form."""
    q, k, v = layer.project_qkv(x, jnp.arange(x.shape[1]))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("BTHK,BSHK->BHTS", q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(jnp.asarray(visible)[None], s, -jnp.inf), axis=-1)
    o = jnp.einsum("BHTS,BSHK->BTHK", p, v)
    return layer.o_proj(o.reshape(*o.shape[:2], -1))


@pytest.mark.parametrize("cfg", [SINK, S2, LONGLORA, dataclasses.replace(LONGLORA, n_kv_heads=1),
                                 dataclasses.replace(S2, n_heads=6, n_kv_heads=6, dense_heads=2, vert_stride=4),
                                 dataclasses.replace(SINK, n_sink=0, window=5, block_size=3), MOA],
                         ids=["sink_window", "s2", "longlora", "longlora_mqa", "s2_dense_heads", "window_only", "moa"])
def test_parallel_form_is_attention_over_the_papers_token_set(cfg):
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x()
    y, expected = jax.jit(lambda x: (layer(x), dense_masked(layer, x, token_rule(cfg, T))))(x)
    assert_close(cfg.pattern, y, expected, 1e-5)


def test_cache_position_sinks_are_streamingllm_scoring_written_out():
    """sink_positions="cache": query t sees its window at true positions and the sinks outside the window from its
    position in StreamingLLM's cache, min(t, n_sink + window - 1) (§3.2); written out per (query, key) here. Below
    that position the layer is the true-position one."""
    from effarch.layers.rope import apply_rope

    cfg = dataclasses.replace(SINK, sink_positions="cache", n_heads=4, n_kv_heads=2)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    x = make_x()
    t_cache = cfg.n_sink + cfg.window - 1
    _, k, v, q_raw, _ = layer.project_qkv_raw(x, jnp.arange(T))
    freqs = layer.rope_frequencies()
    rep = q_raw.shape[2] // k.shape[2]
    k, v = np.asarray(jnp.repeat(k, rep, axis=2)), np.asarray(jnp.repeat(v, rep, axis=2))
    o = np.zeros(q_raw.shape[:3] + (v.shape[-1],), np.float32)
    for t in range(T):
        q_true = np.asarray(apply_rope(q_raw[:, t:t + 1], jnp.array([t]), freqs=freqs))[:, 0]
        q_cache = np.asarray(apply_rope(q_raw[:, t:t + 1], jnp.array([min(t, t_cache)]), freqs=freqs))[:, 0]
        keys = [j for j in range(t + 1) if j > t - cfg.window or j < cfg.n_sink]
        s = np.stack([np.einsum("bhk,bhk->bh", q_true if j > t - cfg.window else q_cache, k[:, j]) for j in keys], -1)
        p = np.exp(s / np.sqrt(q_raw.shape[-1]) - (s / np.sqrt(q_raw.shape[-1])).max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o[:, t] = np.einsum("bhj,bjhd->bhd", p, v[:, keys])
    expected = layer.o_proj(jnp.asarray(o).reshape(B, T, -1))
    y, y_true = jax.jit(lambda x: (layer(x), SparseAttention(D, dataclasses.replace(cfg, sink_positions="text"),
                                                                 rngs=nnx.Rngs(0))(x)))(x)
    assert_close("cache-position sinks", y, expected, 1e-5)
    np.testing.assert_allclose(y[:, :t_cache + 1], y_true[:, :t_cache + 1], atol=1e-6)
    assert not np.allclose(y[:, t_cache + 1:], y_true[:, t_cache + 1:], atol=1e-4)


def write_plan(path, alphas, betas, **extra):
    """A plan file with one layer of (alpha, beta) per KV head."""
    path.write_text(json.dumps({"layers": [{"alpha": list(alphas), "beta": list(betas)}], **extra}))
    return str(path)


@pytest.mark.parametrize("alpha, beta, n, n_sink, block", [
    (0, 0.25, 64, 4, 8),      # proportional: 16 tokens
    (-16, 0.5, 50, 3, 8),     # negative alpha, N not a multiple of the block
    (3, 0.0, 40, 8, 4),       # a span shorter than the sinks: S - 1 sinks and the query's own key
    pytest.param(12, 0.0, 37, 0, 5, marks=pytest.mark.slow),    # fixed span, no sinks, odd blocks
    pytest.param(-100, 0.1, 30, 2, 4, marks=pytest.mark.slow),  # a negative span: clipped to 1 (the own key)
    pytest.param(10, 1.0, 24, 4, 6, marks=pytest.mark.slow),    # longer than N: dense causal attention
])
def test_moa_layout_is_the_elastic_band(alpha, beta, n, n_sink, block):
    """moa_spans' window / sinks through the op's predicates, restricted to moa_blocks' lists (the reference path's
    visible mask), give exactly the band of MoA's rule; the lists visit no block without a visible key."""
    from effarch.pallas_kernels.block_sparse.reference import visible_mask

    _, window, sink = sparse_patterns.moa_spans([alpha, 0.0], [beta, 0.5], n, n_sink)
    nb = -(-n // block)
    allowed = sparse_patterns.moa_blocks(nb, nb, block=block, window=window, n_sink=sink)
    idx, cnt = sparse_patterns.block_lists(allowed)
    vis = np.asarray(visible_mask(jnp.asarray(idx)[None], jnp.asarray(cnt)[None], n_q_heads=2, n_kv_heads=2,
                                  q_len=n, kv_len=n, q_block=block, kv_block=block, window=tuple(window),
                                  n_sink=tuple(sink)))[0]
    np.testing.assert_array_equal(vis[0], moa_band(alpha, beta, n, n_sink))
    np.testing.assert_array_equal(vis[1], moa_band(0.0, 0.5, n, n_sink))
    pad = nb * block - n
    pooled = np.pad(vis, ((0, 0), (0, pad), (0, pad))).reshape(2, nb, block, nb, block).any((2, 4))
    np.testing.assert_array_equal(allowed, pooled)  # tight: every listed block holds a visible key


def test_moa_span_follows_the_sequence_length(tmp_path):
    """The same layer at two lengths: S(N) = α + β·N grows with N (the parallel form's N is the call's T)."""
    cfg = dataclasses.replace(MOA, plan=write_plan(tmp_path / "p.json", [4, 2], [0.0, 0.5]))
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    assert layer.moa_spans(20)[0].tolist() == [4, 12] and layer.moa_spans(40)[0].tolist() == [4, 22]
    for t in (13, 20):
        x = make_x(t=t)
        visible = np.stack([moa_band(4, 0.0, t, 2)] * 2 + [moa_band(2, 0.5, t, 2)] * 2)
        y, expected = jax.jit(lambda x: (layer(x), dense_masked(layer, x, visible)))(x)  # noqa: B023
        assert_close(f"moa T={t}", y, expected, 1e-5)


def test_s2_heads_together_cover_every_earlier_block():
    """With n_q_heads >= vert_stride (head step 1), any vert_stride consecutive heads read disjoint stride residues
    whose union is every causal block (the paper's heterogeneous context sharding); one head alone does not."""
    V, n = 4, 12
    allowed = sparse_patterns.s2_blocks(n, n, n_kv_heads=8, n_q_heads=8, local_blocks=1, vert_stride=V)
    causal = np.tril(np.ones((n, n), bool))
    for h in range(8 - V + 1):
        np.testing.assert_array_equal(allowed[h:h + V].any(0), causal)
    assert not (allowed[0] == causal).all()
    strided = allowed & ~np.eye(n, dtype=bool)[None]  # off the local band (local_blocks = 1: the diagonal)
    assert (strided[:V].sum(0) <= 1).all(), "two heads read the same off-band block"


def test_s2_strides_are_kv_cache_friendly():
    """Absolute strides: a block that one query block of a head does not read, no later query block reads (dkernel's
    is_kv_cache_efficient), so decoding may drop a block once it leaves the local band off the stride."""
    allowed = sparse_patterns.s2_blocks(16, 16, n_kv_heads=2, n_q_heads=4, local_blocks=3, vert_stride=4)
    earlier = np.arange(16)[None, :] < np.arange(15)[:, None]  # [qi, J]: J before query block qi
    assert (allowed[:, 1:] <= allowed[:, :-1] | ~earlier[None]).all()
    assert (allowed[:, 1:] != allowed[:, :-1]).any()


def test_longlora_leaks_nothing_across_the_sequence_ends():
    """LongLoRA's token roll lets the shifted heads' first tokens see the last ones; the block-diagonal lists do not:
    changing the last token changes no earlier output."""
    layer = SparseAttention(D, LONGLORA, rngs=nnx.Rngs(0))
    x = make_x(t=16)
    y, y_changed = jax.jit(lambda a, b: (layer(a), layer(b)))(x, x.at[:, -1].add(3.0))
    np.testing.assert_array_equal(np.asarray(y_changed[:, :-1]), np.asarray(y[:, :-1]))


def test_a_pattern_covering_the_sequence_is_the_attention_layer():
    """sink_window with window >= T, on an Attention layer's weights, is that layer's causal attention."""
    dense = Attention(D, SINK.attention_config(), rngs=nnx.Rngs(0))
    layer = SparseAttention(D, dataclasses.replace(SINK, window=T), rngs=nnx.Rngs(1))
    nnx.update(layer, nnx.state(dense, nnx.Param))
    x = make_x()
    assert_close("window >= T", jax.jit(layer)(x), jax.jit(dense)(x), 1e-5)


def decoded(cfg: SparseAttentionConfig) -> dict:
    """The conformance suite's jitted pieces (prefill in pieces + a decode step) and token-by-token decoding."""
    graphdef, params, rest = nnx.split(SparseAttention(D, cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    x = make_x()

    @jax.jit
    def run(params, x):
        out = conformance._parallel_and_decoded(graphdef, params, rest, x, x, x, grad=False)
        mixer = nnx.merge(graphdef, params, rest, copy=True)
        pieces, _ = conformance._pieces(mixer, x)
        _, whole = mixer.prefill(mixer.init_state(B, T), x)  # one prompt longer than n_sink + window
        return out["y"], out["tokens"], pieces, whole

    return dict(zip(("y", "tokens", "pieces", "whole"), run(params, x)))


# s2 and longlora decode through one path (Attention's KV cache, a list per token): longlora represents it in the
# default run; sink_window's bounded cache is in the conformance suite at the registered config.
@pytest.mark.parametrize("cfg", [
    LONGLORA,
    pytest.param(S2, marks=pytest.mark.slow),
    pytest.param(SINK, marks=pytest.mark.slow),
    pytest.param(dataclasses.replace(SINK, n_sink=0, window=5, block_size=3), marks=pytest.mark.slow),
    pytest.param(dataclasses.replace(SINK, n_sink=6, window=9, block_size=4), marks=pytest.mark.slow),
], ids=["longlora", "s2", "sink_window", "window_only", "sinks_over_blocks"])
def test_decoding_equals_the_parallel_pass(cfg):
    """Prefill in the suite's pieces then a step, token-by-token decoding, and one whole-prompt prefill."""
    out = decoded(cfg)
    for path in ("pieces", "tokens", "whole"):
        assert_close(f"{cfg.pattern} {path}", out[path], out["y"], 1e-5)


def test_sink_window_prefills_a_prompt_longer_than_sinks_and_window():
    """A prompt from position 0 holds its own sinks (the suite's first prompt piece is shorter than the window)."""
    layer = SparseAttention(D, dataclasses.replace(SINK, n_sink=5), rngs=nnx.Rngs(0))
    x = make_x()

    @jax.jit
    def run(x):
        return layer.prefill(layer.init_state(B, T), x)[1], layer(x)

    whole, y = run(x)
    assert_close("whole prompt", whole, y, 1e-5)


def test_infer_dense_decodes_with_full_attention_on_the_same_weights():
    cfg = dataclasses.replace(LONGLORA, infer_dense=True)
    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    dense = Attention(D, cfg.attention_config(), rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(layer, nnx.Param))
    x = make_x()

    @jax.jit
    def run(x):
        _, y = layer.prefill(layer.init_state(B, T), x)
        return y, dense(x), layer(x)

    y, y_dense, y_sparse = run(x)
    assert_close("infer_dense prefill", y, y_dense, 1e-5)
    assert float(jnp.max(jnp.abs(y_sparse - y_dense))) > 1e-3  # the training form is sparse


def test_sink_window_decode_state_is_flat_in_the_context_length():
    layer = SparseAttention(D, SINK, rngs=nnx.Rngs(0))
    shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(lambda: layer.init_state(B, n)))
              for n in (16, 10**6)]
    assert shapes[0] == shapes[1]
    assert layer.state_size(10**6) == layer.state_size(100) == 2 * (3 + 6) * 1 * 8 * 4
    # One decode step far into a sequence (position 10^6) has the shapes, hence the work, of one at position 8.
    x_t = make_x()[:, 0]
    state = layer.init_state(B, 0)
    far = {**state, "ring": state["ring"]._replace(pos=jnp.asarray(10**6, jnp.int32))}
    steps = [jax.make_jaxpr(layer.decode_step)(s, x_t) for s in (state, far)]
    assert str(steps[0]) == str(steps[1])


@pytest.mark.parametrize("cfg, growth", [(SINK, "bounded"), (S2, "linear"), (LONGLORA, "linear"),
                                          (dataclasses.replace(SINK, infer_dense=True), "linear")],
                         ids=["sink_window", "s2", "longlora", "sink_window_infer_dense"])
def test_registry_state_growth_follows_the_pattern(cfg, growth):
    """sink_window decodes over a bounded cache; s2, longlora and infer_dense over a KV cache that grows with the
    context: the registry (which the conformance suite's state_size check reads) says so per built layer."""
    from effarch.arches.registry import state_growth

    layer = SparseAttention(D, cfg, rngs=nnx.Rngs(0))
    assert state_growth("sparse_attention", layer) == growth
    if growth == "linear":
        assert layer.state_size(200) == 2 * layer.state_size(100) > 0
    else:
        assert layer.state_size(10**5) == layer.state_size(10**4) > 0


@pytest.mark.parametrize("override, message", [
    ("pattern=moe", f"pattern: expected one of {list(PATTERNS)}, got 'moe'"),
    ("pattern=moa", "sparse_attention.plan: pattern moa needs a plan file"),
    ("block_size=0", "block_size must be positive"),
    ("vert_stride=1", "vert_stride must be >= 2"),
    ("n_sink=-1", "n_sink must be >= 0"),
    ("sink_positions=both", "sink_positions: expected one of ['text', 'cache'], got 'both'"),
    ("pattern=s2 sink_positions=cache", "sink_positions='cache' applies to pattern sink_window, not s2"),
    ("n_kv_heads=3", "n_kv_heads=3 must divide n_heads=4"),
])
def test_bad_config_fails_in_one_line(override, message):
    from effarch.train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config([], [f"model.sparse_attention.{o}" for o in override.split()])
    assert message in str(e.value) and "\n" not in str(e.value) and "sparse_attention" in str(e.value)


@pytest.mark.parametrize("fields, message", [
    (dict(group_size=8, block_size=3), "block_size=3 must divide group_size / 2"),
    (dict(group_size=7, block_size=1), "group_size=7 must be even"),
    (dict(n_heads=3, group_size=8, block_size=2), "n_heads=3 must be even for longlora"),
])
def test_longlora_config_errors(fields, message):
    with pytest.raises(ValueError, match="^sparse_attention.") as e:
        SparseAttentionConfig(pattern="longlora", **fields)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"layers": [', "not valid JSON (line 1 column"),
    ("[1, 2]", "expected a JSON object with a 'layers' key"),
    ('{"alpha": [1]}', "missing key 'layers'"),
    ('{"layers": [{"alpha": [1, 2]}]}', "layers[0]: missing key 'beta'"),
    ('{"layers": [{"alpha": [1, 2], "beta": [0.5, "x"]}]}', "layers[0].beta: expected a non-empty list"),
    ('{"layers": [{"alpha": [1, 2], "beta": [0.5]}]}', "layers[0]: alpha has 2 heads but beta has 1"),
    ('{"layers": [{"alpha": [1, 2, 3], "beta": [0, 0, 0]}]}', "layers[0].alpha has 3 heads but the layer has 2 KV"),
    ('{"layers": [null]}', "layers[0] is null, but layer 0 is a sparse_attention layer"),
    ('{"layers": [{"alpha": [1, 2], "beta": [0, -1]}]}', "layers[0].beta: expected numbers >= 0"),
    ('{"format": "other", "layers": []}', "format: expected 'effarch-moa-plan'"),
])
def test_bad_plan_files_fail_in_one_line_naming_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as e:
        SparseAttention(D, dataclasses.replace(MOA, plan=str(path)), rngs=nnx.Rngs(0))
    text = str(e.value)
    assert text.startswith(f"sparse_attention.plan: {path}: ") and message in text and "\n" not in text, text


def test_a_plan_for_another_depth_fails_in_one_line(tmp_path):
    """Built in a model, the plan's layer count must be the model's (the registry passes layer_idx and n_layers)."""
    from effarch.arches.lm import DecoderLM, ModelConfig

    plan = write_plan(tmp_path / "plan.json", [4, 2], [0.0, 0.5])
    cfg = ModelConfig(vocab_size=11, d_model=D, n_layers=2, mixers=("sparse_attention",),
                      sparse_attention=dataclasses.replace(MOA, plan=plan))
    with pytest.raises(ValueError, match=r"^sparse_attention.plan: .*plan.json: layers has 1 entries but the model "
                                         r"has 2 layers$"):
        DecoderLM(cfg, rngs=nnx.Rngs(0))

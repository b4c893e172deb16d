"""Turn a trained softmax-attention decoder into a block-sparse one (`sparse_attention`, layers/sparse_attention.py).

`SparseAttention` subclasses `Attention`: the q/k/v/o projections sit at the same paths with the same shapes, so
every weight is reused as is and only the config changes. This is how a trained attention run is evaluated or
fine-tuned with a static sparse pattern: StreamingLLM's sinks + window on a model trained dense (arXiv 2309.17453),
LongLoRA's S²-Attn for long-context fine-tuning (arXiv 2309.12307 §3.2), or an S2-Attention layout (arXiv
2407.17678), whose hybrid keeps some layers dense (`dense_every`), or MoA's per-head elastic spans from a plan that
`effarch moa-search` found for this model (arXiv 2406.14909; `plan=PATH`). The dynamic patterns convert too:
`pattern=mean_topk` (no parameters) and `pattern=seer`, which adds fresh gates next to the kept attention weights
(SeerAttention trains them on the frozen model: `distill=true`, then `distill=false` with top_k / density /
gate_threshold evaluates the sparse model on the trained gates); `pattern=routing` adds fresh k-means centroids (a
trained buffer, layers/trained_state.py, which training then updates), `pattern=hyper` nothing (its LSH
directions are a seeded constant) and `pattern=hip` nothing (HiP's search is training-free). Converting back to
attention drops a policy's state. The non-causal patterns (`biformer`, which adds a fresh LCE convolution when
`biformer_lce` is set, and `bidir_window`) convert from a non-causal attention run (`model.attention.causal: false`)
and back to one; a causal run and a non-causal pattern (or the reverse) is a one-line error.

Usage (the `effarch convert RUN OUT --to sparse_attention pattern=... [key=value ...]` CLI reads and writes run
directories around this):

    from effarch.arches.convert_sparse_attention import convert_to_sparse_attention
    cfg2, params2 = convert_to_sparse_attention(model_cfg, params, pattern="sink_window", n_sink=4, window=1024)

A pattern that lists every causal key for the sequence length (e.g. sink_window with window >= T) reproduces the
attention model's logits (tests/arches/test_convert_sparse_attention.py).

A model whose layers are already `sparse_attention` (and none `attention`) converts too: the options given replace
those of `model.sparse_attention`, the others (the pattern included) are kept. This evaluates the same weights with
another pattern, e.g. a sink_window run without its sinks (`effarch convert RUN OUT --to sparse_attention n_sink=0`).

The way back, `convert_to_attention` (`effarch convert RUN OUT --to attention`), makes every sparse_attention layer
dense attention on the same weights: LongLoRA trains with S²-Attn and infers (and is evaluated) with full attention
(arXiv 2309.12307 §3.2), which `infer_dense` gives for decoding only; after this conversion the parallel form, hence
`effarch eval RUN perplexity`, is full attention too.
"""

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers import moa_plan
from effarch.layers.rope import ROPE_SCALING_FIELDS
from effarch.layers.sparse_attention import NONCAUSAL_PATTERNS, PATTERNS
from effarch.layers.trained_state import SAVED


def sparse_attention_config_from_attention(
    cfg: ModelConfig, *, pattern: str | None = None, block_size: int | None = None, n_sink: int | None = None,
    window: int | None = None, local_blocks: int | None = None, vert_stride: int | None = None,
    dense_heads: int | None = None, group_size: int | None = None, infer_dense: bool | None = None,
    plan: str | None = None, dense_every: int = 0, implementation: str | None = None, top_k: int | None = None,
    density: float | None = None, sink_blocks: int | None = None, score_reduce: str | None = None,
    gate_dim: int | None = None, distill: bool | None = None, gate_loss_scale: float | None = None,
    gate_threshold: float | None = None, seed: int = 0, routing_clusters: int | None = None,
    routing_local_heads: int | None = None, routing_decay: float | None = None,
    routing_commitment: float | None = None, hyper_lsh_bits: int | None = None, hyper_samples: int | None = None,
    hyper_min_seq_len: int | None = None, hyper_seed: int | None = None, sink_positions: str | None = None,
    hip_representative: str | None = None, hip_query_block: int | None = None,
    biformer_lce: int | None = None, biformer_routing: str | None = None,
) -> ModelConfig:
    """The sparse ModelConfig: "attention" layers become "sparse_attention" with the attention layer's heads and
    RoPE; the pattern options not given keep the values of `cfg.sparse_attention` (the SparseAttentionConfig
    defaults unless the source config set them). A model with sparse_attention layers and no attention layer keeps
    its layers and gets the options given (pattern and implementation included: those not given are kept).

    Args:
      cfg: the attention model's config; its attention layers must be self attention, causal for a causal pattern and
        non-causal for a non-causal one.
      pattern, block_size, n_sink, window, local_blocks, vert_stride, dense_heads, group_size, infer_dense,
        implementation, top_k, density, sink_blocks, score_reduce, gate_dim, distill, gate_loss_scale,
        gate_threshold, sink_positions, routing_*, hyper_*, hip_*, biformer_lce, biformer_routing:
        SparseAttentionConfig's fields of the same names (pattern None: "sink_window" for an attention model, the
        source's own for a sparse one). A field left None keeps its value, so density and gate_threshold can be set
        here but not cleared (write the config for that).
      seed: initialises the parameters a dynamic pattern adds (`convert_to_sparse_attention`); unused here.
      plan: moa's plan file; the config keeps its absolute path, so the converted run finds it from any directory
        (the plan must stay there). Without n_sink, moa takes the plan's own `n_sink` (the sinks it was searched
        with), when the plan records one.
      dense_every: 0 converts every attention layer; k > 0 keeps layer l dense when (l + 1) % k == 0 (k = 2: the
        S2-Attention hybrid of Phi-3-small, layers 1, 3, 5, ... dense).
    """
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"convert to sparse_attention: pattern must be one of {list(PATTERNS)}, got {pattern!r}")
    to_sparse = "attention" not in cfg.mixers and "sparse_attention" in cfg.mixers  # a sparse model's options
    if plan is not None:
        plan = str(Path(plan).resolve())
        effective = pattern or (cfg.sparse_attention.pattern if to_sparse else "sink_window")
        if effective == "moa" and n_sink is None:
            try:
                n_sink = moa_plan.read_plan(plan).get("n_sink")
            except moa_plan.PlanError as e:
                raise ValueError(f"plan: {e}") from None
    del seed
    given = dict(pattern=pattern, block_size=block_size, n_sink=n_sink, window=window, local_blocks=local_blocks,
                 vert_stride=vert_stride, dense_heads=dense_heads, group_size=group_size, infer_dense=infer_dense,
                 plan=plan, top_k=top_k, density=density, sink_blocks=sink_blocks, score_reduce=score_reduce,
                 gate_dim=gate_dim, distill=distill, gate_loss_scale=gate_loss_scale, gate_threshold=gate_threshold,
                 routing_clusters=routing_clusters, routing_local_heads=routing_local_heads,
                 routing_decay=routing_decay, routing_commitment=routing_commitment, hyper_lsh_bits=hyper_lsh_bits,
                 hyper_samples=hyper_samples, hyper_min_seq_len=hyper_min_seq_len, hyper_seed=hyper_seed,
                 sink_positions=sink_positions, hip_representative=hip_representative,
                 hip_query_block=hip_query_block, biformer_lce=biformer_lce, biformer_routing=biformer_routing)
    if to_sparse:
        if dense_every:
            raise ValueError(f"convert to sparse_attention: dense_every={dense_every} needs attention layers; "
                             f"model.mixers {list(cfg.mixers)} has none")
        given["implementation"] = implementation
        sparse = dataclasses.replace(cfg.sparse_attention, **{k: v for k, v in given.items() if v is not None})
        old = cfg.sparse_attention.pattern
        if _causal(sparse.pattern) != _causal(old):
            raise ValueError(f"convert to sparse_attention: pattern {sparse.pattern} is {_kind(sparse.pattern)} but "
                             f"the run's pattern {old} is {_kind(old)}; weights trained one way do not read the other")
        return dataclasses.replace(cfg, sparse_attention=sparse)
    if "attention" not in cfg.mixers:
        raise ValueError(f"convert to sparse_attention: model.mixers {list(cfg.mixers)} has no 'attention' layer "
                         "(nor a 'sparse_attention' layer to change)")
    given["pattern"] = pattern or "sink_window"
    att = cfg.attention
    if att.causal != _causal(given["pattern"]):  # a causal decoder to a causal pattern, a non-causal model to another
        raise ValueError(f"convert to sparse_attention: pattern {given['pattern']} is {_kind(given['pattern'])} but "
                         f"model.attention.causal is {str(att.causal).lower()}; non-causal patterns "
                         f"{list(NONCAUSAL_PATTERNS)} take a non-causal attention run, the others a causal one")
    if dense_every < 0:
        raise ValueError(f"convert to sparse_attention: dense_every must be >= 0, got {dense_every}")
    sparse = dataclasses.replace(
        cfg.sparse_attention, **{k: v for k, v in given.items() if v is not None}, implementation=implementation,
        n_heads=att.n_heads, n_kv_heads=att.n_kv_heads, head_dim=att.head_dim, rope=att.rope,
        rope_theta=att.rope_theta, **{f: getattr(att, f) for f in ROPE_SCALING_FIELDS})
    if dense_every:  # written out per layer: which layers stay dense depends on the depth
        mixers = tuple("sparse_attention" if m == "attention" and (i + 1) % dense_every else m
                       for i, m in enumerate(cfg.layer_mixers()))
    else:
        mixers = tuple("sparse_attention" if m == "attention" else m for m in cfg.mixers)
    if "sparse_attention" not in mixers:
        raise ValueError(f"convert to sparse_attention: dense_every={dense_every} keeps every attention layer dense")
    return dataclasses.replace(cfg, mixers=mixers, sparse_attention=sparse)


def _causal(pattern: str) -> bool:
    return pattern not in NONCAUSAL_PATTERNS


def _kind(pattern: str) -> str:
    return "causal" if _causal(pattern) else "non-causal"


def convert_to_sparse_attention(cfg: ModelConfig, params: nnx.State | dict, **options) -> tuple[ModelConfig,
                                                                                                nnx.State | dict]:
    """(sparse model config, parameters) from an attention model's (config, parameters).

    Args:
      cfg: the attention model's ModelConfig.
      params: its parameters, an nnx.State of nnx.Param or the equivalent pure dict.
      **options: see sparse_attention_config_from_attention.

    Returns:
      (config, params): the params in the form they came in, every array the source's, plus the fresh parameters
      of a dynamic pattern's policy (a seer gate: `...mixer/policy/...`, initialised as the layer does with
      nnx.Rngs(options' seed, default 0)) and its fresh trained buffers (routing's centroids,
      layers/trained_state.py: saved like parameters); policy state the new pattern has no place for (a seer gate
      converted to another pattern) is dropped. Raises ValueError naming the first path whose shape differs from
      what the sparse model expects.
    """
    new_cfg = sparse_attention_config_from_attention(cfg, **options)
    given = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    abstract = nnx.eval_shape(lambda: DecoderLM(new_cfg, rngs=nnx.Rngs(0)))
    expected = _paths(nnx.to_pure_dict(nnx.state(abstract, SAVED)))
    have = _paths(given)
    added = [p for p in expected if p not in have and _is_policy(p)]
    dropped = [p for p in have if p not in expected and _is_policy(p)]
    out = {p: v for p, v in have.items() if p not in dropped}
    if added:
        seed = options.get("seed", 0)

        def fresh():  # under jit only the policy's initialisers survive: the rest of the model is never built
            model = DecoderLM(new_cfg, rngs=nnx.Rngs(seed))
            return nnx.to_pure_dict(nnx.state(model, nnx.All(SAVED, nnx.PathContains("policy"))))

        new = _paths(jax.jit(fresh)())
        out.update({p: new[p] for p in added})
    out = _unflatten(out)
    _check_shapes(new_cfg, out, "sparse")
    return new_cfg, _like(params, abstract, out)


def _like(params: nnx.State | dict, abstract: DecoderLM, out: dict) -> nnx.State | dict:
    """`out` (a pure dict) in the form `params` came in: an nnx.State with the new model's variable types (a
    parameter, or a trained buffer), or the pure dict."""
    if isinstance(params, nnx.State):
        state = nnx.state(abstract, SAVED)
        nnx.replace_by_pure_dict(state, out)
        return state
    return out


def _paths(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """{path tuple: leaf} of a nested dict."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_paths(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _is_policy(path: tuple) -> bool:
    return "policy" in path


def _check_shapes(new_cfg: ModelConfig, params: nnx.State | dict, target: str) -> None:
    """ValueError naming the first parameter path whose shape differs from what `new_cfg`'s model expects."""
    abstract = nnx.eval_shape(lambda: DecoderLM(new_cfg, rngs=nnx.Rngs(0)))
    expected = nnx.to_pure_dict(nnx.state(abstract, SAVED))
    given = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    want = dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda x: tuple(x.shape), expected))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda x: tuple(x.shape), given))[0])
    for path in sorted(set(want) | set(got), key=str):
        if want.get(path) != got.get(path):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} is {got.get(path)} in the checkpoint but the "
                             f"{target} model needs {want.get(path)}; is `cfg` the checkpoint's model config?")


def attention_config_from_sparse_attention(cfg: ModelConfig) -> ModelConfig:
    """The dense ModelConfig: "sparse_attention" layers become "attention" with the sparse layer's heads and RoPE.
    Dense attention layers already in the model (an S2 hybrid) must have the same heads and RoPE, since one
    `model.attention` configures them all."""
    if "sparse_attention" not in cfg.mixers:
        raise ValueError(f"convert to attention: model.mixers {list(cfg.mixers)} has no 'sparse_attention' layer")
    sp = cfg.sparse_attention
    fields = ("n_heads", "n_kv_heads", "head_dim", "rope", "rope_theta", *ROPE_SCALING_FIELDS)
    causal = _causal(sp.pattern)  # a non-causal pattern becomes non-causal attention
    att = dataclasses.replace(cfg.attention, causal=causal, **{f: getattr(sp, f) for f in fields})
    if "attention" in cfg.mixers:
        differ = [f for f in fields if getattr(cfg.attention, f) != getattr(sp, f)]
        if differ or cfg.attention.causal != causal:
            raise ValueError(f"convert to attention: the model's dense attention layers differ from its sparse ones "
                             f"in {differ or ['causal']}; one model.attention cannot hold both")
        att = cfg.attention
    mixers = tuple("attention" if m == "sparse_attention" else m for m in cfg.mixers)
    return dataclasses.replace(cfg, mixers=mixers, attention=att)


def convert_to_attention(cfg: ModelConfig, params: nnx.State | dict) -> tuple[ModelConfig, nnx.State | dict]:
    """(attention model config, parameters) from a sparse_attention model's: the inverse of
    convert_to_sparse_attention. `SparseAttention` is `Attention` with a pattern, so the weights are reused as they
    are; the model's logits become those of full causal attention (LongLoRA's inference), or of full non-causal
    attention for a non-causal pattern (biformer, bidir_window)."""
    new_cfg = attention_config_from_sparse_attention(cfg)
    given = _paths(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    if any(_is_policy(p) for p in given):  # a dynamic pattern's policy state has no place in attention: dropped
        abstract = nnx.eval_shape(lambda: DecoderLM(new_cfg, rngs=nnx.Rngs(0)))
        params = _like(params, abstract, _unflatten({p: v for p, v in given.items() if not _is_policy(p)}))
    _check_shapes(new_cfg, params, "attention")
    return new_cfg, jax.tree.map(lambda x: x, params)

"""Conversion of a trained softmax-attention LM into a DiffQKV LM (Sigma, arXiv 2501.13629) for continue-training.

`convert_attention_to_diffqkv(cfg, params, n_k_heads=..., n_v_heads=...)` turns every "attention" layer of a
`DecoderLM` into a "diffqkv" layer and returns the new `ModelConfig` and parameter state; every weight is reused.

- Query heads, q_proj and o_proj are kept as they are (n_q = the baseline's n_heads, head dims unchanged).
- K heads are merged by mean-pooling groups of consecutive baseline KV heads: new K head j is the mean of baseline
  heads j*g ... j*g+g-1, g = Hkv / n_k. Query head i read baseline head floor(i * Hkv / Hq), which lies in group
  floor(i * n_k / Hq) = the K head DiffQKV gives it, so each query keeps a key built from its own.
- V heads follow the same rule (mean-pooled when n_v < Hkv; the default keeps them, n_v = Hkv).
- A head count above Hkv repeats heads instead (exact: a query head reads the copy of the head it read before).
- AugQ and K compression are off: they would add freshly initialised weights, so the converted model would no
  longer start from the baseline's function. With n_k = n_v = Hkv the converted model reproduces the baseline's
  logits exactly (tests/arches/test_convert_diffqkv.py).

The parameter state is the `nnx.Param` part of `nnx.split(model, nnx.Param, ...)`, as saved by train/checkpoint.py.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.diffqkv import DiffQKVConfig
from effarch.layers.rope import ROPE_SCALING_FIELDS


def regroup_heads(w: Float[Array, "D F"], n_from: int, n_to: int) -> Float[Array, "D G"]:
    """Maps a projection with n_from heads (columns grouped [n_from, head_dim]) to n_to heads.

    n_to < n_from: head j is the mean of heads j*g ... j*g+g-1 (g = n_from / n_to); n_to > n_from: head i is a copy
    of head floor(i * n_from / n_to); n_to == n_from: unchanged.
    """
    D, F = w.shape
    head_dim = F // n_from
    heads = w.reshape(D, n_from, head_dim)
    if n_to <= n_from:
        if n_from % n_to:
            raise ValueError(f"cannot mean-pool {n_from} heads into {n_to}: {n_to} must divide {n_from}")
        return heads.reshape(D, n_to, n_from // n_to, head_dim).mean(axis=2).reshape(D, n_to * head_dim)
    if n_to % n_from:
        raise ValueError(f"cannot repeat {n_from} heads into {n_to}: {n_from} must divide {n_to}")
    return jnp.repeat(heads, n_to // n_from, axis=1).reshape(D, n_to * head_dim)


def diffqkv_model_config(
    cfg: ModelConfig, *, n_k_heads: int | None = None, n_v_heads: int | None = None
) -> ModelConfig:
    """The DiffQKV `ModelConfig` that `convert_attention_to_diffqkv` produces (None keeps the baseline's KV heads)."""
    if "attention" not in cfg.mixers:
        raise ValueError(f"convert to diffqkv: the model has no 'attention' layer (mixers={list(cfg.mixers)})")
    att = cfg.attention
    if not att.causal:
        raise ValueError("convert to diffqkv: attention.causal must be True (DiffQKV is a causal decoder mixer)")
    n_kv = att.kv_heads
    diffqkv = DiffQKVConfig(
        n_q_heads=att.n_heads,
        n_k_heads=n_kv if n_k_heads is None else n_k_heads,
        n_v_heads=n_kv if n_v_heads is None else n_v_heads,
        head_dim=att.head_dim,
        aug_q=False,
        rope=att.rope,
        rope_theta=att.rope_theta,
        **{f: getattr(att, f) for f in ROPE_SCALING_FIELDS},
        implementation=cfg.diffqkv.implementation,
    )
    for name, n in (("n_k_heads", diffqkv.n_k_heads), ("n_v_heads", diffqkv.n_v_heads)):
        if n % n_kv and n_kv % n:
            raise ValueError(f"convert to diffqkv: {name}={n} must divide or be a multiple of the baseline's {n_kv}"
                             " KV heads")
    mixers = tuple("diffqkv" if m == "attention" else m for m in cfg.mixers)
    return dataclasses.replace(cfg, mixers=mixers, diffqkv=diffqkv)


def convert_attention_to_diffqkv(
    cfg: ModelConfig, params: nnx.State, *, n_k_heads: int | None = None, n_v_heads: int | None = None
) -> tuple[ModelConfig, nnx.State]:
    """Baseline attention LM (config, params) -> DiffQKV LM (config, params), reusing every weight.

    Args:
      cfg: the baseline's ModelConfig; its "attention" layers are converted, other mixers are copied.
      params: the baseline's nnx.Param state (nested like DecoderLM).
      n_k_heads: K heads of the DiffQKV layers; must divide (mean-pool) or be a multiple of (repeat) the baseline's
        KV heads. None keeps them.
      n_v_heads: V heads, the same rule. None keeps them.

    Returns:
      (DiffQKV ModelConfig, its nnx.Param state), ready for nnx.merge with a DecoderLM built from that config.
    """
    new_cfg = diffqkv_model_config(cfg, n_k_heads=n_k_heads, n_v_heads=n_v_heads)
    n_kv = cfg.attention.kv_heads
    new_heads = {"k_proj": new_cfg.diffqkv.n_k_heads, "v_proj": new_cfg.diffqkv.n_v_heads}
    converted = {i for i, m in enumerate(cfg.layer_mixers()) if m == "attention"}
    _, abstract_params, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(new_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    old = nnx.to_pure_dict(params)

    def fill(template, source, path):
        if isinstance(template, dict):
            missing = set(template) - set(source)
            if missing:
                raise ValueError(f"convert to diffqkv: params lack {'/'.join(map(str, path))}/{sorted(missing)}")
            return {key: fill(template[key], source[key], (*path, key)) for key in template}
        value = source
        if len(path) >= 4 and path[0] == "blocks" and path[1] in converted and path[3] in new_heads:
            value = regroup_heads(value, n_kv, new_heads[path[3]])
        if value.shape != template.shape:
            raise ValueError(f"convert to diffqkv: {'/'.join(map(str, path))} has shape {value.shape}, the DiffQKV"
                             f" model needs {template.shape}")
        return jnp.asarray(value, template.dtype)

    new_params = abstract_params
    nnx.replace_by_pure_dict(new_params, fill(nnx.to_pure_dict(abstract_params), old, ()))
    return new_cfg, new_params

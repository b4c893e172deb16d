"""Turn a trained softmax-attention decoder into a MoH decoder for continue-tuning (MoH-LLaMA3 recipe).

MoH paper §4.4 / SkyworkAI/MoH@66bb340 MoH-LLaMA3: a pretrained model's attention layers become MoH layers with
the parameter-free router (layers/moh.py): routed-head logits are the query-head norms, the gates are
binary with a straight-through gradient, so there are no new weights and every baseline weight is reused as is.
`MoHAttention` subclasses `Attention`, so its q/k/v/o parameters sit at the same paths with the same shapes.

Usage (the `effarch convert` CLI reads and writes run directories around this):

    from effarch.arches.convert_moh import convert_to_moh
    moh_cfg, moh_params = convert_to_moh(model_cfg, params)                  # 50% shared, 75% active heads
    moh_cfg, moh_params = convert_to_moh(model_cfg, params, top_k=...)       # choose the routed heads per token
    model = DecoderLM(moh_cfg, rngs=nnx.Rngs(0)); nnx.update(model, moh_params)

`params` is the baseline's parameter state, `nnx.state(model, nnx.Param)` or `nnx.to_pure_dict` of it; the result
has the same form. With top_k = n_heads - n_shared every head is active and the MoH model's logits equal the baseline's.
"""

import dataclasses

import jax
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.moh import MoHConfig
from effarch.layers.rope import ROPE_SCALING_FIELDS


def moh_config_from_attention(cfg: ModelConfig, *, n_shared: int | None = None, top_k: int | None = None,
                              paper_scaling: bool = False, implementation: str | None = None) -> ModelConfig:
    """The MoH ModelConfig: every "attention" mixer becomes "moh" with the attention layer's heads and RoPE.

    Args:
      cfg: the baseline's model config; its attention layers must be causal self attention.
      n_shared: always-active heads; None = n_heads // 2 (MoH-LLaMA3: 16 of 32).
      top_k: routed heads per token; None = half of the routed heads, at least 1 (MoH-LLaMA3: 8 of 16).
      paper_scaling: MoHConfig.paper_scaling (it only changes the load-balance loss for this router).
      implementation: MoHConfig.implementation ("sparse" computes only the active heads).
    """
    if "attention" not in cfg.mixers:
        raise ValueError(f"convert_to_moh: model.mixers {list(cfg.mixers)} has no 'attention' layer to convert")
    att = cfg.attention
    if not att.causal:
        raise ValueError("convert_to_moh: model.attention.causal must be True (MoH routes a causal decoder)")
    n_shared = att.n_heads // 2 if n_shared is None else n_shared
    top_k = max(1, (att.n_heads - n_shared) // 2) if top_k is None else top_k
    moh = MoHConfig(n_heads=att.n_heads, n_shared=n_shared, top_k=top_k, router="parameter_free",
                    paper_scaling=paper_scaling, n_kv_heads=att.n_kv_heads, head_dim=att.head_dim, rope=att.rope,
                    rope_theta=att.rope_theta, implementation=implementation,
                    **{f: getattr(att, f) for f in ROPE_SCALING_FIELDS})
    mixers = tuple("moh" if m == "attention" else m for m in cfg.mixers)
    return dataclasses.replace(cfg, mixers=mixers, moh=moh)


def _shapes(tree) -> dict:
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def convert_to_moh(cfg: ModelConfig, params: nnx.State | dict, **moh_options) -> tuple[ModelConfig, nnx.State | dict]:
    """(MoH model config, parameters) from a baseline attention model's (config, parameters).

    Args:
      cfg: the baseline ModelConfig.
      params: its parameters, an nnx.State of nnx.Param or the equivalent pure dict.
      **moh_options: n_shared, top_k, paper_scaling, implementation (see moh_config_from_attention).

    Returns:
      (config, params): the params in the form they came in, every array the baseline's (the parameter-free router
      adds none). Raises ValueError naming the first path whose shape differs from what the MoH model expects.
    """
    moh_cfg = moh_config_from_attention(cfg, **moh_options)
    abstract = nnx.eval_shape(lambda: DecoderLM(moh_cfg, rngs=nnx.Rngs(0)))
    expected = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    given = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    want = dict(jax.tree_util.tree_flatten_with_path(_shapes(expected))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(_shapes(given))[0])
    for path in sorted(set(want) | set(got), key=str):
        if want.get(path) != got.get(path):
            name = jax.tree_util.keystr(path)
            raise ValueError(f"convert_to_moh: parameter {name} is {got.get(path)} in the checkpoint but the MoH "
                             f"model needs {want.get(path)}; is `cfg` the checkpoint's model config?")
    return moh_cfg, jax.tree.map(lambda x: x, params)

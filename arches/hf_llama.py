"""Hugging Face Llama <-> effarch baseline attention model: the config and parameter mappings (pure; no I/O).

A `LlamaForCausalLM` checkpoint is the `DecoderLM` of arches/lm.py with every layer an `attention` mixer: RMSNorm
pre-norms (`rms_norm_eps`), SwiGLU MLP (`intermediate_size`), RoPE with the checkpoint's theta and, for Llama 3.1+,
the "llama3" frequency scaling, GQA (`num_key_value_heads`), explicit `head_dim`, tied or untied LM head. Reading
and writing files (safetensors, run directories) is train/hf.py.

Reference: huggingface/transformers, src/transformers/models/llama/modeling_llama.py and
modeling_rope_utils.py::_compute_llama3_parameters. Both config.json forms are read: transformers 4.x's
`rope_theta` + `rope_scaling`, and 5.x's `rope_parameters`; export writes the 4.x form, which 5.x also reads.

Choices:
- Anything that would change the computation and that this model does not have (another architecture, biases,
  an activation other than SiLU, rope_scaling other than llama3, partial rotary, quantization) is refused with one
  line naming the config.json field, rather than imported approximately.
- Fields that do not change the logits (token ids, max_position_embeddings, initializer_range, dtype, use_cache,
  attention_dropout at inference, pretraining_tp, which only splits the same matmuls) are ignored.
- HF Linear weights are [out, in]; NNX kernels are [in, out], hence the transposes. q/k head layout is the same
  rotate-half layout on both sides (HF checkpoints are already permuted from Meta's interleaved one).
"""

from collections.abc import Mapping

import numpy as np

from effarch.arches.lm import ModelConfig
from effarch.layers.attention import AttentionConfig
from effarch.layers.mlp import MLPConfig

ARCHITECTURE = "LlamaForCausalLM"
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved; recomputed from theta


class HFConfigError(ValueError):
    """A Hugging Face config.json or checkpoint that effarch cannot import exactly; the message names the field."""


def _field(hf: Mapping, key: str, kind: type, default=None):
    value = hf.get(key)
    if value is None:  # absent, or written as null (transformers writes head_dim: null)
        value = default
    if value is None:
        raise HFConfigError(f"config.json: {key}: missing")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise HFConfigError(f"config.json: {key}: expected a positive integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise HFConfigError(f"config.json: {key}: expected a positive number, got {value!r}")
    return value


def _rope(hf: Mapping) -> dict:
    """AttentionConfig rope fields from either config.json form."""
    if hf.get("rope_parameters") is not None:
        where, rp = "rope_parameters", dict(hf["rope_parameters"])
    else:
        where, rp = "rope_scaling", dict(hf.get("rope_scaling") or {})
    if any(isinstance(v, Mapping) for v in rp.values()):
        raise HFConfigError(f"config.json: {where}: per-layer-type RoPE parameters are not supported")
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise HFConfigError(f"config.json: rope_theta: expected a positive number, got {theta!r}")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFConfigError(f"config.json: partial_rotary_factor: only 1.0 (full rotary) is supported, got {partial!r}")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    out = {"rope": True, "rope_theta": float(theta)}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise HFConfigError(f"config.json: {where}.rope_type: {rope_type!r} is not supported; "
                            "effarch imports 'default' and 'llama3'")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        _field(rp, key, float)
    # transformers' fallbacks: the context length in the config, whose LlamaConfig default is 2048.
    original = rp.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    _field({"original_max_position_embeddings": original}, "original_max_position_embeddings", int)
    return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(rp["factor"]),
            "rope_low_freq_factor": float(rp["low_freq_factor"]),
            "rope_high_freq_factor": float(rp["high_freq_factor"]), "rope_original_max_len": int(original)}


def model_config_from_hf(hf: Mapping) -> ModelConfig:
    """The effarch ModelConfig of a Llama config.json (as a dict); HFConfigError names any unsupported field."""
    archs = hf.get("architectures")
    if archs is not None and list(archs) != [ARCHITECTURE]:
        raise HFConfigError(f"config.json: architectures: {archs} is not supported; effarch imports [{ARCHITECTURE!r}]")
    if hf.get("model_type", "llama") != "llama":
        raise HFConfigError(f"config.json: model_type: {hf['model_type']!r} is not supported; effarch imports 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"config.json: hidden_act: {hf['hidden_act']!r} is not supported; Llama's MLP uses 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise HFConfigError(f"config.json: {flag}: true is not supported (the baseline model has no biases)")
    if hf.get("quantization_config") is not None:
        raise HFConfigError("config.json: quantization_config: quantized checkpoints are not supported")
    d_model = _field(hf, "hidden_size", int)
    n_heads = _field(hf, "num_attention_heads", int)
    n_kv = _field(hf, "num_key_value_heads", int, n_heads)
    if n_heads % n_kv:
        raise HFConfigError(f"config.json: num_key_value_heads: {n_kv} must divide num_attention_heads={n_heads}")
    head_dim = _field(hf, "head_dim", int, d_model // n_heads if d_model >= n_heads else None)
    if head_dim % 2:
        raise HFConfigError(f"config.json: head_dim: RoPE needs an even head_dim, got {head_dim}")
    eps = _field(hf, "rms_norm_eps", float, 1e-6)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise HFConfigError(f"config.json: tie_word_embeddings: expected true or false, got {tie!r}")
    attention = AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, causal=True, **_rope(hf))
    n_layers = _field(hf, "num_hidden_layers", int)
    return ModelConfig(
        vocab_size=_field(hf, "vocab_size", int),
        d_model=d_model,
        n_layers=n_layers,
        mixers=("attention",),
        mlp=MLPConfig(kind="swiglu", hidden=_field(hf, "intermediate_size", int)),
        norm="rms",
        norm_eps=float(eps),
        tie_embeddings=tie,
        attention=attention,
    )


def check_exportable(cfg: ModelConfig) -> None:
    """Raises HFConfigError naming the model config field that a Llama checkpoint cannot express."""
    if set(cfg.layer_mixers()) != {"attention"}:
        raise HFConfigError(f"model.mixers: {list(cfg.mixers)}: only all-'attention' models export to Llama")
    if cfg.mlp.kind != "swiglu":
        raise HFConfigError(f"model.mlp.kind: {cfg.mlp.kind!r}: Llama's MLP is 'swiglu'")
    if cfg.norm != "rms":
        raise HFConfigError(f"model.norm: {cfg.norm!r}: Llama's norm is 'rms'")
    if not cfg.attention.rope or not cfg.attention.causal:
        raise HFConfigError("model.attention: Llama needs rope: true and causal: true")


def _head_dim(cfg: ModelConfig) -> int:
    a = cfg.attention
    return a.head_dim if a.head_dim is not None else cfg.d_model // a.n_heads


def hf_config_from_model(cfg: ModelConfig, *, max_position_embeddings: int | None = None) -> dict:
    """config.json (transformers 4.x form, which 5.x also reads) of an exportable model config.

    `max_position_embeddings` does not change the logits; by default it is 2048, or for llama3 scaling the original
    context times the scaling factor.
    """
    check_exportable(cfg)
    a = cfg.attention
    rope_scaling = None
    if a.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": a.rope_scaling_factor,
                        "low_freq_factor": a.rope_low_freq_factor, "high_freq_factor": a.rope_high_freq_factor,
                        "original_max_position_embeddings": a.rope_original_max_len}
    if max_position_embeddings is None:
        max_position_embeddings = (int(a.rope_original_max_len * a.rope_scaling_factor) if rope_scaling else 2048)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp.hidden_size(cfg.d_model),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": _head_dim(cfg),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": a.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# (HF name template, path in the effarch param tree, transpose) for one decoder layer.
_LAYER = (
    ("model.layers.{i}.input_layernorm.weight", ("norm1", "scale"), False),
    ("model.layers.{i}.self_attn.q_proj.weight", ("mixer", "q_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.k_proj.weight", ("mixer", "k_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.v_proj.weight", ("mixer", "v_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.o_proj.weight", ("mixer", "o_proj", "kernel"), True),
    ("model.layers.{i}.post_attention_layernorm.weight", ("norm2", "scale"), False),
    ("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate", "kernel"), True),
    ("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up", "kernel"), True),
    ("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down", "kernel"), True),
)


def _name_map(cfg: ModelConfig) -> list[tuple[str, tuple, bool]]:
    """Every (HF tensor name, effarch param path, transpose) of the model."""
    out = [("model.embed_tokens.weight", ("embed", "embedding"), False), ("model.norm.weight", ("norm", "scale"),
                                                                           False)]
    for i in range(cfg.n_layers):
        out += [(name.format(i=i), ("blocks", i, *path), t) for name, path, t in _LAYER]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("head", "kernel"), True))
    return out


def hf_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor of the Llama checkpoint of `cfg`."""
    check_exportable(cfg)
    D, V, F, K = cfg.d_model, cfg.vocab_size, cfg.mlp.hidden_size(cfg.d_model), _head_dim(cfg)
    H, Hkv = cfg.attention.n_heads, cfg.attention.kv_heads
    per_layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "q_proj": (H * K, D),
                 "k_proj": (Hkv * K, D), "v_proj": (Hkv * K, D), "o_proj": (D, H * K), "gate_proj": (F, D),
                 "up_proj": (F, D), "down_proj": (D, F)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for name, _, _ in _name_map(cfg):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".")[-2]]
    return {name: shapes[name] for name, _, _ in _name_map(cfg)}


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The effarch param tree (a pure dict, as `nnx.to_pure_dict(nnx.state(model, nnx.Param))`) in float32.

    Raises HFConfigError for a missing tensor, a tensor of the wrong shape, or a tensor this model has no place for.
    """
    expected = hf_param_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise HFConfigError(f"checkpoint: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    extra = [n for n in tensors if n not in expected and not n.endswith(_IGNORED_TENSOR_SUFFIXES)
             and not (n == "lm_head.weight" and cfg.tie_embeddings)]
    if extra:
        raise HFConfigError(f"checkpoint: unexpected tensor(s) {extra[:4]} for this config.json "
                            "(biases, extra modules or a different architecture?)")
    tree: dict = {}
    for name, path, transpose in _name_map(cfg):
        value = np.asarray(tensors[name])
        if value.shape != expected[name]:
            raise HFConfigError(f"checkpoint: tensor {name} has shape {value.shape}; config.json implies "
                                f"{expected[name]}")
        value = np.ascontiguousarray((value.T if transpose else value).astype(np.float32))
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def params_to_hf(params: Mapping, cfg: ModelConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF tensors (name -> [out, in] array in `dtype`) from an effarch param tree (pure dict)."""
    out = {}
    for name, path, transpose in _name_map(cfg):
        node = params
        for key in path:
            node = node[key]
        value = np.asarray(node, dtype=np.float32)
        out[name] = np.ascontiguousarray((value.T if transpose else value).astype(dtype))
    return out

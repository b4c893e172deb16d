"""LoRA fine-tuning (`train.lora`): the run's model with adapters, which parameters train, and the merge for export.

- `build_model(cfg, rngs)` is the model of a run: `DecoderLM(cfg.model)`, then, with `train.lora`, adapters on the
  linear layers whose kernel paths `lora.targets` match (layers/lora.py). The base weights are drawn first from
  `rngs`, so they are those of the same config without LoRA; the adapters' A come after them. Everything that builds
  a run's model to restore its checkpoint (training, `effarch generate` / `eval`, export, conversion) builds it here,
  so a LoRA run's checkpoint (base weights + adapters) restores like any other.
- `lora_frozen_paths`: with `train.lora`, every parameter that is not an adapter (`nnx.LoRAParam`) and that no
  `lora.train_also` regex matches is frozen: no update and no optimizer state (train/train.py's `train.freeze`
  mechanism, which it joins). LongLoRA's LoRA+ (arXiv 2309.12307, §3.3) is `train_also: ["^embed/", "norm"]`.
- `merged(cfg, model)`: the adapters folded into their kernels (W + alpha/rank · A B) and `train.lora` dropped from the
  config: a plain model of the same architecture. `effarch export-hf` and `effarch convert` write this.
"""

import dataclasses
import re

import jax
from flax import nnx

from effarch.arches.lm import DecoderLM
from effarch.layers.lora import add_lora, merge_lora
from effarch.train import param_tree
from effarch.train.config import Config, ConfigError


def build_model(cfg: Config, rngs: nnx.Rngs) -> DecoderLM:
    """The run's model: `cfg.model`, with `cfg.train.lora`'s adapters when set. ValueError naming a target regex that
    matches no linear layer."""
    model = DecoderLM(cfg.model, rngs=rngs)
    lora = cfg.train.lora
    if lora is not None:
        add_lora(model, lora.rank, lora.alpha, lora.targets, rngs=rngs)
    return model


def check_lora(cfg: Config) -> None:
    """ConfigError (one line, naming the key) for a `lora.targets` regex that matches no linear layer or a
    `lora.train_also` regex that matches no parameter; builds the model abstractly (nothing is allocated)."""
    if cfg.train.lora is None:
        return
    try:
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    except ValueError as e:
        msg = str(e)  # "targets: ..." names the key
        raise ConfigError(f"train.lora.{msg}" if msg.startswith("targets:") else f"train.lora: {msg}") from None
    paths = param_tree.flatten(nnx.state(abstract, nnx.Param))
    for pattern in cfg.train.lora.train_also:
        if not any(re.search(pattern, p) for p in paths):
            raise ConfigError(f"train.lora.train_also: {pattern!r} matches no parameter path (they are e.g. "
                              f"{', '.join(list(paths)[:3])})")


def lora_frozen_paths(cfg: Config, abstract_params) -> set[str]:
    """With `train.lora`: the paths of the base parameters that `lora.train_also` does not name (empty without)."""
    lora = cfg.train.lora
    if lora is None:
        return set()
    patterns = [re.compile(p) for p in lora.train_also]
    frozen = set()
    for keypath, var in jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=param_tree.is_variable):
        path = param_tree.path_str(keypath)
        if not isinstance(var, nnx.LoRAParam) and not any(p.search(path) for p in patterns):
            frozen.add(path)
    return frozen


def merged(cfg: Config, model: DecoderLM) -> tuple[Config, DecoderLM]:
    """(cfg without `train.lora`, model with every adapter folded into its kernel), the model changed in place."""
    merge_lora(model)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=None)), model


def merged_conversion(config, params):
    """`effarch convert RUN OUT --to merged`: the model unchanged; loading the run (train/convert.py) has already
    merged its adapters, so OUT is the plain model that `train.init_from` and `effarch generate` read."""
    return config, params

"""Turn a trained run into another architecture's run: `effarch convert RUN_DIR OUT_DIR --to NAME [key=value ...]`.

A conversion is a pure function of the model (in `arches/convert_<name>.py`):
`(ModelConfig, params: nnx.State, **options) -> (ModelConfig, params: nnx.State)`. This module does the run
directory I/O around it: read the source run's config and newest checkpoint, convert, and write OUT_DIR as a
normal run directory at step 0 (resolved config.yaml with the new model, a checkpoint with the parameters, a fresh
optimizer state and RNG). OUT_DIR is then what `effarch train CONFIG train.init_from=OUT_DIR` fine-tunes from and
what `effarch generate OUT_DIR` samples from.

A LoRA run (`train.lora`) is read with its adapters merged into the kernels (train/lora.py), so every conversion
starts from the plain model and OUT_DIR has no `train.lora`; `--to merged` converts nothing else.
"""

import dataclasses
import importlib
import inspect
import json
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from effarch.arches.lm import ModelConfig
from effarch.layers.trained_state import SAVED
from effarch.train.checkpoint import Checkpointer
from effarch.train.config import Config, ConfigError, config_from_dict, to_dict
from effarch.train.generate import load_run
from effarch.train.lora import merged
from effarch.train.run_dir import checkpoint_steps, prepare_run_dir

# --to NAME -> "module:function" of a conversion in arches/.
CONVERSIONS = {
    "moh": "effarch.arches.convert_moh:convert_to_moh",
    "diffqkv": "effarch.arches.convert_diffqkv:convert_attention_to_diffqkv",
    "sparse_attention": "effarch.arches.convert_sparse_attention:convert_to_sparse_attention",
    "attention": "effarch.arches.convert_sparse_attention:convert_to_attention",  # sparse_attention back to dense
    "merged": "effarch.train.lora:merged_conversion",  # the same model, a LoRA run's adapters merged
    "duo_hard": "effarch.arches.convert_duo:harden_duo_gates",  # DuoAttention's gates set to 0 / 1 as deployed
}
# Where a conversion passes its options on (**options), the function whose keyword arguments they are.
OPTIONS_OF = {"moh": "effarch.arches.convert_moh:moh_config_from_attention",
              "sparse_attention": "effarch.arches.convert_sparse_attention:sparse_attention_config_from_attention"}


def _function(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def conversion_options(to: str) -> dict[str, object]:
    """{option: its type annotation} of conversion `to`: the keyword arguments after (config, params)."""
    fn = _function(OPTIONS_OF.get(to, CONVERSIONS[to]))
    hints = typing.get_type_hints(fn)
    return {name: hints.get(name, object) for name, p in inspect.signature(fn).parameters.items()
            if p.kind == p.KEYWORD_ONLY}


def _fits(value, annotation) -> bool:
    """Whether a YAML-parsed option value is of the annotated type (int | None, bool, str | None, float, ...)."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)
    for kind in kinds:
        if kind is object or (kind is type(None) and value is None):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if isinstance(kind, type) and isinstance(value, kind) and not (isinstance(value, bool) and kind is int):
            return True
    return False


def _type_name(annotation) -> str:
    return " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in (
        typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)))


def parse_options(to: str, overrides: list[str]) -> dict:
    """`key=value` options of conversion `to` (values parsed as YAML scalars), each checked against the function's
    keyword arguments and their types; ConfigError names an unknown option or a value of the wrong type."""
    import yaml

    known = conversion_options(to)
    options = {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"convert option {o!r}: expected key=value")
        k, v = o.split("=", 1)
        if k not in known:
            raise ConfigError(f"convert --to {to}: unknown option {k!r}; its options are {', '.join(known) or 'none'}")
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError:
            value = v  # not a YAML scalar: a string, which the type check below names
        if not _fits(value, known[k]):
            raise ConfigError(f"convert --to {to}: {k}: expected {_type_name(known[k])}, got {v!r}")
        options[k] = value
    return options


def load_run_params(run_dir: str | Path) -> tuple[Config, nnx.State]:
    """(resolved config, parameters of the newest complete checkpoint) of a training run directory, with its trained
    buffers (layers/trained_state.py: what a checkpoint saves). A LoRA run's adapters come merged into their
    kernels, and its config without `train.lora` (train/lora.py)."""
    cfg, model = merged(*load_run(run_dir))
    return cfg, nnx.state(model, SAVED)


def write_run(cfg: Config, params: nnx.State, run_dir: str | Path, *, info: dict | None = None) -> Path:
    """Writes `run_dir` as a run at step 0 holding `params` (an nnx.State of the model's parameters): config.yaml,
    run_info.json (plus `info`), and a full checkpoint with the run's own fresh optimizer state and RNG, so that
    `effarch generate`, `train.init_from` and a resume of `run_dir` itself all read it. No random initialisation
    of the model happens (the parameters may be those of a large imported model)."""
    from effarch.train.train import Trainer  # the optimizer and shardings exactly as training builds them

    run_dir = Path(run_dir)
    if checkpoint_steps(run_dir) or (run_dir / "config.yaml").exists():
        raise ConfigError(f"run dir {str(run_dir)!r} already holds a run; choose a new directory")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir), init_from=None))
    prepare_run_dir(cfg, run_dir)
    if info:
        info_path = run_dir / "run_info.json"
        info_path.write_text(json.dumps({**json.loads(info_path.read_text()), **info}, indent=2) + "\n")
    trainer = Trainer(cfg)
    params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), params, trainer.param_sharding)
    rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.train.seed + 1)), trainer.replicated)  # as init_state
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    ckpt.save(0, params, trainer.init_optimizer(params), rng, {"step": 0, "data_position": 0, "seed": cfg.train.seed})
    ckpt.close()
    return run_dir


def convert_run(src: str | Path, out: str | Path, to: str, overrides: list[str] = ()) -> Path:
    """Converts run `src` into a `to` model written as run `out`. `overrides` are `key=value` options of the
    conversion function (parsed as YAML scalars)."""
    if to not in CONVERSIONS:
        raise ConfigError(f"--to: unknown conversion {to!r}; choose from {sorted(CONVERSIONS)}")
    fn = _function(CONVERSIONS[to])
    options = parse_options(to, list(overrides))  # before the source run is read
    cfg, params = load_run_params(src)
    try:
        model_cfg, new_params = fn(cfg.model, params, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"convert --to {to}: {e}") from None
    assert isinstance(model_cfg, ModelConfig)
    new_cfg = config_from_dict({**to_dict(cfg), "model": to_dict(model_cfg)})
    return write_run(new_cfg, new_params, out)

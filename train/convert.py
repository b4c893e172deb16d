"""Turn a trained run into another architecture's run: `effarch convert RUN_DIR OUT_DIR --to NAME [key=value ...]`.

A conversion is a pure function of the model (in `arches/convert_<name>.py`):
`(ModelConfig, params: nnx.State, **options) -> (ModelConfig, params: nnx.State)`. This module does the run
directory I/O around it: read the source run's config and newest checkpoint, convert, and write OUT_DIR as a
normal run directory at step 0 (resolved config.yaml with the new model, a checkpoint with the parameters, a fresh
optimizer state and RNG). OUT_DIR is then what `effarch train CONFIG train.init_from=OUT_DIR` fine-tunes from and
what `effarch generate OUT_DIR` samples from.
"""

import dataclasses
import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from effarch.arches.lm import ModelConfig
from effarch.train.checkpoint import Checkpointer
from effarch.train.config import Config, ConfigError, config_from_dict, to_dict
from effarch.train.generate import load_run
from effarch.train.run_dir import checkpoint_steps, prepare_run_dir

# --to NAME -> "module:function" of a conversion in arches/.
CONVERSIONS = {
    "moh": "effarch.arches.convert_moh:convert_to_moh",
    "diffqkv": "effarch.arches.convert_diffqkv:convert_attention_to_diffqkv",
}


def load_run_params(run_dir: str | Path) -> tuple[Config, nnx.State]:
    """(resolved config, parameters of the newest complete checkpoint) of a training run directory."""
    cfg, model = load_run(run_dir)
    return cfg, nnx.state(model, nnx.Param)


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
    module, name = CONVERSIONS[to].split(":")
    fn = getattr(importlib.import_module(module), name)
    cfg, params = load_run_params(src)
    options = {}
    import yaml

    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"convert option {o!r}: expected key=value")
        k, v = o.split("=", 1)
        options[k] = yaml.safe_load(v)
    try:
        model_cfg, new_params = fn(cfg.model, params, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"convert --to {to}: {e}") from None
    assert isinstance(model_cfg, ModelConfig)
    new_cfg = config_from_dict({**to_dict(cfg), "model": to_dict(model_cfg)})
    return write_run(new_cfg, new_params, out)

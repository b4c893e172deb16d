"""Hugging Face Llama checkpoints in and out: `effarch import-hf PATH RUN_DIR` and `effarch export-hf RUN_DIR PATH`.

- Reading needs only `safetensors` (numpy API) and numpy: no torch. bfloat16 tensors are read through ml_dtypes
  (a jax dependency) and converted to float32, the dtype of effarch's master parameters.
- A checkpoint is a directory with config.json and either model.safetensors or a sharded
  model.safetensors.index.json (its weight_map names the shard of every tensor).
- import-hf writes a run directory exactly as `effarch train` would have at step 0: config.yaml (the resolved
  Config, whose model section is the Llama model), run_info.json, and an Orbax checkpoint at step 0 written by
  train/checkpoint.py with the params, a fresh optimizer state of the run's optimizer, the RNG and the metadata.
  So `effarch generate RUN_DIR`, a resume of RUN_DIR itself, and anything that restores params from a run
  directory through train/checkpoint.py read it.
- The tokenizer: a checkpoint with a tokenizer.json (the `tokenizers` library's file, what Llama-family checkpoints
  ship) has it and its tokenizer_config.json / special_tokens_map.json copied into RUN_DIR/tokenizer/, and the
  written config trains and generates with it (`data.task: text`, `data.text.tokenizer: hf`, `tokenizer_model` that
  directory), so `effarch generate RUN_DIR --text`, `effarch eval RUN_DIR perplexity` and `train.init_from=RUN_DIR`
  use the checkpoint's own vocabulary. export-hf copies the files of a run's `hf` tokenizer back out.
- export-hf writes config.json + model.safetensors (or shards with an index) that `transformers` loads. A LoRA
  run (`train.lora`) is written with its adapters merged into the kernels (train/lora.py).

The config and tensor-name mappings are arches/hf_llama.py.
"""

import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16" dtype, which safetensors' numpy reader asks for
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from effarch.arches.hf_llama import (
    HFConfigError,
    check_exportable,
    hf_config_from_model,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
)
from effarch.arches.lm import DecoderLM
from effarch.train.config import Config, ConfigError, DataConfig, TextData, TrainConfig
from effarch.train.convert import write_run

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # tokenizer.json first
TOKENIZER_DIR = "tokenizer"  # where import-hf puts them in the run directory


def read_hf_checkpoint(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: numpy array}) of a local HF checkpoint directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    hf_config = _read_json_object(path / "config.json")
    if (path / INDEX).is_file():
        weight_map = _read_json_object(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFConfigError(f"{path / INDEX}: weight_map: missing or empty")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            # A shard is a file of this directory: an absolute path or one that climbs out is refused, never read.
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise HFConfigError(f"{path / INDEX}: weight_map puts {name} in {file!r}; a shard must be a file "
                                    "name in the checkpoint directory (no directories, no absolute paths)")
            files.setdefault(file, []).append(name)
    elif (path / SINGLE).is_file():
        files = {SINGLE: None}
    else:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise HFConfigError(f"{path}: no {SINGLE} or {INDEX} (found {found or 'no weight files'}); "
                            "only safetensors checkpoints are read")
    tensors = {}
    for file, names in files.items():
        if not (path / file).is_file():
            raise HFConfigError(f"{path / INDEX}: weight_map names {file}, which does not exist")
        try:
            with safe_open(path / file, framework="np") as f:
                stored = set(f.keys())
                for name in names if names is not None else sorted(stored):
                    if name not in stored:
                        raise HFConfigError(f"{path / INDEX}: weight_map puts {name} in {file}, which lacks it")
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as e:  # empty, truncated or not safetensors at all
            raise HFConfigError(f"{path / file}: not a readable safetensors file ({e}); is it complete?") from None
    return hf_config, tensors


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise HFConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(value, dict):
        raise HFConfigError(f"{path}: expected a JSON object {{...}}, got a {type(value).__name__}")
    return value


def write_hf_checkpoint(path: str | Path, hf_config: dict, tensors: Mapping[str, np.ndarray], *,
                        max_shard_bytes: int | None = None) -> Path:
    """Writes config.json and model.safetensors, or shards + model.safetensors.index.json past max_shard_bytes."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a directory; choose a new directory to write the checkpoint")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    meta = {"format": "pt"}  # transformers checks this key of the safetensors metadata
    if len(shards) == 1:
        _save(shards[0], path / SINGLE, meta)
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, path / file, meta)
        weight_map.update({name: file for name in shard})
    total = sum(v.nbytes for v in tensors.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def _save(tensors: Mapping[str, np.ndarray], file: Path, metadata: dict) -> None:
    """save_file, then the mode of any file written here (0666 less the umask): safetensors creates it 0600, which
    hides a shared checkpoint from everyone else."""
    save_file(dict(tensors), str(file), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def import_hf(path: str | Path, run_dir: str | Path, *, seed: int = 0) -> Config:
    """Reads the Llama checkpoint at `path` and writes it as the effarch run directory `run_dir` (step 0).

    Returns the run's Config. Refuses a run_dir that already holds a config or checkpoints.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run dir {str(run_dir)!r} exists and is not a directory; choose a new directory")
    if (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists():
        raise ConfigError(f"run dir {str(run_dir)!r} already holds a run; choose a new directory")
    hf_config, tensors = read_hf_checkpoint(path)
    model_cfg = model_config_from_hf(hf_config)
    tokenizer_files = [Path(path) / f for f in TOKENIZER_FILES if (Path(path) / f).is_file()]
    data = DataConfig()
    if tokenizer_files and tokenizer_files[0].name == TOKENIZER_FILES[0]:
        check_tokenizer(tokenizer_files[0], model_cfg.vocab_size)
        # An absolute path: the config is read from other directories (a fine-tuning run's, an eval's).
        data = DataConfig(task="text", text=TextData(tokenizer="hf",
                                                     tokenizer_model=str(run_dir.absolute() / TOKENIZER_DIR)))
    else:
        tokenizer_files = []
    cfg = Config(model=model_cfg, data=data, train=TrainConfig(run_dir=str(run_dir), seed=seed))
    params = _params_state(cfg, params_from_hf(tensors, cfg.model))
    info = {"imported_from": str(Path(path).absolute()), "hf_architecture": hf_config.get("architectures")}
    write_run(cfg, params, run_dir, info=info)  # the same run directory `effarch convert` writes
    if tokenizer_files:
        (run_dir / TOKENIZER_DIR).mkdir()
        for f in tokenizer_files:
            shutil.copyfile(f, run_dir / TOKENIZER_DIR / f.name)
    return cfg


def check_tokenizer(file: Path, vocab_size: int) -> None:
    """HFConfigError when `file` is not a tokenizer.json, or has ids past the model's vocabulary (checked where the
    `tokenizers` package is installed; without it the files are carried unread)."""
    if importlib.util.find_spec("tokenizers") is None:
        return
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
        raise HFConfigError(f"{file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0] if str(e) else e!r})"
                            ) from None
    n = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if n > vocab_size:
        raise HFConfigError(f"{file}: its {n} token ids do not fit the model's vocab_size={vocab_size} (config.json)")


def tokenizer_sources(cfg: Config) -> list[Path]:
    """The tokenizer files of a run whose tokenizer is `hf` (none otherwise): tokenizer_model's tokenizer.json and
    the tokenizer_config.json / special_tokens_map.json beside it."""
    text = cfg.data.text
    if cfg.data.task != "text" or text.tokenizer != "hf":
        return []
    model = Path(os.path.expanduser(text.tokenizer_model))
    main = model / TOKENIZER_FILES[0] if model.is_dir() else model
    if not main.is_file():
        raise ConfigError(f"data.text.tokenizer_model: {str(model)!r} is neither a tokenizer.json nor a directory "
                          "holding one: the run's tokenizer cannot be exported")
    return [main, *(main.parent / f for f in TOKENIZER_FILES[1:] if (main.parent / f).is_file())]


def _params_state(cfg: Config, tree: dict) -> nnx.State:
    """The model's nnx.Param state holding `tree` (built abstractly: no random init of a large model)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, tree))
    return params


def export_hf(run_dir: str | Path, path: str | Path, *, dtype: str = "float32",
              max_shard_bytes: int | None = None) -> Path:
    """Writes the newest checkpoint of `run_dir` (an all-attention model) as a Llama checkpoint directory `path`."""
    from effarch.train.generate import load_run
    from effarch.train.lora import merged

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    path = Path(path)
    if (path / "config.json").exists():
        raise ConfigError(f"{path}: already holds a checkpoint (config.json); choose a new directory")
    run_cfg, model = load_run(run_dir)
    tokenizer = tokenizer_sources(run_cfg)  # before anything is written
    _, model = merged(run_cfg, model)  # a LoRA run's adapters folded into its kernels
    check_exportable(model.cfg)
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    hf_config = {**hf_config_from_model(model.cfg), "torch_dtype": dtype}
    out = write_hf_checkpoint(path, hf_config, params_to_hf(tree, model.cfg, np_dtype), max_shard_bytes=max_shard_bytes)
    for i, f in enumerate(tokenizer):  # the first is the tokenizer.json, whatever its name in the run
        shutil.copyfile(f, out / (TOKENIZER_FILES[0] if i == 0 else f.name))
    return out

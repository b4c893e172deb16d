"""Fine-tuning: initialise a model's parameters from another run's checkpoint, matched by parameter path.

`train.init_from` names a run directory (its newest complete checkpoint is used) or one checkpoint directory
(`RUN/checkpoints/<step>`). Only parameters are read: the optimizer state and the step start afresh. The source
model may differ from the new one; every parameter of the new model ends up in one of four groups, reported in the
log and in `init_report.json` of the new run:

- loaded: same path and shape in both: copied exactly (bitwise), restored straight into the new mesh's shardings;
- new: not in the checkpoint: keeps its fresh initialisation (e.g. an added layer);
- dropped: in the checkpoint only: not read into the model (e.g. a removed layer);
- dropped LoRA adapters (a `train.lora` run read into a model without them) are an error: the base weights alone are
  not the fine-tuned model (`effarch convert RUN OUT --to merged` folds them in first);
- reshaped: same path, other shape (e.g. another vocabulary size): `train.init_mismatch` decides: "error" (the
  default) stops with one line naming them, "init" keeps the fresh initialisation, "overlap" copies the
  overlapping corner `[:min(a, b), ...]` into it (a vocabulary padded or truncated at its end).

No parameter holds positions (RoPE is computed, not learnt), so a longer `data.seq_len` needs no adaptation:
fine-tuning at a longer context just works (tests/train/test_finetune.py).
"""

import json
import logging
from pathlib import Path

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effarch.train import param_tree
from effarch.train.checkpoint import Checkpointer
from effarch.train.config import ConfigError

log = logging.getLogger("effarch")


def resolve_source(path: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, step) for a run directory or one checkpoint directory; ConfigError otherwise."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"train.init_from: {str(p)!r} does not exist")
    if (p / "checkpoints").is_dir():
        ckpt = Checkpointer(p / "checkpoints", read_only=True)
        try:
            for step in reversed(ckpt.steps()):
                if (ckpt.directory / str(step) / "_CHECKPOINT_METADATA").exists():
                    try:
                        ckpt.item_metadata(step)
                    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: try the previous one
                        log.warning("train.init_from: skipping unreadable checkpoint %s (%s)", step, e)
                        continue
                    return ckpt.directory, step
        finally:
            ckpt.close()
        raise ConfigError(f"train.init_from: run directory {str(p)!r} has no complete checkpoint")
    if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists():
        return p.parent.absolute(), int(p.name)
    raise ConfigError(f"train.init_from: {str(p)!r} is neither a run directory (with checkpoints/) nor a "
                      "checkpoint directory (RUN/checkpoints/<step>)")


def _overlap(fresh: jax.Array, src: jax.Array) -> jax.Array:
    corner = tuple(slice(0, min(a, b)) for a, b in zip(fresh.shape, src.shape, strict=True))
    return fresh.at[corner].set(src[corner].astype(fresh.dtype))


def init_from_checkpoint(params, source: str | Path, mismatch: str = "error"):
    """(params with the checkpoint's values where paths match, report dict). `params`: the freshly initialised,
    sharded parameters of the new model; the returned tree has the same structure, dtypes and shardings."""
    directory, step = resolve_source(source)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        raw = ckpt.manager.item_metadata(step)["params"].tree  # the saved tree, read without loading arrays
        saved = param_tree.flatten(raw)
        target = param_tree.flatten(params)
        loaded = sorted(p for p in target if p in saved and tuple(saved[p].shape) == tuple(target[p].shape))
        reshaped = sorted(p for p in target if p in saved and tuple(saved[p].shape) != tuple(target[p].shape))
        report = {
            "source": str(directory / str(step)), "step": step, "loaded": loaded,
            "new": sorted(target.keys() - saved.keys()), "dropped": sorted(saved.keys() - target.keys()),
            "reshaped": [{"path": p, "checkpoint": list(saved[p].shape), "model": list(target[p].shape),
                          "action": mismatch} for p in reshaped],
        }
        adapters = sorted(p for p in report["dropped"] if "/lora/lora_" in p)
        if adapters:  # the weights without them are not the fine-tuned model
            raise ConfigError(f"train.init_from: the checkpoint holds LoRA adapters that this model lacks "
                              f"({adapters[0]}, {len(adapters)} in all); set the source run's train.lora, or merge "
                              "them into the weights first: effarch convert SOURCE_RUN OUT --to merged")
        if reshaped and mismatch == "error":
            shown = "; ".join(f"{p} {tuple(saved[p].shape)} -> {tuple(target[p].shape)}" for p in reshaped[:3])
            more = f" and {len(reshaped) - 3} more" if len(reshaped) > 3 else ""
            raise ConfigError(f"train.init_from: {len(reshaped)} parameter(s) differ in shape from the checkpoint: "
                              f"{shown}{more}; set train.init_mismatch=overlap (copy the overlapping slice) or "
                              "init (keep the new initialisation)")
        # Restore target: the checkpoint's own tree. Loaded parameters go straight into the new model's shardings;
        # the rest of the tree is read replicated (reshaped ones are needed for "overlap"; dropped ones are cheap
        # at the sizes this runs at, and Orbax wants the whole saved tree).
        any_sharding = jax.tree.leaves(params)[0].sharding
        replicated = NamedSharding(any_sharding.mesh, P()) if isinstance(any_sharding, NamedSharding) else any_sharding
        abstract = {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                            sharding=target[p].sharding if p in loaded else replicated)
                    for p, m in saved.items()}
        restored = ckpt.restore(step, _nested_like(raw, abstract))[0]
    finally:
        ckpt.close()
    values = param_tree.flatten(restored)
    new_values = {p: values[p].astype(target[p].dtype) for p in loaded}
    if mismatch == "overlap":
        for p in reshaped:
            new_values[p] = jax.device_put(_overlap(target[p], values[p]), target[p].sharding)

    def pick(keypath, x):
        return new_values.get(param_tree.path_str(keypath), x)

    out = jax.tree_util.tree_map_with_path(pick, params)
    return out, report


def _nested_like(raw, abstract_flat: dict):
    """The restore target in the saved tree's own nesting (Variables are saved as {"value": array})."""

    def one(keypath, _):
        return abstract_flat[param_tree.path_str(keypath)]

    return jax.tree_util.tree_map_with_path(one, raw)


def write_report(report: dict, run_dir: Path) -> None:
    (run_dir / "init_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("initialised from %s: %d loaded, %d new, %d dropped, %d reshaped (%s)", report["source"],
             len(report["loaded"]), len(report["new"]), len(report["dropped"]), len(report["reshaped"]),
             run_dir / "init_report.json")
    for key in ("new", "dropped"):
        if report[key]:
            log.info("  %s: %s", key, ", ".join(report[key]))
    for r in report["reshaped"]:
        log.info("  reshaped (%s): %s %s -> %s", r["action"], r["path"], r["checkpoint"], r["model"])

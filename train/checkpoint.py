"""Orbax checkpoints of a training run: params, optimizer state, RNG and metadata (step, data position).

- Saves are atomic (Orbax writes a temporary directory and renames it when complete) and optionally async.
- `restore_latest` walks the steps from newest to oldest and skips, with a warning, any checkpoint that is
  incomplete or unreadable, so a crash during a save never blocks a resume. With `quarantine=True` (the training
  loop) a skipped checkpoint is moved to `<run_dir>/checkpoints_unreadable/` so that a restarted run never collides
  with its step number; nothing is deleted.
- A complete, readable checkpoint whose trees do not match the model being restored (other parameter shapes, another
  optimizer chain) is not corruption but a config problem: `CheckpointMismatch` is raised, naming what differs, and
  no checkpoint is skipped or moved.
- Params are restored straight into the shardings of the current mesh (a different topology is fine).
"""

import logging
import shutil
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from effarch.train import param_tree

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A checkpoint is intact but holds trees of another shape than the model / optimizer being restored."""


def tree_differences(saved: dict, target: dict, limit: int = 3) -> list[str]:
    """What differs between {path: saved array metadata} and {path: target array}: missing, extra, reshaped."""
    out = [f"{p} {tuple(saved[p].shape)} saved vs {tuple(target[p].shape)} now"
           for p in sorted(saved.keys() & target.keys()) if tuple(saved[p].shape) != tuple(target[p].shape)]
    out += [f"{p} missing from the checkpoint" for p in sorted(target.keys() - saved.keys())]
    out += [f"{p} only in the checkpoint" for p in sorted(saved.keys() - target.keys())]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _abstract(tree):
    """ShapeDtypeStructs carrying each array's sharding: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True,
                 quarantine: bool = False):
        self.directory = Path(directory).absolute()
        self.quarantine = quarantine
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Registered up front so that item_metadata can read a checkpoint this process did not write.
            item_handlers={"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                           "rng": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # leftovers of a save that was killed half-way
                create=True,
            ),
        )

    def save(self, step: int, params, opt_state, rng, meta: dict) -> None:
        """Starts (async) or performs the save of `step`; a save of an existing step is skipped."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                rng=ocp.args.StandardSave({"key": rng}),  # Standard* needs a tree, not one array
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, params, opt_state=None, rng=None):
        """Restores `step` into arrays shaped and sharded like the given templates.

        Returns (params, opt_state, rng, meta); an item whose template is None is not read and comes back None
        (generation needs the params only).
        """
        items = {"params": params, "opt_state": opt_state, "rng": None if rng is None else {"key": rng}}
        args = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in items.items() if t is not None}
        out = self.manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        rng_out = out["rng"]["key"] if rng is not None else None
        return out["params"], out["opt_state"] if opt_state is not None else None, rng_out, out["meta"]

    def item_metadata(self, step: int, item: str = "params") -> dict:
        """{path: array metadata (shape, dtype)} of one saved item, read without loading any array."""
        return param_tree.flatten(self.manager.item_metadata(step)[item].tree)

    def _skip(self, step: int, why: str) -> None:
        step_dir = self.directory / str(step)
        if not self.quarantine:
            warnings.warn(f"checkpoint {step_dir} {why}; skipping it", stacklevel=3)
            return
        dest = self.directory.parent / "checkpoints_unreadable" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(step_dir), str(dest))
        self.manager.reload()
        warnings.warn(f"checkpoint {step_dir} {why}; skipping it (moved to {dest})", stacklevel=3)

    def _check_trees(self, step: int, params, opt_state) -> None:
        """Raises CheckpointMismatch when step's saved trees differ from the templates (metadata only)."""
        diffs = tree_differences(self.item_metadata(step, "params"), param_tree.flatten(params))
        if diffs:
            raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} holds other parameters than this "
                                     f"model: {'; '.join(diffs)}")
        if opt_state is not None:
            diffs = tree_differences(self.item_metadata(step, "opt_state"), param_tree.flatten(opt_state))
            if diffs:
                raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} holds another optimizer state than "
                                         f"this config builds (optimizer chain or train.freeze): {'; '.join(diffs)}")

    def restore_latest(self, params, opt_state=None, rng=None):
        """`restore` of the newest complete checkpoint, or None when there is none.

        A checkpoint that is incomplete or cannot be read is skipped with a warning (and moved aside when
        `quarantine`), and the previous one is tried. One that is readable but does not fit the templates raises
        CheckpointMismatch: that is the config's doing, and the checkpoint is left where it is.
        """
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            if not (step_dir / "_CHECKPOINT_METADATA").exists():
                self._skip(step, "is incomplete (no _CHECKPOINT_METADATA)")
                continue
            try:
                self.item_metadata(step, "params")
            except Exception as e:  # noqa: BLE001 - metadata that cannot be read: a damaged checkpoint
                self._skip(step, f"has unreadable metadata ({type(e).__name__}: {e})")
                continue
            self._check_trees(step, params, opt_state)
            try:
                return self.restore(step, params, opt_state, rng)
            except Exception as e:  # noqa: BLE001 - trees match, so a failure here is damaged data
                self._skip(step, f"cannot be restored ({type(e).__name__}: {e})")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

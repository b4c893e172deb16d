"""Orbax checkpoints of a training run: params, optimizer state, RNG and metadata (step, data position).

- Saves are atomic (Orbax writes a temporary directory and renames it when complete) and optionally async.
- `restore_latest` walks the steps from newest to oldest and skips, with a warning, any checkpoint that is
  incomplete or unreadable, so a crash during a save never blocks a resume.
- Params are restored straight into the shardings of the current mesh (a different topology is fine).
"""

import logging
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _abstract(tree):
    """ShapeDtypeStructs carrying each array's sharding: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
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

    def restore_latest(self, params, opt_state=None, rng=None):
        """`restore` of the newest complete checkpoint, or None when there is none.

        A checkpoint that is incomplete or cannot be read is skipped with a warning, and the previous one is tried.
        """
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            if not (step_dir / "_CHECKPOINT_METADATA").exists():
                warnings.warn(f"checkpoint {step_dir} is incomplete (no _CHECKPOINT_METADATA); skipping it",
                              stacklevel=2)
                continue
            try:
                return self.restore(step, params, opt_state, rng)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                warnings.warn(f"checkpoint {step_dir} cannot be restored ({type(e).__name__}: {e}); skipping it",
                              stacklevel=2)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

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
- A save that fails (a full disk, a lost mount) raises `SaveFailed` at the first check after it failed: the
  training loop calls `raise_if_save_failed` every step, so a run never goes on training without checkpoints. The
  message names the checkpoint that failed and the last good one; earlier checkpoints are left as they were (Orbax
  deletes old steps only after a save has committed).
- `read_only=True` is the reader's view (eval, generate, fine-tuning's source): it creates, cleans up and deletes
  nothing, so it can read a run that is training right now. It only sees committed checkpoints: Orbax writes a step
  into a temporary directory and renames it to `<step>` when complete, so a step directory with
  `_CHECKPOINT_METADATA` is complete. A step that the writer deletes meanwhile (`max_to_keep`) is skipped.
- A `Checkpointer` is a context manager: leaving the block waits for the last save and closes the manager; when the
  block is left by an error, a second error while closing is not allowed to hide the first.
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


class SaveFailed(RuntimeError):
    """A checkpoint (or the run's metrics) could not be written; the message names it and the last good
    checkpoint."""


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


def _describe(error: Exception) -> str:
    """`Type: message` on one line, without TensorStore's spec dump (a kilobyte of JSON), at most ~300 chars."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ").split(" [tensorstore_spec")[0]
    return text if len(text) <= 300 else text[:300] + "..."


def _handlers() -> dict:
    # Registered up front so that item_metadata can read a checkpoint this process did not write.
    return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "rng": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True,
                 quarantine: bool = False, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.quarantine = quarantine and not read_only
        self.read_only = read_only
        self._saving: int | None = None  # the step of a save that was started and not yet confirmed
        self._failed = False
        if read_only:
            self.manager = ocp.CheckpointManager(
                self.directory,
                item_handlers=_handlers(),
                options=ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                     max_to_keep=None, enable_async_checkpointing=False),
            )
            return
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # leftovers of a save that was killed half-way
                create=True,
            ),
        )

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: wait for and close what is open, but let the first error be the one reported
            self.close()
        except Exception:  # noqa: BLE001, S110 - the error that left the block is the one to report
            pass

    def save(self, step: int, params, opt_state, rng, meta: dict) -> None:
        """Starts (async) or performs the save of `step`; a save of an existing step is skipped.

        Raises SaveFailed when this save or the previous (async) one failed."""
        if step in self.manager.all_steps():
            return
        self.raise_if_save_failed(block=True)  # Orbax runs one save at a time: the previous one must be done
        self._saving = step
        try:
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
        except Exception as e:  # noqa: BLE001 - the synchronous part of the save (or a sync save) failed
            self._fail(e)
        if not self.manager.is_saving_in_progress():
            self.raise_if_save_failed()

    def raise_if_save_failed(self, *, block: bool = False) -> None:
        """Raises SaveFailed if the save in flight has failed. Without `block` it never waits: a save still
        running is checked at a later call."""
        if self._saving is None or (not block and self.manager.is_saving_in_progress()):
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the writer raised (OSError: disk full, ...)
            self._fail(e)
        self._saving = None

    def _fail(self, error: Exception) -> None:
        step, self._saving, self._failed = self._saving, None, True
        self.manager.reload()  # the failed step is not a checkpoint
        good = [s for s in self.steps() if s != step and (self.directory / str(s) / "_CHECKPOINT_METADATA").exists()]
        last = f"step {good[-1]} in {self.directory}" if good else f"none in {self.directory}"
        reason = _describe(error)
        raise SaveFailed(f"saving checkpoint {self.directory / str(step)} failed ({reason}); the run stopped. "
                         f"Last good checkpoint: {last}") from None

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
        CheckpointMismatch: that is the config's doing, and the checkpoint is left where it is. A reader of a run that
        is training lists the steps again when the writer deleted every listed one while it was reading.
        """
        for _ in range(10):
            restored, vanished = self._restore_newest(params, opt_state, rng)
            if restored is not None or not vanished:
                return restored
            self.manager.reload()
        return None

    def _deleted(self, step_dir: Path) -> bool:
        """Whether a step that failed to read is being deleted by the writer (a reader's view only; the writer's
        deletion takes a moment, so a reader looks again for up to half a second)."""
        for _ in range(10 if self.read_only else 1):
            if not step_dir.exists():
                return True
            if self.read_only:
                time.sleep(0.05)
        return False

    def _restore_newest(self, params, opt_state, rng):
        """(restored or None, whether a listed step was deleted meanwhile)."""
        vanished = False
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            if not step_dir.exists():  # deleted since it was listed (a reader's view of a run that is training)
                vanished = True
                continue
            if not (step_dir / "_CHECKPOINT_METADATA").exists():
                self._skip(step, "is incomplete (no _CHECKPOINT_METADATA)")
                continue
            try:
                self.item_metadata(step, "params")
            except Exception as e:  # noqa: BLE001 - metadata that cannot be read: a damaged checkpoint
                if self._deleted(step_dir):
                    vanished = True
                    continue
                self._skip(step, f"has unreadable metadata ({_describe(e)})")
                continue
            self._check_trees(step, params, opt_state)
            try:
                return self.restore(step, params, opt_state, rng), vanished
            except Exception as e:  # noqa: BLE001 - trees match, so a failure here is damaged data
                if self._deleted(step_dir):  # or the writer deleted it while it was being read: not damage
                    vanished = True
                    continue
                self._skip(step, f"cannot be restored ({_describe(e)})")
        return None, vanished

    def wait(self) -> None:
        """Waits for the save in flight; SaveFailed if it failed."""
        self.raise_if_save_failed(block=True)

    def close(self) -> None:
        """Waits for the save in flight (SaveFailed if it failed) and closes the manager."""
        try:
            if not self._failed:
                self.raise_if_save_failed(block=True)
        finally:
            try:
                self.manager.close()
            except Exception:  # after a failed save Orbax raises that error again here; it was reported once
                if not self._failed:
                    raise

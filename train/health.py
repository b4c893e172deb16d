"""The NaN/inf check of the training loop, kept on the device so the loop never waits on a step to inspect it.

Reading the loss back after every step (`float(loss)`) makes the host wait for the step to finish before it can
dispatch the next one, so the accelerator idles for the host's share of every step. Instead the jitted step carries a
small record through every update: the step count and the first step whose loss or gradient norm was not finite
(with those two values). The loop reads it back only where it must decide something: at log steps and before every
evaluation and checkpoint. Because the record covers every step since the run (re)started, the check before a
checkpoint covers the steps that were never logged, so nothing non-finite is ever saved, and the stop message still
names the step that went bad and the last good checkpoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without saving the bad state."""


Health = dict[str, Int[Array, ""] | Float[Array, ""]]


def init_health(step: int) -> dict[str, np.ndarray]:
    """The record of a run about to take step `step + 1` (steps are counted from 1, like the logged steps)."""
    return {"step": np.array(step, np.int32), "first_bad": np.array(0, np.int32), "loss": np.array(0, np.float32),
            "grad_norm": np.array(0, np.float32)}


def update_health(health: Health, loss: Float[Array, ""], grad_norm: Float[Array, ""]) -> Health:
    """The record after one more step (traced inside the jitted step). `first_bad` (0: none) keeps the first
    non-finite step and its loss / grad norm: later steps only spread the NaN and would hide where it started."""
    step = health["step"] + 1
    first = (health["first_bad"] == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return {
        "step": step,
        "first_bad": jnp.where(first, step, health["first_bad"]),
        "loss": jnp.where(first, loss.astype(jnp.float32), health["loss"]),
        "grad_norm": jnp.where(first, grad_norm.astype(jnp.float32), health["grad_norm"]),
    }


def raise_if_diverged(health: dict, *, last_good_step: int | None, directory, wait_for_saves=None) -> None:
    """Reads the record back (waiting for every dispatched step) and raises TrainingDiverged if any step since the
    start was not finite. `wait_for_saves` runs first, so the last good checkpoint is complete when the run stops."""
    record = jax.device_get(health)
    first_bad = int(record["first_bad"])
    if not first_bad:
        return
    if wait_for_saves is not None:
        wait_for_saves()
    where = f"step {last_good_step}" if last_good_step is not None else "none saved yet"
    found = int(record["step"])
    when = "" if found == first_bad else f", found at step {found} (the check runs at log steps and before checkpoints)"
    raise TrainingDiverged(f"loss is {float(record['loss'])} (grad norm {float(record['grad_norm'])}) at step "
                           f"{first_bad}{when}; stopped without saving. Last good checkpoint: {where} in {directory}")

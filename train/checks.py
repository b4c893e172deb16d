"""Cross-field config checks that need more than one dataclass: run before the run directory, data or mesh exist.

Each dataclass checks its own fields in `__post_init__`; what is checked here involves several of them or the
machine: heads that must divide the model width (found by tracing the model's construction and one forward pass
abstractly, so every registered mixer's own checks run without allocating anything), the mesh against the device
count, and the batch sizes against the data-parallel axes and the process count. Every failure is a ConfigError
naming the keys.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config, ConfigError
from effarch.train.lora import check_lora

# Tokens per probe sequence: a multiple of 128 so that every kernel an implementation key can name accepts it (splash
# sliding window needs T % 128 == 0; the chunked paths take any T), and small enough to trace in no time.
PROBE_LEN = 128


def check_model(cfg: Config, devices=None) -> None:
    """Builds and runs the model abstractly (jax.eval_shape) on a [1, PROBE_LEN] batch, for the platform of
    `devices` (default: this host's). A layer's ValueError, or an implementation that cannot run there
    (NotImplementedError, or every implementation of a sequence failing), becomes a one-line ConfigError."""

    def build_and_call():
        model = DecoderLM(cfg.model, rngs=nnx.Rngs(0))
        return model(jnp.zeros((1, PROBE_LEN), jnp.int32))

    # A one-device mesh of the target's devices: kernel choice follows the mesh's platform (pallas_kernels/
    # dispatch.py), so a CPU host checking a TPU config checks what the TPU would run.
    one = None if devices is None else Mesh(np.array(list(devices)[:1]), ("probe",))
    target = contextlib.nullcontext() if one is None else jax.set_mesh(one)
    try:
        with target:
            jax.eval_shape(build_and_call)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"model: {_first_line(e)}") from None
    except ExceptionGroup as e:  # dispatch: no implementation of a sequence can run
        raise ConfigError(f"model: {_first_line(e)} ({'; '.join(_first_line(x) for x in e.exceptions)})") from None


def _first_line(e: BaseException) -> str:
    text = e.message if isinstance(e, BaseExceptionGroup) else str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def mesh_sizes(cfg: Config, n_devices: int) -> dict[str, int]:
    """{'data': ..., 'fsdp': ..., 'tensor': ...} with -1 resolved, or a ConfigError naming the mesh keys."""
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices do not divide into the fixed mesh axes "
                              f"({', '.join(f'mesh.{k}={v}' for k, v in sizes.items() if v != -1)})")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"mesh: mesh.data*mesh.fsdp*mesh.tensor = {sizes['data']}*{sizes['fsdp']}*"
                          f"{sizes['tensor']} = {math.prod(sizes.values())}, but {n_devices} devices are available")
    return sizes


def check_runtime(cfg: Config, devices=None, *, processes: int | None = None) -> None:
    """Mesh vs devices and batch divisibility, for this machine's devices and processes (or, for a plan of a slice
    that is not here, its devices and `processes`)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(cfg, len(devices))
    batch_axes = [a for a in dict(cfg.sharding_rules).get("batch", ()) if sizes[a] > 1]
    shards = math.prod(sizes[a] for a in batch_axes)
    where = "*".join(f"mesh.{a}" for a in batch_axes) or "1"
    tc, procs = cfg.train, processes or jax.process_count()
    micro = tc.batch_size // tc.grad_accum_steps
    if micro % shards:
        raise ConfigError(f"train.batch_size={tc.batch_size} / train.grad_accum_steps={tc.grad_accum_steps} = {micro} "
                          f"rows per micro-batch must divide over the batch axes {where} = {shards}")
    if tc.batch_size % procs:
        raise ConfigError(f"train.batch_size={tc.batch_size} must divide over the {procs} processes")
    if tc.eval_batch_size % shards:
        raise ConfigError(f"train.eval_batch_size={tc.eval_batch_size} must divide over the batch axes "
                          f"{where} = {shards}")
    if tc.eval_batch_size % procs:
        raise ConfigError(f"train.eval_batch_size={tc.eval_batch_size} must divide over the {procs} processes")


def check_objective(cfg: Config) -> None:
    """train.objective duo trains DuoAttention gates: the model must have them."""
    if cfg.train.objective == "duo" and not (cfg.model.attention.duo_gates and "attention" in cfg.model.mixers):
        raise ConfigError("train.objective duo trains DuoAttention gates: it needs model.attention.duo_gates true and "
                          f"an attention mixer (model.mixers is {list(cfg.model.mixers)})")


def check_config(cfg: Config, devices=None) -> None:
    check_objective(cfg)
    check_model(cfg, devices)
    check_lora(cfg)
    check_runtime(cfg, devices)

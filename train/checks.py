"""Cross-field config checks that need more than one dataclass: run before the run directory, data or mesh exist.

Each dataclass checks its own fields in `__post_init__`; what is checked here involves several of them or the
machine: heads that must divide the model width (found by tracing the model's construction and one forward pass
abstractly, so every registered mixer's own checks run without allocating anything), the mesh against the device
count, and the batch sizes against the data-parallel axes and the process count. Every failure is a ConfigError
naming the keys.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effarch.arches.lm import DecoderLM
from effarch.train.config import Config, ConfigError


def check_model(cfg: Config) -> None:
    """Builds and runs the model abstractly (jax.eval_shape): a layer's ValueError becomes a one-line ConfigError."""

    def build_and_call():
        model = DecoderLM(cfg.model, rngs=nnx.Rngs(0))
        return model(jnp.zeros((1, 8), jnp.int32))

    try:
        jax.eval_shape(build_and_call)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model: {first}") from None


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


def check_config(cfg: Config, devices=None) -> None:
    check_model(cfg)
    check_runtime(cfg, devices)

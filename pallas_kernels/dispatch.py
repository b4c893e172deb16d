"""`implementation=` dispatch shared by every op.

- A single string is an explicit request: if that path cannot run here it raises at once, never falls back.
- A sequence is tried in order, with a warning on each fallback; if all fail, one error lists every reason.
- None means the platform's default order.

"The platform" is that of the devices the program is built for: the mesh in context (`jax.set_mesh`, or the
abstract mesh inside jit, whose devices may be a TPU slice described from a CPU host with
`jax.experimental.topologies`), else `jax.default_backend()` (`current_platform`). So a training step compiled from
a CPU host for TPU devices gets the TPU default order, and an explicit "pallas_tpu" passes its platform check there.

The repository's own Pallas kernels (Lightning, BASED) are in a platform's default order only once they have run
there: until `scripts/gpu_check.sh` (or its TPU counterpart) has passed on a platform, that platform's default is
"xla" and the kernels are opt-in (`implementation="pallas_gpu"` / `"pallas_tpu"`). Each op records the evidence per
platform next to its default order (`kernel_default_order`); adding an entry there is the one place a default flips.

Each implementation raises `NotImplementedError` *before doing any work* when it cannot run
(wrong platform, unsupported shape), so a fallback never hides a numerical bug.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence

import jax

KERNELS: Mapping[str, str] = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}  # a platform's own-kernel implementation


def kernel_default_order(evidence: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """The default order of an op with Pallas kernels: (kernel, "xla") on a platform that `evidence` names (the
    run that showed the kernel correct there: date, device, commit, where its results are), "xla" alone elsewhere."""
    unknown = set(evidence) - set(KERNELS)
    if unknown:
        raise ValueError(f"kernel evidence for unknown platform(s) {sorted(unknown)}; known: {sorted(KERNELS)}")
    return {"cpu": ("xla",), **{p: (k, "xla") if p in evidence else ("xla",) for p, k in KERNELS.items()}}


# For an op that passes no order of its own: no kernel without evidence.
DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = kernel_default_order({})


_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def current_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the context mesh's devices, else of `jax.default_backend()`."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return _PLATFORM_ALIASES.get(platform, platform)


def dispatch(
    op: str,
    impls: Mapping[str, Callable],
    implementation: str | Sequence[str] | None,
    *args,
    default_order: Mapping[str, tuple[str, ...]] = DEFAULT_ORDER,
    **kwargs,
):
    """Calls the implementation(s) of `op` named by `implementation` on (*args, **kwargs)."""
    if isinstance(implementation, str):
        if implementation not in impls:
            raise ValueError(f"{op}: unknown implementation {implementation!r}; choose from {sorted(impls)}")
        return impls[implementation](*args, **kwargs)
    if implementation is None:
        platform = current_platform()
        order = tuple(name for name in default_order.get(platform, ("xla",)) if name in impls)
    else:
        order = tuple(implementation)
        unknown = [name for name in order if name not in impls]
        if unknown:
            raise ValueError(f"{op}: unknown implementation(s) {unknown}; choose from {sorted(impls)}")
    errors = []
    for i, name in enumerate(order):
        try:
            return impls[name](*args, **kwargs)
        except NotImplementedError as e:
            errors.append(NotImplementedError(f"{name}: {e}"))
            if i + 1 < len(order):
                warnings.warn(f"{op}: {name} unavailable ({e}); trying {order[i + 1]}", stacklevel=2)
    raise ExceptionGroup(f"{op}: no implementation in {list(order)} can run", errors)


def require_platform(op: str, name: str, *platforms: str) -> None:
    """Raises NotImplementedError unless `current_platform()` is one of `platforms`."""
    platform = current_platform()
    if platform not in platforms:
        raise NotImplementedError(f"{op} implementation {name!r} needs a {'/'.join(platforms)} backend, not {platform}")

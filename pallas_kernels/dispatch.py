"""`implementation=` dispatch shared by every op.

- A single string is an explicit request: if that path cannot run here it raises at once, never falls back.
- A sequence is tried in order, with a warning on each fallback; if all fail, one error lists every reason.
- None means the platform's default order.

Each implementation raises `NotImplementedError` *before doing any work* when it cannot run
(wrong platform, unsupported shape), so a fallback never hides a numerical bug.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence

import jax

DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = {
    "cpu": ("xla",),
    "gpu": ("pallas_gpu", "xla"),
    "tpu": ("pallas_tpu", "xla"),
}


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
        platform = jax.default_backend()
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
    """Raises NotImplementedError unless the default backend is one of `platforms`."""
    platform = jax.default_backend()
    if platform not in platforms:
        raise NotImplementedError(f"{op} implementation {name!r} needs a {'/'.join(platforms)} backend, not {platform}")

"""Whether a Pallas implementation runs compiled or interpreted, shared by every op's "pallas_gpu"/"pallas_tpu" path.

On CPU a `pallas_call` runs only in interpret mode; on a GPU or TPU it is compiled for that
backend. The contract (checked by tests/pallas_kernels/test_interpret.py):

- `EFFARCH_PALLAS_INTERPRET=1` (also "true", "yes", "on"; anything else, or unset, means off) makes every Pallas
  implementation run in interpret mode on any platform, so `lightning_attention(..., implementation="pallas_gpu")`
  gives checkable numbers on a CPU. The variable is read on every call (not at import), so a test can set it with
  `monkeypatch.setenv`.
- Without it, a Pallas implementation named on the wrong platform raises NotImplementedError before any work
  (dispatch.py's fail-fast rule), so an explicit request never falls back silently.

Interpret mode here is the generic HLO interpreter (`interpret=True`): it runs both kernel styles and is the
cheapest (§5.3). Tests that want the TPU interpreter's race detection pass `tpu_interpret_params()` explicitly.
"""

import dataclasses
import os

from jax.experimental.pallas import tpu as pltpu

from effarch.pallas_kernels.dispatch import require_platform

ENV_VAR = "EFFARCH_PALLAS_INTERPRET"
_TRUE = ("1", "true", "yes", "on")

Interpret = bool | pltpu.InterpretParams


def env_interpret() -> bool:
    """True when EFFARCH_PALLAS_INTERPRET asks for interpret mode (read now, not cached)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def resolve_interpret(op: str, name: str, platform: str, interpret: Interpret | None) -> Interpret:
    """The `interpret=` value to hand to `pl.pallas_call` for implementation `name` of `op`.

    Args:
      op, name: for the error message ("lightning_attention", "pallas_gpu").
      platform: the backend the compiled kernel needs, "gpu" or "tpu".
      interpret: an explicit choice wins: True or a `pltpu.InterpretParams` interprets, False compiles without a
        platform check (cross-lowering from a CPU host). None: interpret if the environment
        variable says so, else compile, which needs `platform`.

    Raises:
      NotImplementedError: interpret is None, the variable is off and the platform the program is built for (the
        mesh's devices, else the default backend: dispatch.py `current_platform`) is not `platform`.
    """
    if interpret is not None:
        return interpret
    if env_interpret():
        return True
    require_platform(op, name, platform)
    return False


def tpu_interpret_params(**overrides) -> Interpret:
    """`pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", **overrides)`, keeping only the fields
    the installed JAX has (0.11.2 and 0.12 both have these today; a field that disappears is dropped, not an error).
    """
    wanted = {"detect_races": True, "uninitialized_memory": "nan", **overrides}
    fields = {f.name for f in dataclasses.fields(pltpu.InterpretParams)}
    return pltpu.InterpretParams(**{key: value for key, value in wanted.items() if key in fields})


def is_interpret(interpret: Interpret) -> bool:
    """True for every interpreted mode (True or InterpretParams), False for compiled."""
    return interpret is not False

"""Compile jobs for whole training steps: `effarch train`'s jitted step for a config, compiled for a TPU slice that
libtpu describes (tests/tpu/harness.py runs them in a child process).

A job is `effarch plan`'s core (train/plan.py `plan`, training step only): the project's own `Trainer(cfg, devices)`
over the slice's devices, abstract inputs carrying the trainer's shardings, `Trainer._train_step_checked` compiled.
Nothing is allocated but the model's non-parameter variables (scalars, on the host's CPU).
"""

from effarch.train.config import load_config
from effarch.train.plan import plan, plan_window
from tests.tpu.harness import REPO, Job


def compile_train_step(config: str, overrides: list[str], topology: str, num_slices: int = 1,
                       min_kernels: int = 0, bases: list[str] = ()) -> None:
    """Compiles the checked training step of `config` (a path under the repository; an overlay after its `bases`)
    with `overrides` for `num_slices` TPU slices `topology` ("v5p:2x2x1"); fails unless the program holds
    `min_kernels` Pallas kernels."""
    report = plan(load_config([REPO / c for c in (*bases, config)], overrides), topology, num_slices, decode=False)
    if report.train.compiler_oom:
        raise AssertionError(f"does not fit: {report.train.compiler_oom}")
    if report.train.kernels < min_kernels:
        raise AssertionError(f"{report.train.kernels} Pallas kernels in the step, expected at least {min_kernels}")


def step_job(config: str, topology: str, overrides: tuple[str, ...] = (), min_kernels: int = 0,
             bases: tuple[str, ...] = ()) -> Job:
    """The job compiling `config`'s training step (after the configs `bases`, where it is an overlay) for
    `topology`; its name gives the files, mixers, batch and dtype."""
    cfg = load_config([REPO / c for c in (*bases, config)], overrides)
    mixers = "+".join(dict.fromkeys(cfg.model.mixers))
    detail = f", {' '.join(overrides)}" if overrides else ""
    return Job(
        name=f"{' + '.join((*bases, config))} ({mixers}) training step on {topology}, "
             f"batch {cfg.train.batch_size}x{plan_window(cfg)}, {cfg.train.compute_dtype}{detail}",
        target="tests.tpu.steps:compile_train_step",
        kwargs={"config": config, "overrides": list(overrides), "topology": topology, "min_kernels": min_kernels,
                "bases": list(bases)},
    )

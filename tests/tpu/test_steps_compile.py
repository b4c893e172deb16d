"""Every shipped LM config's training step (plus MQAR Titans MAC and passkey landmark) compiles for a 4-chip TPU
slice: `effarch train`'s checked step built by `Trainer` over the slice's devices (tests/tpu/steps.py), compiled by
XLA's TPU compiler through libtpu from this CPU host (tests/tpu/harness.py). Compiled, not run.

Default suite: v5p (2x2x1), the cheapest config of each mixer that compiles today (`DEFAULT_CONFIGS`; one step costs
10-20 s of compiler time, so the Titans configs, whose compile for v5e/v5p ends in a libtpu abort after as long,
wait for the slow suite). Slow suite (`-m slow`): the other configs on v5p, every config on v5e and v6e, and every
config once per `pallas_tpu` option its mixers have, on every chip.
"""

import glob

import pytest

from effarch.arches.registry import MIXERS
from effarch.train.config import load_config
from tests.tpu.harness import REPO, SLICES
from tests.tpu.steps import step_job

CONFIGS = sorted(path.removeprefix(f"{REPO}/") for path in glob.glob(f"{REPO}/configs/lm/*.yaml")) + [
    "configs/mqar/titans_mac.yaml", "configs/passkey/landmark.yaml"]
# One config per mixer, the fewest layers: quickstart has based_small's mixers in half its layers, passkey's landmark
# model compiles in half landmark_small's time. Titans (titans_mac_small, mqar/titans_mac) is slow-only for now.
DEFAULT_CONFIGS = ("configs/lm/quickstart.yaml", "configs/lm/diffqkv_small.yaml", "configs/lm/moh_small.yaml",
                   "configs/lm/tnl_small.yaml", "configs/passkey/landmark.yaml")
DEFAULT_CHIP = "v5p"
# Config key -> the override that selects its op's Mosaic kernel.
PALLAS_TPU = {key: f"model.{key}.implementation=pallas_tpu" for key in ("based", "lightning", "sliding_window")}

# v6e compiles the same step.
TITANS_ABORT_CHIPS = ("v5e", "v5p")
TITANS_ABORT = pytest.mark.xfail(
    strict=True,
    reason="libtpu aborts on v5e/v5p (SIGABRT, 'Check failed: rank == best_window_bounds_in_chunks.size() Cannot find "
           "a valid window') compiling the backward of the Titans memory's associative_scan "
           "(pallas_kernels/titans/xla.py) inside the rematerialised block",
)
KERNEL_UNPARTITIONED = pytest.mark.xfail(
    strict=True,
    reason="a pallas_tpu kernel in the 4-device step: kernel choice follows the host's backend (NotImplementedError "
           "on a CPU host), and Mosaic kernels cannot be automatically partitioned without a shard_map",
)


def _mixers(config: str) -> list[str]:
    return list(dict.fromkeys(load_config([REPO / config]).model.mixers))


def _params():
    for config in CONFIGS:
        mixers = _mixers(config)
        default = config in DEFAULT_CONFIGS
        keys = {key for mixer in mixers for key in MIXERS[mixer].configs}
        titans = any(mixer.startswith("titans") for mixer in mixers)
        name = config.removeprefix("configs/").removesuffix(".yaml")
        for chip in SLICES:
            marks = [TITANS_ABORT] if titans and chip in TITANS_ABORT_CHIPS else []
            slow = [] if default and chip == DEFAULT_CHIP else [pytest.mark.slow]
            yield pytest.param(step_job(config, SLICES[chip]), id=f"{name}-{chip}", marks=marks + slow)
            for key, override in PALLAS_TPU.items():
                if key in keys:
                    yield pytest.param(step_job(config, SLICES[chip], (override,)),
                                       id=f"{name}-{chip}-{key}-pallas_tpu",
                                       marks=marks + [KERNEL_UNPARTITIONED, pytest.mark.slow])


@pytest.mark.parametrize("job", list(_params()))
def test_train_step_compiles_for_tpu(job, compile_results):
    result = compile_results[job.name]
    assert result.ok, str(result)


def test_the_default_suite_compiles_every_mixer_but_titans():
    untested = {m for c in CONFIGS for m in _mixers(c)} - {m for c in DEFAULT_CONFIGS for m in _mixers(c)}
    assert set(DEFAULT_CONFIGS) <= set(CONFIGS)
    assert untested == {"titans_mac", "zoology_base_conv"}, untested

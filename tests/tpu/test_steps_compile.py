"""Every shipped LM config's training step (plus MQAR Titans MAC and passkey landmark) compiles for a 4-chip TPU
slice: `effarch train`'s checked step built by `Trainer` over the slice's devices (tests/tpu/steps.py), compiled by
XLA's TPU compiler through libtpu from this CPU host (tests/tpu/harness.py). Compiled, not run.

Slow suite only (`-m slow`; together about a minute of compiler time, past the default suite's budget, whose TPU
guard is the kernels' compile tests in test_kernels_compile.py): v5p (2x2x1) with the cheapest config of each mixer
cut to one layer per mixer (`DEFAULT_CONFIGS`; a step costs 3-20 s of compiler time), every config on every chip,
and every config once per `pallas_tpu` option its mixers have, on every chip, with the kernels counted in the
compiled step.
"""

import glob

import pytest

from effarch.arches.registry import MIXERS
from effarch.train.config import load_config
from tests.tpu.harness import REPO, SLICES
from tests.tpu.steps import step_job

CONFIGS = sorted(path.removeprefix(f"{REPO}/") for path in glob.glob(f"{REPO}/configs/lm/*.yaml")) + [
    "configs/mqar/titans_mac.yaml", "configs/passkey/landmark.yaml"]
# One config per mixer, each cut to one layer per mixer (a step's compile time grows with its layers; the configs
# as shipped are the slow suite's): quickstart has based_small's mixers, passkey's landmark model compiles in half
# landmark_small's time, MQAR's Titans MAC in less than titans_mac_small's.
DEFAULT_CONFIGS = {
    "configs/lm/quickstart.yaml": ("model.n_layers=3", "model.mixers=[base_conv,based,sliding_window]"),
    "configs/lm/diffqkv_small.yaml": ("model.n_layers=1",),
    "configs/lm/moh_small.yaml": ("model.n_layers=1",),
    "configs/lm/tnl_small.yaml": ("model.n_layers=1",),
    "configs/passkey/landmark.yaml": ("model.n_layers=1",),
    "configs/mqar/titans_mac.yaml": (),  # two layers: Zoology's BaseConv and MAC
    "configs/lm/sparse_attention_small.yaml": ("model.n_layers=2",),  # the S2 hybrid: sparse_attention, attention
}
DEFAULT_CHIP = "v5p"
# Config key -> the override that selects its op's Mosaic kernel.
PALLAS_TPU = {key: f"model.{key}.implementation=pallas_tpu"
              for key in ("based", "lightning", "sliding_window", "attention", "sparse_attention")}

# The Mosaic kernels are in the step (a forward and two backward kernels at least): a config naming a `pallas_tpu`
# option must not compile without them.
MIN_KERNELS = 3


def _mixers(config: str) -> list[str]:
    return list(dict.fromkeys(load_config([REPO / config]).model.mixers))


def _params():
    for config in CONFIGS:
        mixers = _mixers(config)
        default = config in DEFAULT_CONFIGS
        keys = {key for mixer in mixers for key in MIXERS[mixer].configs}
        name = config.removeprefix("configs/").removesuffix(".yaml")
        if default:
            yield pytest.param(step_job(config, SLICES[DEFAULT_CHIP], DEFAULT_CONFIGS[config]),
                               id=f"{name}-{DEFAULT_CHIP}-one-layer-per-mixer", marks=[pytest.mark.slow])
        for chip in SLICES:
            yield pytest.param(step_job(config, SLICES[chip]), id=f"{name}-{chip}", marks=[pytest.mark.slow])
            for key, override in PALLAS_TPU.items():
                if key in keys:
                    yield pytest.param(step_job(config, SLICES[chip], (override,), MIN_KERNELS),
                                       id=f"{name}-{chip}-{key}-pallas_tpu", marks=[pytest.mark.slow])
    # Heads split too (data 2 x tensor 2): the kernels' shard_map over batch and heads (pallas_kernels/shard.py).
    yield pytest.param(step_job("configs/lm/tnl_small.yaml", SLICES[DEFAULT_CHIP],
                                (PALLAS_TPU["lightning"], "mesh.data=2", "mesh.tensor=2"), MIN_KERNELS),
                       id="lm/tnl_small-tensor2-lightning-pallas_tpu", marks=[pytest.mark.slow])


@pytest.mark.parametrize("job", list(_params()))
def test_train_step_compiles_for_tpu(job, compile_results):
    result = compile_results[job.name]
    assert result.ok, str(result)


def test_the_default_suite_compiles_every_mixer():  # MQAR Titans MAC has Zoology's BaseConv layers
    untested = {m for c in CONFIGS for m in _mixers(c)} - {m for c in DEFAULT_CONFIGS for m in _mixers(c)}
    assert set(DEFAULT_CONFIGS) <= set(CONFIGS)
    assert not untested, untested

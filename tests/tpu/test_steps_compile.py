"""Every shipped LM config's training step (plus MQAR Titans MAC and passkey landmark) compiles for a 4-chip TPU
slice: `effarch train`'s checked step built by `Trainer` over the slice's devices (tests/tpu/steps.py), compiled by
XLA's TPU compiler through libtpu from this CPU host (tests/tpu/harness.py). Compiled, not run.

Slow suite only (`-m slow`; the one-layer jobs alone are about a minute of compiler time, past the default suite's
budget, whose TPU guard is the kernels' compile tests in test_kernels_compile.py): v5p (2x2x1) with the cheapest
config of each mixer cut to one layer per mixer (`ONE_LAYER_CONFIGS`; a step costs 3-20 s of compiler time), every
config on every chip, and every config once per `pallas_tpu` option its mixers have, on every chip, with the kernels
counted in the compiled step (the whole matrix: ~27 minutes on 2 CPU cores). Overlay configs compile after the
configs their headers name (`BASES`).
"""

import functools
import glob

import pytest

from effarch.arches.registry import MIXERS
from effarch.train.config import load_config
from tests.tpu.harness import REPO, SLICES
from tests.tpu.steps import step_job

CONFIGS = sorted(path.removeprefix(f"{REPO}/") for path in glob.glob(f"{REPO}/configs/lm/*.yaml")) + [
    "configs/mqar/titans_mac.yaml", "configs/passkey/landmark.yaml"]
# One config per mixer, each cut to one layer per mixer (a step's compile time grows with its layers): the quickest
# step of every mixer. quickstart has based_small's mixers, passkey's landmark model compiles in half landmark_small's
# time, MQAR's Titans MAC (left as shipped: its job is the full config's on that chip) in less than titans_mac_small's.
ONE_LAYER_CONFIGS = {
    "configs/lm/quickstart.yaml": ("model.n_layers=3", "model.mixers=[base_conv,based,sliding_window]"),
    "configs/lm/diffqkv_small.yaml": ("model.n_layers=1",),
    "configs/lm/moh_small.yaml": ("model.n_layers=1",),
    "configs/lm/tnl_small.yaml": ("model.n_layers=1",),
    "configs/passkey/landmark.yaml": ("model.n_layers=1",),
    "configs/mqar/titans_mac.yaml": (),  # two layers: Zoology's BaseConv and MAC
    "configs/lm/sparse_attention_small.yaml": ("model.n_layers=2",),  # the S2 hybrid: sparse_attention, attention
}
ONE_LAYER_CHIP = "v5p"
# Config key -> the override that selects its op's Mosaic kernel.
PALLAS_TPU = {key: f"model.{key}.implementation=pallas_tpu"
              for key in ("based", "lightning", "sliding_window", "attention", "sparse_attention")}

# The Mosaic kernels are in the step (a forward and two backward kernels at least): a config naming a `pallas_tpu`
# option must not compile without them.
MIN_KERNELS = 3
# Overlays compile after the configs their headers name (alone they would be the default MQAR model's step).
BASES = {
    "configs/lm/longlora_finetune.yaml": ("configs/lm/attention_512.yaml",),
    "configs/lm/longlora_s2.yaml": ("configs/lm/attention_512.yaml", "configs/lm/longlora_finetune.yaml"),
    "configs/lm/seer_distill.yaml": ("configs/lm/attention_512.yaml",),
}
# Overrides a config needs to run on a 4-chip slice at all: LongLoRA's fine-tunes take 2 sequences per step (sized
# for one CPU device), which 4 data-parallel chips cannot split (effarch plan's PlanError), so their jobs take 4.
SLICE_OVERRIDES = {"configs/lm/longlora_finetune.yaml": ("train.batch_size=4",),
                   "configs/lm/longlora_s2.yaml": ("train.batch_size=4",)}


def _load(config: str):
    return load_config([REPO / c for c in (*BASES.get(config, ()), config)])


def _mixers(config: str) -> list[str]:
    return list(dict.fromkeys(_load(config).model.mixers))


def _kernel_keys(config: str) -> set[str]:
    """The config keys whose `pallas_tpu` option puts Mosaic kernels into this config's training step."""
    model = _load(config).model
    keys = {key for mixer in model.mixers for key in MIXERS[mixer].configs}
    if model.sparse_attention.distill:
        # SeerAttention's distillation trains on the dense pass that emits the block map (block_stats_attention:
        # reference and xla paths only, layers/sparse_seer.py); the block-sparse kernel is not in its step.
        keys.discard("sparse_attention")
    return keys


def _params():
    for config in CONFIGS:
        one_layer = config in ONE_LAYER_CONFIGS
        fit, kernel_keys = SLICE_OVERRIDES.get(config, ()), _kernel_keys(config)
        job = functools.partial(step_job, config, bases=BASES.get(config, ()))
        name = config.removeprefix("configs/").removesuffix(".yaml")
        if one_layer and ONE_LAYER_CONFIGS[config]:  # without overrides it is the full config's job on that chip below
            yield pytest.param(job(SLICES[ONE_LAYER_CHIP], fit + ONE_LAYER_CONFIGS[config]),
                               id=f"{name}-{ONE_LAYER_CHIP}-one-layer-per-mixer", marks=[pytest.mark.slow])
        for chip in SLICES:
            yield pytest.param(job(SLICES[chip], fit), id=f"{name}-{chip}", marks=[pytest.mark.slow])
            for key, override in PALLAS_TPU.items():
                if key in kernel_keys:
                    yield pytest.param(job(SLICES[chip], (*fit, override), MIN_KERNELS),
                                       id=f"{name}-{chip}-{key}-pallas_tpu", marks=[pytest.mark.slow])
    # Heads split too (data 2 x tensor 2): the kernels' shard_map over batch and heads (pallas_kernels/shard.py).
    yield pytest.param(step_job("configs/lm/tnl_small.yaml", SLICES[ONE_LAYER_CHIP],
                                (PALLAS_TPU["lightning"], "mesh.data=2", "mesh.tensor=2"), MIN_KERNELS),
                       id="lm/tnl_small-tensor2-lightning-pallas_tpu", marks=[pytest.mark.slow])


@pytest.mark.parametrize("job", list(_params()))
def test_train_step_compiles_for_tpu(job, compile_results):
    result = compile_results[job.name]
    assert result.ok, str(result)


def test_the_one_layer_jobs_cover_every_mixer():  # MQAR Titans MAC has Zoology's BaseConv layers
    untested = {m for c in CONFIGS for m in _mixers(c)} - {m for c in ONE_LAYER_CONFIGS for m in _mixers(c)}
    assert set(ONE_LAYER_CONFIGS) <= set(CONFIGS)
    assert not untested, untested


def test_job_names_are_unique():  # the slow matrix's fixture refuses duplicates (a whole module's setup error)
    names = [param.values[0].name for param in _params()]
    assert len(set(names)) == len(names), sorted(n for n in set(names) if names.count(n) > 1)

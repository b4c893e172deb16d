"""`effarch plan` (train/plan.py): bad input exits 2 in one line before anything compiles; a tiny config compiles for
a 4-chip v5e slice through the CLI (child process, JSON report); parameters and optimizer state sharded with
`mesh.fsdp=-1` take fewer bytes per device on a larger slice; a model too large for the chip exits 1 naming what
would help; a child killed by a signal (what a libtpu abort does) becomes one line."""

import importlib.util
import json
import signal
from pathlib import Path

import pytest

from effarch.train import plan as plan_mod
from effarch.train.config import load_config
from tests.helpers.cli import cli, one_error_line

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "lm" / "quickstart.yaml"
# One attention layer at d_model 32 over 64-token windows: compiles in seconds.
TINY = ["model.d_model=32", "model.n_layers=1", "model.mixers=[attention]", "data.seq_len=64", "train.batch_size=16",
        "train.eval_batch_size=16"]

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the tpu / test extra) compiles for TPU")




@pytest.mark.parametrize("topology, words", [
    ("v9:2x2", ["unknown topology", "v5p:AxBxC", "v5e:AxB"]),
    ("v5p:2x2", ["v5p topology has 3 dimensions"]),
    ("tpu-64", ["unknown topology"]),
])
def test_unknown_topology_exits_2_naming_the_forms(capsys, topology, words):
    code, out, err = cli(capsys, "plan", QUICKSTART, "--topology", topology)
    line = one_error_line(err, alone=True)
    assert code == 2 and not out and all(w in line for w in words), line


@pytest.mark.parametrize("overrides, words", [
    (["mesh.data=3"], ["mesh", "4 devices"]),  # 3 does not divide the slice's 4 chips
    (["train.batch_size=6"], ["train.batch_size=6", "mesh.data = 4"]),  # 6 rows over 4 data shards
    # 4 rows split over mesh.data=4 but not over the 16 hosts of a 64-chip v5p slice
    (["mesh.data=4", "mesh.tensor=16", "train.batch_size=4", "train.eval_batch_size=4"],
     ["train.batch_size=4", "16 processes"]),
])
def test_mesh_and_batch_errors_exit_2(capsys, overrides, words):
    topology = "v5p:4x4x4" if "16 processes" in words else "v5e:2x2"  # 64 chips on 16 four-chip hosts
    code, _, err = cli(capsys, "plan", QUICKSTART, *overrides, "--topology", topology)
    line = one_error_line(err, alone=True)
    assert code == 2 and all(w in line for w in words), line


def test_missing_libtpu_names_the_install_command(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    code, _, err = cli(capsys, "plan", QUICKSTART, "--topology", "v5e:2x2")
    assert code == 2 and "pip install 'effarch[tpu]'" in one_error_line(err, alone=True)


def test_topology_hosts_and_processes():
    # v5e / v6e slices of up to 8 chips are one host; bigger ones and every v4 / v5p slice have 4-chip hosts.
    assert plan_mod.parse_topology("v5e:2x4").processes == 1
    assert plan_mod.parse_topology("v6e:16x16").processes == 64
    assert plan_mod.parse_topology("v5p:4x4x4").processes == 16
    assert plan_mod.parse_topology("v5p:2x2x1", num_slices=2).devices == 8


@needs_libtpu
@pytest.mark.slow  # the plan CLI end to end (~9 s); test_plan's other tests plan in-process
def test_tiny_plan_on_v5e_through_the_cli(capsys):
    code, out, err = cli(capsys, "plan", QUICKSTART, *TINY, "--topology", "v5e:2x2", "--json")
    assert code == 0, err
    report = json.loads(out)
    for key in ("topology", "devices", "params", "per_device_bytes", "hbm_bytes", "fits", "flops_per_step",
                "estimated_step_s"):
        assert key in report
    assert set(report["per_device_bytes"]) >= {"arguments", "outputs", "temporaries", "total"}
    assert report["topology"] == "v5e:2x2" and report["devices"] == 4 and report["fits"]
    assert report["hbm_bytes"] == 16 * 2**30 and report["mixers"] == ["attention"]
    b = report["per_device_bytes"]
    # data parallel: every device holds all parameters (float32) and both AdamW moments
    assert b["parameters"] == 4 * report["params"] and b["optimizer_state"] >= 2 * b["parameters"]
    assert b["arguments"] >= b["parameters"] + b["optimizer_state"]
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["generated_code"]
    assert report["flops_per_step"] > 6 * report["params"] * 16 * 64 * 0.5  # at least about the dense matmuls


@pytest.mark.slow  # two TPU compiles
@needs_libtpu
def test_fsdp_argument_bytes_shrink_with_the_slice():
    cfg = load_config([QUICKSTART], [*TINY, "mesh.fsdp=-1", "mesh.data=1"])
    small, large = (plan_mod.plan(cfg, t, decode=False) for t in ("v5e:2x2", "v5e:4x4"))
    assert (small.devices, large.devices) == (4, 16)
    state = small.param_bytes + small.optimizer_bytes
    assert large.param_bytes + large.optimizer_bytes < state / 2  # the embedding and projections are sharded
    assert large.train.arguments < small.train.arguments


@pytest.mark.slow  # two TPU compiles
@needs_libtpu
def test_fsdp_activations_are_split_over_the_batch_like_data_parallel():
    # FSDP splits the batch over the same mesh axis as the weights. Without the trainer's constraints on the hidden
    # states and logits (Trainer._split_rows) the compiler kept activations whole on every chip: 6.6x the data-parallel
    # temporaries at this activation-heavy size (22.4 vs 3.4 MB); 2.8x with them (the rest: gathered weights and
    # their gradients' buffers).
    size = ["model.d_model=64", "model.n_layers=2", "model.mixers=[attention]", "data.seq_len=512",
            "train.batch_size=32", "train.eval_batch_size=32"]
    fsdp, data = (plan_mod.plan(load_config([QUICKSTART], [*size, *mesh]), "v5e:2x2", decode=False)
                  for mesh in (["mesh.fsdp=-1", "mesh.data=1"], ["mesh.data=-1"]))
    assert fsdp.train.temporaries <= 3 * data.train.temporaries, (fsdp.train.temporaries, data.train.temporaries)


@pytest.mark.slow
@needs_libtpu
def test_too_large_a_model_exits_1_with_advice(capsys):
    # ~1.7B parameters, data parallel, on 16 GiB v5e chips: parameters + AdamW moments alone are ~20 GiB per chip.
    big = ["model.d_model=4096", "model.n_layers=8", "model.mixers=[attention]", "model.attention.n_heads=32",
           "data.seq_len=512", "train.batch_size=8", "train.eval_batch_size=8"]
    code, out, err = cli(capsys, "plan", QUICKSTART, *big, "--topology", "v5e:2x2")
    assert code == 1, err
    assert "DOES NOT FIT" in out and "mesh.fsdp=-1" in out and "model.remat=true" in out


def _killed_child(monkeypatch, sig: int, stderr: str, topology: str) -> dict:
    """run_in_subprocess's answer when the child dies by `sig` after announcing the train step of titans_mac."""
    class Killed:
        returncode = -sig
        stdout = "effarch-plan-mixers: titans_mac\neffarch-plan-stage: train\n"

    Killed.stderr = stderr
    monkeypatch.setattr(plan_mod.subprocess, "run", lambda *a, **k: Killed())
    out = plan_mod.run_in_subprocess([QUICKSTART], [], topology)
    assert out["code"] == plan_mod.EXIT_NO_COMPILE and "\n" not in out["error"]
    return out


def test_a_killed_child_is_one_line(monkeypatch):
    out = _killed_child(monkeypatch, signal.SIGABRT, "F0000 ... Check failed: rank == best_window_bounds_in_chunks"
                        ".size() Cannot find a valid window\n", "v5p:2x2x1")
    assert out["error"].startswith("the TPU compiler aborted (SIGABRT) on the train step of titans_mac for v5p:2x2x1")
    assert "Check failed: rank == best_window_bounds_in_chunks.size()" in out["error"]


def test_a_child_killed_for_memory_says_so(monkeypatch):
    """SIGKILL is not a compiler abort: on a host without enough RAM for the compile, the OOM killer sends it."""
    out = _killed_child(monkeypatch, signal.SIGKILL, "", "v5p:2x4x4")
    assert out["error"].startswith("the planning process was killed (SIGKILL) on the train step of titans_mac")
    assert "out-of-memory killer" in out["error"] and "host RAM" in out["error"]


def test_largest_arrays_reads_the_hlo_outside_fusions():
    hlo = """HloModule m

%fused_computation (p: f32[1024,1024]) -> f32[1024,1024] {
  %p = f32[1024,1024]{1,0} parameter(0)
  ROOT %big = f32[1024,1024]{1,0} exponential(%p)
}

ENTRY %main (a: f32[8,8]) -> f32[16,256] {
  %a = f32[64,1024]{1,0} parameter(0)
  %dot.1 = bf16[16,256]{1,0} dot(%a, %a), metadata={op_name="jit(step)/dot_general"}
  ROOT %f = f32[16,256]{1,0} fusion(%dot.1), kind=kLoop, calls=%fused_computation
}
"""
    assert plan_mod.largest_arrays(hlo) == [(16384, "f32[16,256] fusion"),
                                            (8192, "bf16[16,256] jit(step)/dot_general")]


@pytest.mark.parametrize("temporaries, expected", [("24.11G", int(24.11 * 2**30)), ("4.28T", int(4.28 * 2**40)),
                                                    ("512.5M", int(512.5 * 2**20))])
def test_a_compiler_hbm_refusal_is_a_does_not_fit(temporaries, expected):
    """libtpu writes the size with a binary unit that grows with it (a [T, T] score matrix at 32k tokens: "4.28T")."""
    class Refused:
        def lower(self, *args):
            return self

        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
                               f"memory required for HLO temporaries ({temporaries}) exceeds available HBM (15.75G).")

    import jax

    with pytest.raises(plan_mod.HbmOom) as e:
        plan_mod._compile(jax.make_mesh((1,), ("x",)), Refused(), (), "training step of attention")
    assert (e.value.temporaries, e.value.available) == (expected, int(15.75 * 2**30))
    step = plan_mod._oom_report(e.value, arguments=2**30)
    assert step.total == 2**30 + expected and "CompileTimeHbmOom" in step.compiler_oom


def test_text_report_of_a_does_not_fit():
    """The text report and the advice from a PlanReport built by hand (no compile): a data-parallel model whose
    parameters and AdamW moments alone exceed a 16 GiB chip."""
    cfg = load_config([QUICKSTART], [*TINY, "train.batch_size=64", "train.eval_batch_size=64"])
    step = plan_mod.StepReport(arguments=20 * 2**30, outputs=20 * 2**30, aliased=20 * 2**30, temporaries=2**30,
                               generated_code=2**20, flops=1e12, bytes_accessed=1e9, optimal_seconds=None,
                               largest=[(2**30, "f32[16,2048,8192] jit(_checked_step)/jvp()/dot_general")])
    report = plan_mod.PlanReport(
        topology="v5e:2x2", num_slices=1, devices=4, processes=1, device_kind="TPU v5 lite",
        mesh={"data": 4, "fsdp": 1, "tensor": 1}, mixers=["attention"], params=1_700_000_000,
        param_bytes=6 * 2**30, optimizer_bytes=14 * 2**30, batch_size=64, seq_len=64, hbm_bytes=16 * 2**30,
        peak_bf16_flops=197e12, train=step, decode=None, decode_batch=4, largest_leaves=[(2**28, "parameter x")],
        advice=[])
    report.advice = plan_mod.advice(cfg, report)
    assert not report.fits and report.roofline_step_s == pytest.approx(1e12 / 197e12)
    text = plan_mod.format_report({**report.to_json(), "warnings": []}, "big.yaml")
    assert "DOES NOT FIT" in text and "step time: unknown" in text and "f32[16,2048,8192]" in text
    assert "mesh.fsdp=-1" in text and "model.remat=true" in text and "train.grad_accum_steps=2" in text
    assert text.splitlines()[-1].startswith("effarch plan: does not fit: 21.00 GiB per device > 16.00 GiB HBM")

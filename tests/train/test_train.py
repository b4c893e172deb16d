"""End-to-end training runs on a tiny config: resume after SIGTERM or a hard kill, NaN stop, sharding parity."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.devices import eight_cpu_devices

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"
BASE = ROOT / "configs" / "mqar" / "zoology_attention.yaml"


def run_cli(run_dir, *overrides, wait=True, timeout=300, env=None):
    cmd = [sys.executable, "-m", "effarch.train", str(BASE), str(TINY), f"train.run_dir={run_dir}", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def wait_for_step(run_dir, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = Path(run_dir) / "metrics.jsonl"
        if f.exists() and len(losses(run_dir)) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError


# The kill comes at step 30 (polled every 20 ms); 120 steps leave the run ~90 steps it cannot finish before it.
STEPS = ["train.steps=120", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=20"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    out = run_cli(run_dir, *STEPS)
    assert out.returncode == 0, out.stderr
    assert "effarch: done: step 120/120" in out.stdout
    return losses(run_dir)


# SIGKILL (the harder case: nothing is saved at the signal) in the default suite; SIGTERM's checkpoint-at-the-signal
# is also covered by tests/train/test_loop.py, so its end-to-end run is slow.
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL])
def test_interrupt_then_resume_matches_uninterrupted(tmp_path, reference_run, sig):
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, *STEPS, wait=False)
    wait_for_step(run_dir, 30, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    first = losses(run_dir)
    stopped_at = max(first)
    assert stopped_at < 120, "the run finished before the signal; the test did not interrupt anything"
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, stderr
        assert "stopped by SIGTERM" in stdout
        ckpt_steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        assert ckpt_steps[-1] == stopped_at  # a checkpoint at the step where it stopped
    else:
        assert proc.returncode == -signal.SIGKILL
    out = run_cli(run_dir, *STEPS)
    assert out.returncode == 0, out.stderr
    resumed = losses(run_dir)  # a killed run re-logs the steps after its last checkpoint: the later value wins
    assert sorted(resumed) == sorted(reference_run)
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [reference_run[s] for s in sorted(resumed)],
                               rtol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(run_dir, "train.steps=50", "train.checkpoint_every=1", "optim.lr=1e30", "optim.warmup_steps=0",
                  "optim.clip_norm=null", "train.async_checkpoint=false")
    assert out.returncode == 3, (out.stdout, out.stderr)
    msg = out.stderr.strip().splitlines()[-1]
    assert msg.startswith("effarch: error: loss is") and "Last good checkpoint: step" in msg, msg
    good = int(msg.split("Last good checkpoint: step ")[1].split()[0])
    ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and ckpts[-1] == good
    assert good < max(losses(run_dir), default=0) + 1  # nothing saved after the bad step


# The refusal itself is tests/train/test_run_dir.py's (in-process); this is the CLI end to end.
@pytest.mark.slow
def test_resume_refuses_a_different_model(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, "train.steps=2").returncode == 0
    out = run_cli(run_dir, "train.steps=4", "model.d_model=48")
    assert out.returncode == 2
    assert "config differs in model.d_model (32 -> 48)" in out.stderr


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from effarch.train.config import load_config
    from effarch.train.train import Trainer
    from effarch.train.data import build_data
    assert jax.device_count() == 8, jax.devices()
    results = {{}}
    for name, devices, mesh in [("one", jax.devices()[:1], (1, 1, 1)), ("eight", jax.devices(), (2, 2, 2))]:
        c = load_config([r"{base}", r"{tiny}"], ["train.batch_size=16", "train.grad_accum_steps={accum}",
            "model.n_layers=2", "model.mlp.kind=swiglu", "model.attention.n_heads=2", "model.tie_embeddings=false",
            f"mesh.data={{mesh[0]}}", f"mesh.fsdp={{mesh[1]}}", f"mesh.tensor={{mesh[2]}}"])
        tr = Trainer(c, devices)
        stream, _ = build_data(c.data, c.model.vocab_size, c.train.batch_size)
        params, opt, rng = tr.init_state(0)
        out = []
        for step in range(3):
            params, opt, m = tr.train_step(params, opt, *tr.global_batch(*stream.batch(step)))
            out.append(float(m["loss"]))
        results[name] = out
        if name == "eight":
            specs = {{str(getattr(x.sharding, "spec", None)) for x in jax.tree.leaves(params)}}
            print("SPECS", sorted(specs))
            print("OPTSPECS", sorted({{str(getattr(x.sharding, "spec", None)) for x in jax.tree.leaves(opt)}}))
    print("LOSSES", results)
    np.testing.assert_allclose(results["eight"], results["one"], rtol=2e-5)
    print("OK")
""")


# accum=2 covers sharding and accumulation together; each mixer's sharded step is in tests/conformance/test_mesh.py.
@pytest.mark.parametrize("accum", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sharded_train_step_matches_one_device(tmp_path, accum):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(base=BASE, tiny=TINY, accum=accum))
    env = eight_cpu_devices()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout
    # parameters really are split over the mesh axes, not replicated
    for tag in ("SPECS", "OPTSPECS"):  # Adam's moments are sharded like their parameters
        specs_line = next(line for line in out.stdout.splitlines() if line.startswith(tag))
        assert "tensor" in specs_line and "fsdp" in specs_line, specs_line


# Heavy end-to-end (a minute or more on 2 cores): the slow suite (`-m slow`), so the default stays under 10 min.
@pytest.mark.slow
def test_generate_cli_and_greedy_matches_forward(tmp_path, capsys):
    import jax.numpy as jnp

    from effarch.train.generate import generate, load_model
    from effarch.train.main import main

    run_dir = tmp_path / "run"
    assert run_cli(run_dir, "train.steps=3").returncode == 0

    def gen(*args):  # the CLI in-process: (exit code, stdout, stderr)
        try:
            main(["generate", *args])
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = gen(str(run_dir), "--prompt", "5 9 130 7", "--max-new-tokens", "6")
    assert code == 0, err
    toks = [int(t) for t in out.split()]
    assert len(toks) == 6 and all(0 <= t < 256 for t in toks)
    # A KV policy whose budget covers the 10 tokens generates the same tokens.
    code, out_policy, err = gen(str(run_dir), "--prompt", "5 9 130 7", "--max-new-tokens", "6", "--kv-policy",
                                "quest", "budget=16", "page=4")
    assert code == 0 and out_policy == out, err
    sampled = [gen(str(run_dir), "--prompt", "5 9", "--temperature", "1.0", "--seed", "3") for _ in range(2)]
    assert sampled[0][0] == 0 and sampled[0][1] == sampled[1][1]  # seeded sampling is reproducible
    code, _, err = gen(str(run_dir), "--prompt", "5 999")
    assert code == 2 and "prompt token ids must be in [0, 256)" in err
    for bad in ("nan", "inf", "-1"):  # nan used to print "0 0 0"
        code, _, err = gen(str(run_dir), "--prompt", "5", "--temperature", bad)
        assert code == 2 and "--temperature must be a finite number >= 0" in err and err.count("\n") == 1
    code, _, err = gen(str(run_dir), "--text", "ab")  # an MQAR model's tokens are not bytes
    assert code == 2 and "was trained on data.task mqar, whose tokens are not text" in err
    for n, why in ((str(2**31 - 8), "GiB of decode state"), (str(2**31), "2^31 - 1")):
        code, _, err = gen(str(run_dir), "--prompt", "5", "--max-new-tokens", n)
        assert code == 2 and why in err and err.count("\n") == 1, err
    code, _, err = gen(str(tmp_path / "nope"), "--prompt", "1")
    assert code == 2 and "has no config.yaml" in err

    # Greedy decoding through prefill + decode_step == argmax of full forward passes over the growing sequence.
    model = load_model(run_dir)
    prompt = np.array([[5, 9, 130, 7], [1, 2, 3, 4]])
    new = generate(model, prompt, 5)
    seq = jnp.asarray(prompt)
    for i in range(5):
        nxt = jnp.argmax(model(seq)[:, -1], -1)
        np.testing.assert_array_equal(np.asarray(nxt), new[:, i])
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], 1)


def _trainer(overrides, tmp_path):
    from effarch.train.config import load_config
    from effarch.train.data import build_data
    from effarch.train.train import Trainer

    cfg = load_config([BASE, TINY], [f"train.run_dir={tmp_path}", "train.batch_size=8", *overrides])
    tr = Trainer(cfg)
    stream, _ = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    params, opt, _ = tr.init_state(0)
    return tr, params, opt, tr.global_batch(*stream.batch(0))


def _one_step(overrides, tmp_path):
    import jax

    tr, params, opt, batch = _trainer(overrides, tmp_path)
    params, opt, m = tr.train_step(params, opt, *batch)
    return jax.tree.leaves(params), m


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    import jax

    from tests.helpers.numerics import assert_close

    results = {}
    for accum in (1, 4):
        tr, params, _, batch = _trainer([f"train.grad_accum_steps={accum}"], tmp_path)
        results[accum] = jax.jit(tr.gradients)(params, *batch)
    (g1, loss1, acc1, _), (g4, loss4, acc4, _) = results[1], results[4]
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
    assert float(acc4) == float(acc1)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        assert_close("grad", a, b, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_master_params(tmp_path):
    import jax

    p16, m16 = _one_step(["train.compute_dtype=bfloat16"], tmp_path)
    assert all(x.dtype == np.float32 for x in p16)
    assert np.isfinite(float(m16["loss"]))
    # The bf16 forward computes the same model. At initialisation every loss is ~ln V whatever the forward does,
    # so the weights are scaled up first: confident, input-dependent logits far from uniform.
    losses = {}
    for dtype in ("float32", "bfloat16"):
        tr, params, _, batch = _trainer([f"train.compute_dtype={dtype}"], tmp_path)
        params = jax.tree.map(lambda x: 6.0 * x, params)
        ce, _, count = jax.jit(tr._forward_loss)(params, *batch)
        losses[dtype] = float(ce) / float(count)
    assert abs(losses["float32"] - np.log(256)) > 0.5 * np.log(256), losses  # not the uniform loss
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * losses["float32"], losses


# Heavy end-to-end (a minute or more on 2 cores): the slow suite (`-m slow`), so the default stays under 10 min.
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Multi-host: 2 processes x 4 CPU devices over jax.distributed on loopback == 1 process x 8 devices."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train.steps=4", "train.checkpoint_every=2", "mesh.fsdp=2"]
    single = run_cli(tmp_path / "single", *args, env={"XLA_FLAGS": eight_cpu_devices()["XLA_FLAGS"]})
    assert single.returncode == 0, single.stderr
    procs = [
        run_cli(tmp_path / "multi", *args, wait=False,
                env={"EFFARCH_COORDINATOR": f"127.0.0.1:{port}", "EFFARCH_NUM_PROCESSES": "2",
                     "EFFARCH_PROCESS_ID": str(i), "JAX_NUM_CPU_DEVICES": "4"})
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    multi, one = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([multi[s] for s in one], [one[s] for s in one], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

"""Fine-tuning from checkpoints (train/finetune.py) and frozen parameters."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.train import param_tree
from effarch.train.checkpoint import Checkpointer
from effarch.train.config import ConfigError, load_config
from tests.helpers.devices import eight_cpu_devices

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"
BASE = ROOT / "configs" / "mqar" / "zoology_attention.yaml"


def cfg(run_dir, *overrides):
    return load_config([BASE, TINY], [f"train.run_dir={run_dir}", "train.async_checkpoint=false", *overrides])


def train(run_dir, *overrides):
    from effarch.train.train import train_and_evaluate

    return train_and_evaluate(cfg(run_dir, *overrides))


def saved_params(run_dir) -> dict:
    """{path: np.ndarray} of the newest checkpoint of a run."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    step = ckpt.steps()[-1]
    raw = ckpt.manager.item_metadata(step)["params"].tree
    one = jax.sharding.make_single_device_sharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), raw)
    out = ckpt.restore(step, target)[0]
    ckpt.close()
    return {k: np.asarray(v) for k, v in param_tree.flatten(out).items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-layer model without MLPs, vocabulary 256, trained a few steps."""
    run_dir = tmp_path_factory.mktemp("src") / "run"
    train(run_dir, "train.steps=3", "model.n_layers=3")
    return run_dir


def fresh_params(c):
    from effarch.train.train import Trainer

    return Trainer(c).init_state(c.train.seed)[0]


def test_init_from_reports_and_copies_bitwise(source, tmp_path):
    from effarch.train.finetune import init_from_checkpoint

    src = saved_params(source)
    # The new model: a larger vocabulary, 2 layers instead of 3, SwiGLU MLPs added.
    c = cfg(tmp_path / "ft", "model.vocab_size=300", "model.n_layers=2", "model.mlp.kind=swiglu")
    params = fresh_params(c)
    with pytest.raises(ConfigError, match=r"1 parameter\(s\) differ in shape.*embed/embedding \(256, 32\) -> "
                                          r"\(300, 32\); set train.init_mismatch=overlap"):
        init_from_checkpoint(params, source)
    fresh = {k: np.asarray(v) for k, v in param_tree.flatten(params).items()}
    out, report = init_from_checkpoint(params, source, "overlap")
    got = {k: np.asarray(v) for k, v in param_tree.flatten(out).items()}
    assert report["step"] == 3
    assert report["dropped"] and all(p.startswith("blocks/2/") for p in report["dropped"])
    assert report["new"] and all("/mlp/" in p or "/norm2/" in p for p in report["new"])
    assert [r["path"] for r in report["reshaped"]] == ["embed/embedding"]
    assert set(report["loaded"]) | set(report["new"]) | {"embed/embedding"} == set(got)
    for p in report["loaded"]:
        np.testing.assert_array_equal(got[p], src[p])  # bitwise
        assert not np.array_equal(got[p], fresh[p]) or np.array_equal(src[p], fresh[p])
    for p in report["new"]:
        np.testing.assert_array_equal(got[p], fresh[p])
    np.testing.assert_array_equal(got["embed/embedding"][:256], src["embed/embedding"])
    np.testing.assert_array_equal(got["embed/embedding"][256:], fresh["embed/embedding"][256:])
    out, _ = init_from_checkpoint(params, source / "checkpoints" / "3", "init")  # a checkpoint dir works too
    np.testing.assert_array_equal(np.asarray(param_tree.flatten(out)["embed/embedding"]), fresh["embed/embedding"])


def test_init_from_bad_sources_fail_in_one_line(tmp_path, source):
    from effarch.train.finetune import init_from_checkpoint

    params = fresh_params(cfg(tmp_path / "ft"))
    with pytest.raises(ConfigError, match="train.init_from: .*nope' does not exist"):
        init_from_checkpoint(params, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run directory"):
        init_from_checkpoint(params, tmp_path / "empty")


def test_finetune_at_a_longer_context_with_frozen_parameters(source, tmp_path):
    run_dir = tmp_path / "ft"
    freeze = '["^embed/", "^blocks/0/"]'
    result = train(run_dir, f"train.init_from={source}", "model.n_layers=3", "train.steps=3",
                   "data.mqar.train_segments=[[64, 4, 256]]", "data.mqar.test_segments=[[64, 4, 64]]",  # 2x the length
                   f"train.freeze={freeze}")
    assert result.step == 3 and np.isfinite(result.train_metrics["loss"])
    report = json.loads((run_dir / "init_report.json").read_text())
    assert report["new"] == [] and report["dropped"] == [] and report["reshaped"] == []
    before, after = saved_params(source), saved_params(run_dir)
    frozen = [p for p in after if p.startswith(("embed/", "blocks/0/"))]
    assert frozen
    for p in after:
        if p in frozen:
            np.testing.assert_array_equal(after[p], before[p])  # no update at all
        elif after[p].ndim >= 2:
            assert not np.array_equal(after[p], before[p]), p  # what trains moved
    # Frozen parameters hold no optimizer state.
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    opt_paths = list(ckpt.item_metadata(3, "opt_state"))
    ckpt.close()
    assert any(p.endswith("blocks/1/mixer/q_proj/kernel") for p in opt_paths)
    assert not any(p.endswith(f) for p in opt_paths for f in frozen)


def test_weight_decay_skips_conv_taps_norms_and_biases(tmp_path):
    from effarch.arches.lm import DecoderLM
    from effarch.train.train import Trainer, decays

    c = cfg(tmp_path / "r")
    abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(c.model, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    decided = param_tree.flatten(param_tree.map_variables(decays, abstract))
    assert decided["blocks/0/mixer/conv/weight"] is False  # [k, D] taps: 2-D but not a matrix
    assert decided["blocks/0/mixer/conv/bias"] is False and decided["blocks/0/norm1/scale"] is False
    assert decided["blocks/1/mixer/q_proj/kernel"] is True and decided["embed/embedding"] is True
    # And the optimizer really leaves them alone: with lr ~ 0 and zero gradients only decay would move a weight.
    tr = Trainer(load_config([BASE, TINY], ["optim.weight_decay=0.5", "optim.lr=1.0", "optim.b1=0", "optim.b2=0",
                                            "optim.warmup_steps=0", "optim.schedule=constant"]))
    params, opt, _ = tr.init_state(0)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tr.tx.update(zeros, opt, params)
    moved = {k: bool(np.any(np.asarray(v) != 0)) for k, v in param_tree.flatten(updates).items()}
    assert moved == {k: bool(v) for k, v in decided.items()}


RESHARD = textwrap.dedent("""
    import jax, numpy as np
    from effarch.train.config import load_config
    from effarch.train.train import train_and_evaluate
    from tests.train.test_finetune import saved_params, BASE, TINY
    assert jax.device_count() == 8
    def c(run, *o):
        return load_config([BASE, TINY], [f"train.run_dir={{run}}", "train.async_checkpoint=false",
                                          "model.mlp.kind=swiglu", "model.tie_embeddings=false", *o])
    one = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    eight = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=8"]
    train_and_evaluate(c(r"{tmp}/one", "train.steps=2", *one), devices=jax.devices()[:1])
    # Fine-tune on 2x2x2 from the 1-device run: the loaded arrays are the saved ones, now split over the mesh.
    from effarch.train.finetune import init_from_checkpoint
    from effarch.train.train import Trainer
    tr = Trainer(c(r"{tmp}/ft", *eight))
    params = tr.init_state(0)[0]
    out, report = init_from_checkpoint(params, r"{tmp}/one")
    assert not report["new"] and not report["dropped"] and not report["reshaped"]
    src = saved_params(r"{tmp}/one")
    from effarch.train import param_tree
    specs = set()
    for p, x in param_tree.flatten(out).items():
        np.testing.assert_array_equal(np.asarray(x), src[p])
        assert x.sharding == param_tree.flatten(params)[p].sharding
        specs.add(str(x.sharding.spec))
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    r = train_and_evaluate(c(r"{tmp}/ft", "train.steps=2", f"train.init_from={tmp}/one", *eight))
    assert r.step == 2
    # Resuming the 1-device run on the 2x2x2 mesh: a mesh change is allowed.
    r = train_and_evaluate(c(r"{tmp}/one", "train.steps=4", *eight))
    assert r.step == 4
    print("OK")
""")


# Heavy end-to-end (a minute or more on 2 cores): the slow suite (`-m slow`), so the default stays under 10 min.
@pytest.mark.slow
def test_restore_into_another_mesh(tmp_path):
    script = tmp_path / "reshard.py"
    script.write_text(RESHARD.format(tmp=tmp_path))
    env = eight_cpu_devices(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout


def test_write_run_makes_a_run_that_generates_and_fine_tunes(source, tmp_path):
    # The I/O half of `effarch convert` (and of importers): a run directory at step 0 holding given parameters.
    from effarch.train.convert import load_run_params, write_run
    from effarch.train.generate import load_model

    c, params = load_run_params(source)
    out = write_run(c, params, tmp_path / "copy")
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]
    model = load_model(out)
    got = {k: np.asarray(v) for k, v in param_tree.flatten(nnx.split(model, nnx.Param, ...)[1]).items()}
    src = saved_params(source)
    assert got.keys() == src.keys()
    for p in src:
        np.testing.assert_array_equal(got[p], src[p])
    with pytest.raises(ConfigError, match="already holds a run"):
        write_run(c, params, out)
    result = train(tmp_path / "ft", f"train.init_from={out}", "model.n_layers=3", "train.steps=1")
    assert json.loads((tmp_path / "ft" / "init_report.json").read_text())["new"] == [] and result.step == 1


# Heavy end-to-end (a minute or more on 2 cores): the slow suite (`-m slow`), so the default stays under 10 min.
@pytest.mark.slow
def test_convert_cli_to_diffqkv_keeps_the_logits_and_fine_tunes(source, tmp_path, capsys):
    from effarch.train.generate import load_model
    from effarch.train.main import main

    out = tmp_path / "dq"
    main(["convert", str(source), str(out), "--to", "diffqkv"])  # keeps the KV heads: exact
    assert "converted" in capsys.readouterr().out
    base, conv = load_model(source), load_model(out)
    assert conv.cfg.layer_mixers() == ("zoology_base_conv", "diffqkv", "zoology_base_conv")
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    np.testing.assert_allclose(np.asarray(conv(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit) as e:
        main(["convert", str(source), str(tmp_path / "bad"), "--to", "nope"])
    assert e.value.code == 2 and "unknown conversion 'nope'" in capsys.readouterr().err
    for option, message in (("n_k_heads=abc", "n_k_heads: expected int or None, got 'abc'"),
                            ("nosuch=1", "unknown option 'nosuch'; its options are n_k_heads, n_v_heads")):
        with pytest.raises(SystemExit) as e:
            main(["convert", str(source), str(tmp_path / "bad"), "--to", "diffqkv", option])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"effarch: error: convert --to diffqkv: {message}\n" == err
    assert not (tmp_path / "bad").exists()
    cfg_path = out / "config.yaml"
    from effarch.train.train import train_and_evaluate

    c = load_config([cfg_path], [f"train.run_dir={tmp_path / 'ft'}", f"train.init_from={out}", "train.steps=1"])
    assert train_and_evaluate(c).step == 1
    assert json.loads((tmp_path / "ft" / "init_report.json").read_text())["new"] == []

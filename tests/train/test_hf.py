"""train/hf.py and the CLI: `effarch import-hf` writes a run dir that `effarch generate` and the train loop's
checkpoint code read; sharded checkpoints; `effarch export-hf`; a round trip through transformers when one is
available (`EFFARCH_HF_PYTHON`, or transformers in this interpreter)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.hf_llama import model_config_from_hf, params_from_hf
from effarch.train.hf import INDEX, read_hf_checkpoint, write_hf_checkpoint
from tests.arches.test_hf_llama import FIXTURE, assert_logits_close
from tests.helpers.cli import cli

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
HF_REFERENCE = Path(__file__).resolve().parents[1] / "helpers" / "hf_llama_reference.py"



@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    from effarch.train.hf import import_hf

    import_hf(FIXTURE, run_dir)
    return run_dir


def test_import_hf_cli_then_generate_gives_transformers_greedy_continuation(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "import-hf", FIXTURE, run_dir)
    assert code == 0, err
    assert "2 layers, d_model 48, vocab 199" in out
    prompt = " ".join(map(str, EXPECTED["prompt"]))
    n = len(EXPECTED["greedy_continuation"])
    code, out, err = cli(capsys, "generate", run_dir, "--prompt", prompt, "--max-new-tokens", n)
    assert code == 0, err
    assert [int(t) for t in out.split()] == EXPECTED["greedy_continuation"]
    code, _, err = cli(capsys, "generate", run_dir, "--text", "hello")  # bytes are not this tokenizer's ids
    assert code == 2 and "was imported from Hugging Face without a tokenizer.json" in err
    code, _, err = cli(capsys, "import-hf", FIXTURE, run_dir)  # never overwrites a run
    assert code == 2 and "already holds a run" in err


def test_imported_run_dir_restores_through_the_train_loops_checkpoint_code(imported):
    """What `effarch train` would resume (params, optimizer state, RNG at step 0) and the model's logits."""
    from effarch.train.checkpoint import Checkpointer
    from effarch.train.config import load_config
    from effarch.train.train import Trainer

    cfg = load_config([imported / "config.yaml"])
    assert cfg.model == model_config_from_hf(json.loads((FIXTURE / "config.json").read_text()))
    assert cfg.train.run_dir == str(imported)
    trainer = Trainer(cfg)
    params, opt_state, rng = trainer.init_state(cfg.train.seed)  # random init: the templates
    ckpt = Checkpointer(imported / "checkpoints", async_save=False)
    assert ckpt.steps() == [0]
    params, opt_state, rng, meta = ckpt.restore_latest(params, opt_state, rng)
    ckpt.close()
    assert meta["step"] == 0
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(opt_state) if x.dtype == np.float32)
    logits = trainer.model(params)(jnp.asarray([EXPECTED["prompt"]]))[0]
    assert_logits_close(logits, EXPECTED["logits"])


def test_sharded_checkpoint_reads_like_the_single_file(tmp_path):
    hf_config, tensors = read_hf_checkpoint(FIXTURE)
    sharded = write_hf_checkpoint(tmp_path / "sharded", hf_config, tensors, max_shard_bytes=40_000)
    index = json.loads((sharded / INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3 and not (sharded / "model.safetensors").exists()
    _, back = read_hf_checkpoint(sharded)
    assert set(back) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name])
        assert back[name].dtype == tensors[name].dtype  # bfloat16 stays bfloat16 until the import upcasts


def test_checkpoint_file_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "import-hf", tmp_path / "empty", tmp_path / "run")
    assert code == 2 and "no config.json" in err and err.count("\n") == 1
    hf_config, tensors = read_hf_checkpoint(FIXTURE)
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps(hf_config))
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    code, _, err = cli(capsys, "import-hf", bin_only, tmp_path / "run")
    assert code == 2 and "only safetensors checkpoints are read" in err and err.count("\n") == 1
    sharded = write_hf_checkpoint(tmp_path / "sharded", hf_config, tensors, max_shard_bytes=40_000)
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    code, _, err = cli(capsys, "import-hf", sharded, tmp_path / "run")
    assert code == 2 and "model-00099-of-00099.safetensors, which does not exist" in err


def test_malformed_checkpoints_fail_in_one_line(tmp_path, capsys):
    hf_config, tensors = read_hf_checkpoint(FIXTURE)
    single = write_hf_checkpoint(tmp_path / "single", hf_config, tensors)

    def fails(path, expected, run="run"):
        code, out, err = cli(capsys, "import-hf", path, tmp_path / run)
        assert code == 2 and out == "" and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / run).exists() or run == "file"

    # A config.json that is JSON but not an object.
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    fails(listed, "config.json: expected a JSON object {...}, got a list")
    # An empty and a truncated weights file.
    data = (single / "model.safetensors").read_bytes()
    for name, content in (("empty", b""), ("truncated", data[: len(data) // 2])):
        (single / "model.safetensors").write_bytes(content)
        fails(single, "model.safetensors: not a readable safetensors file")
    # An index naming a shard outside the checkpoint directory is refused before anything is read: the file
    # outside holds every tensor, so reading it would succeed.
    outside = write_hf_checkpoint(tmp_path / "outside", hf_config, tensors)
    sharded = write_hf_checkpoint(tmp_path / "sharded", hf_config, tensors, max_shard_bytes=40_000)
    index = json.loads((sharded / INDEX).read_text())
    for shard in ("../outside/model.safetensors", str(outside / "model.safetensors")):
        weight_map = {**index["weight_map"], "lm_head.weight": shard}
        (sharded / INDEX).write_text(json.dumps({**index, "weight_map": weight_map}))
        fails(sharded, "a shard must be a file name in the checkpoint directory")
    # import-hf into a path that is a file.
    (tmp_path / "file").write_text("not a directory")
    fails(FIXTURE, "exists and is not a directory", run="file")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_unsupported_config_json_fails_in_one_line_from_the_cli(tmp_path, capsys):
    hf_config, tensors = read_hf_checkpoint(FIXTURE)
    bad = write_hf_checkpoint(tmp_path / "bad", {**hf_config, "rope_parameters": {"rope_type": "yarn"}}, tensors)
    code, out, err = cli(capsys, "import-hf", bad, tmp_path / "run")
    assert code == 2 and out == ""
    assert err == ("effarch: error: config.json: rope_parameters.rope_type: 'yarn' is not supported; effarch imports "
                   "'default' and 'llama3'\n")
    assert not (tmp_path / "run").exists()  # nothing written


def test_export_hf_writes_the_checkpoint_back(imported, tmp_path, capsys):
    hf_config, tensors = read_hf_checkpoint(FIXTURE)
    for args, sharded in (((), False), (("--max-shard-mb", "0.04"), True)):
        out_dir = tmp_path / f"export_{sharded}"
        code, _, err = cli(capsys, "export-hf", imported, out_dir, *args)
        assert code == 0, err
        assert (out_dir / INDEX).exists() == sharded
        umask = os.umask(0)
        os.umask(umask)
        for f in out_dir.iterdir():  # safetensors writes 0600; a checkpoint is as readable as any file written here
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
        exported_config, back = read_hf_checkpoint(out_dir)
        assert model_config_from_hf(exported_config) == model_config_from_hf(hf_config)
        assert set(back) == set(tensors)
        for name in tensors:  # bf16 weights upcast to float32 on import come back exactly
            np.testing.assert_array_equal(back[name], tensors[name].astype(np.float32), err_msg=name)
    # The fixture's weights are bfloat16, so a bfloat16 export reproduces its tensors bit for bit.
    assert cli(capsys, "export-hf", imported, tmp_path / "export_bf16", "--dtype", "bfloat16")[0] == 0
    exported_config, back = read_hf_checkpoint(tmp_path / "export_bf16")
    assert exported_config["torch_dtype"] == "bfloat16"
    for name in tensors:
        assert back[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(back[name].astype(np.float32), tensors[name].astype(np.float32), err_msg=name)
    code, _, err = cli(capsys, "export-hf", imported, tmp_path / "export_False")
    assert code == 2 and "already holds a checkpoint" in err


def test_export_refuses_a_model_llama_cannot_express(tmp_path, capsys):
    from effarch.arches.lm import DecoderLM
    from effarch.train.config import Config, ModelConfig
    from effarch.train.convert import write_run

    cfg = Config(model=ModelConfig(vocab_size=16, d_model=8, n_layers=2, mixers=("attention", "based")))
    run_dir = tmp_path / "run"
    write_run(cfg, nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param), run_dir)
    code, _, err = cli(capsys, "export-hf", run_dir, tmp_path / "out")
    assert code == 2 and "model.mixers: ['attention', 'based']: only all-'attention' models export" in err


def _hf_python() -> str | None:
    """An interpreter with transformers + torch: EFFARCH_HF_PYTHON, else this one if it has transformers."""
    if os.environ.get("EFFARCH_HF_PYTHON"):
        return os.environ["EFFARCH_HF_PYTHON"]
    return sys.executable if importlib.util.find_spec("transformers") else None


@pytest.mark.skipif(_hf_python() is None, reason="needs transformers (here, or a Python in EFFARCH_HF_PYTHON)")
def test_round_trip_through_transformers(tmp_path, capsys):
    """A fresh random Llama (tied head, MQA, default RoPE): import -> export (sharded) -> transformers loads it with
    the same logits -> import again gives the same parameters."""
    hf = _hf_python()

    def reference(*args):
        out = subprocess.run([hf, str(HF_REFERENCE), *map(str, args)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    original = tmp_path / "original"
    reference("make", original)
    want = np.asarray(json.loads(reference("logits", original))["logits"], np.float32)
    assert cli(capsys, "import-hf", original, tmp_path / "run")[0] == 0
    assert cli(capsys, "export-hf", tmp_path / "run", tmp_path / "exported", "--max-shard-mb", "0.02")[0] == 0
    assert (tmp_path / "exported" / INDEX).exists()
    assert_logits_close(json.loads(reference("logits", tmp_path / "exported"))["logits"], want)

    from effarch.train.generate import load_model
    from tests.helpers.hf_llama_reference import PROMPT

    assert_logits_close(load_model(tmp_path / "run")(jnp.asarray([PROMPT]))[0], want)
    assert cli(capsys, "import-hf", tmp_path / "exported", tmp_path / "run2")[0] == 0
    first = nnx.to_pure_dict(nnx.state(load_model(tmp_path / "run"), nnx.Param))
    second = nnx.to_pure_dict(nnx.state(load_model(tmp_path / "run2"), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, first, second)
    hf_config, tensors = read_hf_checkpoint(original)
    assert hf_config["tie_word_embeddings"] and "lm_head.weight" not in tensors
    cfg = model_config_from_hf(hf_config)
    jax.tree.map(np.testing.assert_array_equal, first, params_from_hf(tensors, cfg))


@pytest.mark.slow  # ~5 s: the slow suite (the default suite's 10-minute budget)
def test_fine_tune_an_imported_checkpoint_with_init_from(imported, tmp_path):
    """`effarch train ... train.init_from=RUN_DIR` starts from the imported weights: every parameter loaded bitwise."""
    from effarch.train.config import load_config
    from effarch.train.finetune import init_from_checkpoint
    from effarch.train.train import Trainer, train_and_evaluate

    overrides = [f"train.run_dir={tmp_path / 'ft'}", f"train.init_from={imported}", "train.steps=2",
                 "train.batch_size=4", "train.eval_batch_size=4", "train.progress=false", "train.eval_every=2",
                 "data.mqar.train_segments=[[16, 2, 16]]", "data.mqar.test_segments=[[16, 2, 4]]"]
    cfg = load_config([imported / "config.yaml"], overrides)
    trainer = Trainer(cfg)
    params, report = init_from_checkpoint(trainer.init_state(0)[0], imported)
    assert report["new"] == report["dropped"] == report["reshaped"] == [] and report["step"] == 0
    logits = trainer.model(params)(jnp.asarray([EXPECTED["prompt"]]))[0]
    assert_logits_close(logits, EXPECTED["logits"])
    result = train_and_evaluate(cfg)
    assert result.step == 2 and np.isfinite(result.train_metrics["loss"])
    assert json.loads((tmp_path / "ft" / "init_report.json").read_text())["loaded"]


@pytest.mark.parametrize("to, options, exact", [("diffqkv", [], True), ("moh", ["n_shared=2", "top_k=4"], True),
                                                ("moh", ["n_shared=2", "top_k=1"], False)])
def test_imported_llama_converts_to_a_head_efficient_model(imported, tmp_path, to, options, exact):
    """import-hf -> convert: with every head kept (DiffQKV at the checkpoint's KV heads; MoH with all 6 heads
    active) the converted model gives the fixture's logits; with routed heads switched off it does not."""
    from effarch.train.convert import convert_run
    from effarch.train.generate import load_model

    out = convert_run(imported, tmp_path / to, to, options)
    model = load_model(out)
    assert to in model.cfg.layer_mixers()
    logits = model(jnp.asarray([EXPECTED["prompt"]]))[0]
    if exact:
        assert_logits_close(logits, EXPECTED["logits"])
    else:
        assert float(jnp.max(jnp.abs(logits - jnp.asarray(EXPECTED["logits"])))) > 1e-2

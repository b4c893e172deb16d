"""LoRA fine-tuning (`train.lora`; layers/lora.py, train/lora.py): the adapters leave the model unchanged at step 0,
only they (and `train_also`) train, hold the only optimizer state, resume bit-identically, shard like their kernels,
and merge into the base weights for `effarch export-hf` / `effarch convert`."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch.arches.lm import DecoderLM, ModelConfig
from effarch.layers.lora import LoRALinear, add_lora, kernel_of, linear_paths, merge_lora
from effarch.train import param_tree
from effarch.train.config import ConfigError, load_config
from tests.helpers.cli import cli, one_error_line
from tests.helpers.devices import eight_cpu_devices

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"
LORA = ROOT / "configs" / "overlays" / "lora.yaml"
BASE = ROOT / "configs" / "mqar" / "zoology_attention.yaml"
# A model `effarch export-hf` can write (all attention, SwiGLU, RoPE), on the tiny MQAR data.
LLAMA = ["model.mixers=[attention]", "model.mlp.kind=swiglu", "model.attention.rope=true",
         "model.attention.n_heads=2", "model.tie_embeddings=false"]


def cfg(run_dir, *overrides, lora=True):
    files = [BASE, TINY, LORA] if lora else [BASE, TINY]
    return load_config(files, [f"train.run_dir={run_dir}", "train.async_checkpoint=false", *overrides])


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in param_tree.flatten(tree).items()}


TINY_MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, mixers=("attention",), tie_embeddings=False)


def tiny_model(seed=0) -> DecoderLM:
    return DecoderLM(TINY_MODEL, rngs=nnx.Rngs(seed))


def randomise_b(model, seed=3):
    """Moves every adapter's B off zero, as training would."""
    for i, layer in enumerate(linear_paths(model).values()):
        if isinstance(layer, LoRALinear):
            layer.lora.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), layer.lora.lora_b.shape)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def test_adapters_start_as_the_identity_keep_the_base_paths_and_merge_exactly():
    from effarch.train.config import Config, LoRAConfig, TrainConfig
    from effarch.train.lora import build_model

    base = tiny_model()
    want = np.asarray(base(TOKENS))
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("mixer/[qv]_proj", "mlp/down"))
    model = build_model(Config(model=TINY_MODEL, train=TrainConfig(lora=lora)), nnx.Rngs(0))  # the run's model
    chosen = [p for p, layer in linear_paths(model).items() if isinstance(layer, LoRALinear)]
    assert chosen == [f"blocks/{i}/{n}/kernel" for i in (0, 1) for n in ("mixer/q_proj", "mixer/v_proj", "mlp/down")]
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), want)  # B = 0: exactly the base model
    params = {param_tree.path_str(k): v for k, v in
              jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param), is_leaf=param_tree.is_variable)}
    base_params = flat(nnx.state(base, nnx.Param))
    for path, value in base_params.items():  # the base weights: the same paths, metadata and (same seed) values
        np.testing.assert_array_equal(np.asarray(params[path][...]), value)
    a, b = params["blocks/0/mixer/q_proj/lora/lora_a"], params["blocks/0/mixer/q_proj/lora/lora_b"]
    assert isinstance(a, nnx.LoRAParam) and a.shape == (32, 4) and b.shape == (4, 32)
    assert params["blocks/0/mixer/q_proj/kernel"].get_metadata()["logical_axes"] == ("embed", "heads")
    assert a.get_metadata()["logical_axes"] == ("embed", None) and b.get_metadata()["logical_axes"] == (None, "heads")
    assert params["blocks/1/mlp/down/lora/lora_b"].get_metadata()["logical_axes"] == (None, "embed")
    assert len(params) == len(base_params) + 2 * len(chosen)
    assert not np.array_equal(np.asarray(b[...]), np.asarray(a[...])[:4]) and not np.any(np.asarray(b[...]))

    randomise_b(model)
    unmerged = np.asarray(model(TOKENS))
    assert np.abs(unmerged - want).max() > 0.1  # the adapters now matter
    q = model.blocks[0].mixer.q_proj
    np.testing.assert_allclose(np.asarray(kernel_of(q)), np.asarray(q.kernel[...]) + 2.0 * np.asarray(
        q.lora.lora_a[...]) @ np.asarray(q.lora.lora_b[...]), rtol=1e-6, atol=1e-6)  # alpha / rank = 8 / 4
    assert merge_lora(model) == chosen == add_lora(tiny_model(), 4, 8.0, lora.targets, rngs=nnx.Rngs(1))
    assert not any(isinstance(m, LoRALinear) for m in linear_paths(model).values())
    assert flat(nnx.state(model, nnx.Param)).keys() == base_params.keys()
    np.testing.assert_allclose(np.asarray(model(TOKENS)), unmerged, rtol=1e-5, atol=1e-5)


def test_an_adapter_on_a_kernel_read_as_a_matrix_counts():
    # MoH reads o_proj's kernel as per-head matrices instead of calling the layer: kernel_of includes the adapter.
    c = dataclasses.replace(TINY_MODEL, n_layers=1, mixers=("moh",))
    model, plain = DecoderLM(c, rngs=nnx.Rngs(0)), DecoderLM(c, rngs=nnx.Rngs(0))
    add_lora(model, 2, 2.0, ["o_proj"], rngs=nnx.Rngs(1))
    randomise_b(model)
    y = np.asarray(model(TOKENS))
    assert np.abs(y - np.asarray(plain(TOKENS))).max() > 1e-3
    merge_lora(model)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), y, rtol=1e-5, atol=1e-5)


def test_a_target_matching_no_linear_layer_is_an_error():
    with pytest.raises(ValueError, match=r"targets: 'embed' matches no linear layer's kernel path \(the model's are "
                                         r"e.g. blocks/0/mixer/k_proj/kernel"):
        add_lora(tiny_model(), 4, 8.0, ["q_proj", "embed"], rngs=nnx.Rngs(1))


@pytest.mark.parametrize(("override", "message"), [
    ("train.lora.rank=0", "train.lora: rank must be >= 1, got 0"),
    ("train.lora.alpha=-1", "train.lora: alpha must be positive, got -1.0"),
    ("train.lora.targets=[]", "train.lora: targets must list at least one regex"),
    ("train.lora.targets=['(']", "train.lora: targets: '(' is not a valid regex"),
    ("train.lora.targets=[nope]", "train.lora.targets: 'nope' matches no linear layer's kernel path"),
    ("train.lora.train_also=[zzz]", "train.lora.train_also: 'zzz' matches no parameter path"),
])
def test_bad_lora_config_is_one_line_and_exit_2(tmp_path, capsys, override, message):
    code, _, err = cli(capsys, "train", BASE, TINY, LORA, f"train.run_dir={tmp_path / 'run'}", override)
    assert code == 2 and one_error_line(err).startswith(f"effarch: error: {message}"), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_step_trains_only_the_adapters_and_train_also_with_their_optimizer_state_only(tmp_path):
    from effarch.train.data import build_data
    from effarch.train.train import Trainer

    c = cfg(tmp_path / "r", "train.batch_size=4")
    trainer = Trainer(c)
    params, opt, _ = trainer.init_state(0)
    before = flat(params)
    assert not any(np.any(v) for p, v in before.items() if "lora_b" in p)

    def state_bytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    trainable = {p for p in before if "/lora/" in p or p.startswith("embed/") or "norm" in p}
    # AdamW keeps two moments per trainable parameter and nothing for the frozen ones (plus a few scalar counts).
    assert 2 * sum(before[p].nbytes for p in trainable) <= state_bytes(opt) <= 2 * sum(
        before[p].nbytes for p in trainable) + 64
    assert len(trainable) < len(before) and any("/lora/" in p for p in trainable)
    stream, _ = build_data(c.data, c.model.vocab_size, c.train.batch_size)
    params, opt, m = trainer.train_step(params, opt, *trainer.global_batch(*stream.batch(0)))
    after = flat(params)
    assert np.isfinite(float(m["loss"]))
    for path in before:
        if path in trainable:
            if not path.endswith("lora_a"):  # A's gradient is 0 while B = 0 (only weight decay moves it)
                assert not np.array_equal(after[path], before[path]), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)  # frozen: bitwise


# Three training runs and a refused one: ~8 s on 2 cores.
@pytest.mark.slow
def test_resumed_lora_run_continues_bit_identically(tmp_path):
    from effarch.train.train import train_and_evaluate

    const = "optim.schedule=constant"  # the cosine schedule's length is train.steps
    train_and_evaluate(cfg(tmp_path / "straight", "train.steps=4", const))
    train_and_evaluate(cfg(tmp_path / "resumed", "train.steps=2", const))
    result = train_and_evaluate(cfg(tmp_path / "resumed", "train.steps=4", const))
    assert result.step == 4
    from tests.train.test_finetune import saved_params

    straight, resumed = saved_params(tmp_path / "straight"), saved_params(tmp_path / "resumed")
    assert any("/lora/lora_b" in p for p in resumed) and straight.keys() == resumed.keys()
    for p in straight:
        np.testing.assert_array_equal(resumed[p], straight[p], err_msg=p)
    assert any(np.any(v) for p, v in resumed.items() if p.endswith("lora_b"))
    # Another LoRA setting describes another run: refused, in one line.
    with pytest.raises(ConfigError, match="train.lora.rank"):
        train_and_evaluate(cfg(tmp_path / "resumed", "train.steps=6", const, "train.lora.rank=4"))


def test_adapter_shardings_follow_their_kernels():
    from jax.sharding import Mesh

    from effarch.train.config import DEFAULT_RULES
    from effarch.train.lora import build_model
    from effarch.train.sharding import param_specs

    c = cfg("unused", *LLAMA, "model.d_model=64", "model.mlp.hidden=128")
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0))), nnx.Param)
    # The specs need only the mesh's axis sizes: one device repeated stands in for a 2x2x2 slice.
    mesh = Mesh(np.array([jax.devices()[0]] * 8).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    specs = {k: tuple(v) for k, v in param_tree.flatten(param_specs(abstract, DEFAULT_RULES, mesh)).items()}
    assert specs["blocks/0/mixer/q_proj/kernel"] == ("fsdp", "tensor")
    assert specs["blocks/0/mixer/q_proj/lora/lora_a"] == ("fsdp", None)
    assert specs["blocks/0/mixer/q_proj/lora/lora_b"] == (None, "tensor")
    assert specs["blocks/0/mixer/o_proj/lora/lora_a"] == ("tensor", None)
    assert specs["blocks/0/mixer/o_proj/lora/lora_b"] == (None, "fsdp")


# Two training runs and a refused one: ~8 s on 2 cores.
@pytest.mark.slow
def test_init_from_a_base_run_adds_fresh_adapters_and_a_lora_run_needs_them(tmp_path):
    import json

    from effarch.train.train import train_and_evaluate

    train_and_evaluate(cfg(tmp_path / "base", "train.steps=1", lora=False))
    train_and_evaluate(cfg(tmp_path / "ft", "train.steps=1", f"train.init_from={tmp_path / 'base'}"))
    report = json.loads((tmp_path / "ft" / "init_report.json").read_text())
    assert report["new"] and all("/lora/" in p for p in report["new"]) and not report["dropped"]
    # The LoRA run's weights without its adapters are not the fine-tuned model: refused, naming the way out.
    with pytest.raises(ConfigError, match=r"train.init_from: the checkpoint holds LoRA adapters that this model lacks "
                                          r".*--to merged"):
        train_and_evaluate(cfg(tmp_path / "plain", "train.steps=1", f"train.init_from={tmp_path / 'ft'}",
                               lora=False))


# Two training runs, two exports and a conversion: ~10 s on 2 cores.
@pytest.mark.slow
def test_export_and_convert_merge_the_adapters(tmp_path, capsys):
    from safetensors.numpy import load_file

    from effarch.train.generate import load_model
    from effarch.train.train import train_and_evaluate

    run = tmp_path / "lora"
    train_and_evaluate(cfg(run, *LLAMA, "train.steps=3", "optim.lr=0.05"))
    code, out, err = cli(capsys, "convert", run, tmp_path / "merged", "--to", "merged")
    assert code == 0, err
    lora_model, merged_model = load_model(run), load_model(tmp_path / "merged")
    assert load_config([tmp_path / "merged" / "config.yaml"]).train.lora is None  # the adapters are in the kernels
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
    unmerged = np.asarray(lora_model(x))
    assert np.abs(unmerged - np.asarray(DecoderLM(lora_model.cfg, rngs=nnx.Rngs(0))(x))).max() > 1e-4
    np.testing.assert_allclose(np.asarray(merged_model(x)), unmerged, rtol=1e-5, atol=1e-5)
    for src, dst in ((run, "hf_lora"), (tmp_path / "merged", "hf_merged")):
        code, _, err = cli(capsys, "export-hf", src, tmp_path / dst)
        assert code == 0, err
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("hf_lora", "hf_merged"))
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Another conversion of the LoRA run starts from the merged model too.
    code, _, err = cli(capsys, "convert", run, tmp_path / "dq", "--to", "diffqkv")
    assert code == 0, err
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "dq")(x)), unmerged, rtol=1e-5, atol=1e-5)


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from effarch.train.config import load_config
    from effarch.train.data import build_data
    from effarch.train.train import Trainer
    assert jax.device_count() == 8
    losses, params_out = {{}}, {{}}
    for name, devices, mesh in [("one", jax.devices()[:1], (1, 1, 1)), ("eight", jax.devices(), (2, 2, 2))]:
        c = load_config([r"{base}", r"{tiny}", r"{lora}"], ["train.batch_size=16", *{llama},
            f"mesh.data={{mesh[0]}}", f"mesh.fsdp={{mesh[1]}}", f"mesh.tensor={{mesh[2]}}"])
        tr = Trainer(c, devices)
        stream, _ = build_data(c.data, c.model.vocab_size, c.train.batch_size)
        params, opt, rng = tr.init_state(0)
        out = []
        for step in range(3):
            params, opt, m = tr.train_step(params, opt, *tr.global_batch(*stream.batch(step)))
            out.append(float(m["loss"]))
        losses[name] = out
        if name == "eight":
            from effarch.train import param_tree
            specs = {{p: str(x.sharding.spec) for p, x in param_tree.flatten(params).items()}}
            assert "tensor" in specs["blocks/0/mixer/q_proj/lora/lora_b"], specs
            assert "fsdp" in specs["blocks/0/mixer/q_proj/lora/lora_a"], specs
    print("LOSSES", losses)
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-5)
    assert losses["one"][2] != losses["one"][0]
    print("OK")
""")


# A subprocess with 8 CPU devices compiling the step twice: ~30 s on 2 cores.
@pytest.mark.slow
def test_sharded_lora_step_matches_one_device(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(base=BASE, tiny=TINY, lora=LORA, llama=LLAMA))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env=eight_cpu_devices(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout

"""Config loading: YAML merge, dotted overrides, and one-line errors that name the key."""

import subprocess
import sys

import pytest

from effarch.train.config import Config, ConfigError, dump_config, load_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_merge_and_overrides(tmp_path):
    a = write(tmp_path, "model: {d_model: 96, mixers: [attention]}\ntrain: {steps: 7}\n", "a.yaml")
    b = write(tmp_path, "train: {steps: 9, batch_size: 16}\n", "b.yaml")
    cfg = load_config([a, b], ["model.attention.n_heads=3", "optim.clip_norm=null",
                              "data.mqar.train_segments=[[32,2,100]]"])
    assert cfg.model.d_model == 96
    assert cfg.train.steps == 9 and cfg.train.batch_size == 16  # later file wins
    assert cfg.model.attention.n_heads == 3
    assert cfg.optim.clip_norm is None
    assert cfg.data.mqar.train_segments == ((32, 2, 100),)
    assert cfg.model.mixers == ("attention",)
    assert cfg.optim.lr == Config().optim.lr  # untouched default
    assert load_config([], ["optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string


def test_dump_round_trips(tmp_path):
    cfg = load_config([], ["model.d_model=48", "model.mixers=[zoology_base_conv, attention]", "optim.lr=0.01"])
    again = load_config([write(tmp_path, dump_config(cfg))])
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=3", "model.d_modle: unknown key"),
        ("model.d_model=abc", "model.d_model: expected an integer, got 'abc'"),
        ("model.d_model=1.5", "model.d_model: expected an integer"),
        ("model.d_model=0", "model: d_model must be positive"),
        ("train.compute_dtype=float16", "train.compute_dtype: expected one of ['float32', 'bfloat16']"),
        ("optim.lr=-1", "optim: lr must be positive"),
        ("model.mixers=[attention, nope]", "unknown mixer(s) ['nope']"),
        ("train.progress=yes please", "train.progress: expected true or false"),
        ("data.mqar.train_segments=[[64, 4]]", "data.mqar.train_segments[0]: expected a list of 3 items"),
        ("train.batch_size=10", "grad_accum_steps"),  # with grad_accum_steps=4 below
        ("train.prefetch=-1", "train: prefetch must be >= 0 (batches made ahead; 0 turns it off), got -1"),
        ("train.prefetch=2.5", "train.prefetch: expected an integer, got 2.5"),
        ("bogus=1", "bogus: unknown key"),
        ("nokey", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    extra = ["train.grad_accum_steps=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as e:
        load_config([], [override, *extra])
    assert message in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    cfg = write(tmp_path, "model: {d_model: 64}\n")
    out = subprocess.run([sys.executable, "-m", "effarch.train", str(cfg), "model.n_layers=zero"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["effarch: error: model.n_layers: expected an integer, got 'zero'"], out.stderr


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "optim.clip_norm=-.inf",
                                      "train.stop_at_accuracy=.nan", "optim.b1=NaN"])
def test_non_finite_floats_are_refused(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: expected a finite number"):
        load_config([], [override])


# Cross-field errors: each is found before a run directory, data or mesh exists, and printed as one line.
CROSS_FIELD = [
    (["model.d_model=64", "model.attention.n_heads=3"], "model: attention.n_heads=3 must divide d_model=64"),
    (["model.d_model=64", "model.attention.head_dim=7"], "model: attention: RoPE needs an even head dim"),
    (["model.mixers=[based]", "model.d_model=64", "model.based.n_heads=3"],
     "model: based.n_heads=3 must divide d_model=64"),
    (["model.mixers=[sliding_window]", "model.d_model=48", "model.sliding_window.n_heads=5"],
     "model: sliding_window.n_heads=5 must divide d_model=48"),
    (["model.mixers=[sliding_window]", "model.d_model=36", "model.sliding_window.n_heads=4"],
     "model: sliding_window: RoPE needs an even head dim"),
    (["model.mixers=[lightning]", "model.d_model=64", "model.lightning.n_heads=6"],
     "model: lightning.n_heads=6 must divide d_model=64"),
    (["mesh.data=2"], "mesh: mesh.data*mesh.fsdp*mesh.tensor = 2*1*1 = 2, but 1 devices are available"),
    (["mesh.fsdp=3"], "mesh: 1 devices do not divide into the fixed mesh axes (mesh.fsdp=3, mesh.tensor=1)"),
]


@pytest.mark.parametrize("overrides, message", CROSS_FIELD, ids=[m.split(":")[0] + str(i)
                                                                   for i, (_, m) in enumerate(CROSS_FIELD)])
def test_cross_field_errors_fail_in_one_line(tmp_path, capsys, overrides, message):
    from effarch.train.main import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", str(write(tmp_path, "model: {vocab_size: 256}\n")), f"train.run_dir={run_dir}", *overrides])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"effarch: error: {message}"), err
    assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()  # failed before anything was written


@pytest.mark.parametrize(
    "overrides, n_devices, processes, message",
    [
        (["train.batch_size=6", "mesh.data=4"], 4, 1, "train.batch_size=6 / train.grad_accum_steps=1 = 6 rows per "
                                                         "micro-batch must divide over the batch axes mesh.data = 4"),
        (["train.batch_size=16", "train.grad_accum_steps=4", "mesh.data=2", "mesh.fsdp=4"], 8, 1,
         "= 4 rows per micro-batch must divide over the batch axes mesh.data*mesh.fsdp = 8"),
        (["train.batch_size=8", "train.eval_batch_size=6", "mesh.data=4"], 4, 1,
         "train.eval_batch_size=6 must divide over the batch axes mesh.data = 4"),
        (["train.batch_size=9"], 1, 2, "train.batch_size=9 must divide over the 2 processes"),
        (["train.batch_size=8", "train.eval_batch_size=9"], 1, 2, "train.eval_batch_size=9 must divide over the 2"),
    ],
)
def test_batch_and_mesh_divisibility(monkeypatch, overrides, n_devices, processes, message):
    import jax

    from effarch.train.checks import check_runtime

    monkeypatch.setattr(jax, "process_count", lambda: processes)
    cfg = load_config([], overrides)
    with pytest.raises(ConfigError) as e:
        check_runtime(cfg, devices=jax.devices() * n_devices)  # only the count matters
    assert message in str(e.value)
    check_runtime(load_config([], ["train.batch_size=64", "train.eval_batch_size=64"]), jax.devices() * 8)


def test_the_loader_is_generic(tmp_path):
    """train/yaml_config.py builds any frozen dataclass tree; the schemas only live in train/config.py."""
    import dataclasses
    from typing import Literal

    from effarch.train.yaml_config import build, load_merged, to_dict

    @dataclasses.dataclass(frozen=True)
    class Inner:
        kind: Literal["a", "b"] = "a"
        sizes: tuple[int, ...] = (1,)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()
        rate: float | None = 0.5

        def __post_init__(self):
            if self.rate is not None and self.rate < 0:
                raise ValueError(f"rate must be >= 0, got {self.rate}")

    values = load_merged([write(tmp_path, "inner: {sizes: [2, 3]}\n")], ["inner.kind=b", "rate=null"])
    out = build(Outer, values)
    assert out == Outer(Inner("b", (2, 3)), None)
    assert build(Outer, to_dict(out)) == out
    with pytest.raises(ConfigError, match=r"^inner.kind: expected one of \['a', 'b'\], got 'c'$"):
        build(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"^config: rate must be >= 0, got -1.0$"):
        build(Outer, {"rate": -1})


def test_data_settings_are_grouped_per_task_and_old_flat_keys_still_load(tmp_path):
    new = load_config([write(tmp_path, "data: {task: niah, niah: {queries: 2, depths: 40}, text: {source: x}}\n")])
    assert (new.data.niah.queries, new.data.niah.depths, new.data.text.source) == (2, 40, "x")
    # A config or run directory written before the grouping: every flat key lands in its group.
    old = write(tmp_path, "data: {task: niah, niah_queries: 2, niah_depths: 40, text_source: x}\n", "old.yaml")
    assert load_config([old]) == new
    flat = ["data.task=niah", "data.niah_queries=2", "data.niah_depths=40", "data.text_source=x"]
    assert load_config([], flat) == new
    with pytest.raises(ConfigError, match=r"^data.niah_queries is the old spelling of data.niah.queries; give only"):
        load_config([old], ["data.niah.queries=3"])
    with pytest.raises(ConfigError, match=r"^data.niah: examples and queries must be >= 1, got 8192, 0$"):
        load_config([], ["data.niah.queries=0"])

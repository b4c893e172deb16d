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
    cfg = load_config([a, b], ["model.attention.n_heads=3", "optim.clip_norm=null", "data.train_segments=[[32,2,100]]"])
    assert cfg.model.d_model == 96
    assert cfg.train.steps == 9 and cfg.train.batch_size == 16  # later file wins
    assert cfg.model.attention.n_heads == 3
    assert cfg.optim.clip_norm is None
    assert cfg.data.train_segments == ((32, 2, 100),)
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
        ("data.train_segments=[[64, 4]]", "data.train_segments[0]: expected a list of 3 items"),
        ("train.batch_size=10", "grad_accum_steps"),  # with grad_accum_steps=4 below
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

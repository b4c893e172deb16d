"""check_model probes the model at a shape every kernel accepts (T = 128) for the target's platform, and turns an
implementation that cannot run there into a one-line ConfigError instead of a traceback."""

from pathlib import Path

import jax
import pytest

from effarch.train.checks import PROBE_LEN, check_model
from effarch.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SWA = ROOT / "configs" / "niah" / "sliding_window.yaml"


def test_probe_length_suits_splash():
    assert PROBE_LEN % 128 == 0  # splash's T % 128 == 0 (pallas_kernels/sliding_window/splash.py)


def test_splash_on_a_tpu_target_passes(monkeypatch):
    # No mesh: the platform is the default backend's; faked as TPU (eval_shape compiles nothing).
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    check_model(load_config([SWA], ["model.sliding_window.implementation=pallas_tpu"]))


def test_splash_on_this_cpu_is_a_config_error():
    cfg = load_config([SWA], ["model.sliding_window.implementation=pallas_tpu"])
    with pytest.raises(ConfigError, match=r"^model: .*'pallas_tpu' needs a tpu backend, not cpu$"):
        check_model(cfg, jax.devices()[:1])


def test_no_implementation_of_a_sequence_can_run_is_a_config_error():
    cfg = load_config([SWA], ["model.sliding_window.implementation=[pallas_tpu,cudnn]"])
    with pytest.warns(UserWarning, match="pallas_tpu unavailable"), pytest.raises(ConfigError) as info:
        check_model(cfg)
    message = str(info.value)
    assert "\n" not in message and "no implementation in ['pallas_tpu', 'cudnn'] can run" in message, message

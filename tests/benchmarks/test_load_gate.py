"""benchmarks/_common.LoadGate: the load average before and after a run, and no target verdict above its limit."""

import _common
import pytest


class Readings:
    """A fake os.getloadavg returning the given 1-minute averages in turn."""

    def __init__(self, *ones):
        self.ones = list(ones)

    def __call__(self):
        return (self.ones.pop(0), 0.0, 0.0)


def _report():
    return {"results": {"1024": {"median_s": 0.5}},
            "targets": {"speed": {"ratio": 2.5, "pass": True}, "flat": False,
                        "flops": {"value": 0.4, "pass": True, "load_free": True}},
            "records": [{"meets_target": False}], "target": {"verdict": "pass"}}


@pytest.fixture(autouse=True)
def _real_limit(monkeypatch):
    monkeypatch.setattr(_common.LoadGate, "LIMIT", 1.5)  # undo the conftest's quiet gate: this file tests the gate


def test_quiet_run_keeps_verdicts():
    gate = _common.LoadGate(Readings(0.4, 1.5))
    assert gate.verdict(True) is True
    report = gate.stamp(_report())
    assert report["load"] == {"load_1m_before": 0.4, "load_1m_after": 1.5, "limit": 1.5, "loaded": False}
    assert {k: v for k, v in report.items() if k != "load"} == _report()


@pytest.mark.parametrize("before, after", [(1.6, 0.2), (0.2, 1.51)])
def test_loaded_run_reports_loaded_never_pass(before, after, capsys):
    gate = _common.LoadGate(Readings(before, after))
    report = gate.stamp(_report())
    assert report["load"]["loaded"] is True and gate.verdict(True) == "loaded" and gate.verdict(False) == "loaded"
    # The numbers stay; every verdict, pass or fail, is "loaded"; a FLOP count's verdict does not depend on load.
    assert report["results"] == _report()["results"] and report["targets"]["speed"]["ratio"] == 2.5
    assert report["targets"]["speed"]["pass"] == "loaded" and report["targets"]["flat"] == "loaded"
    assert report["records"][0]["meets_target"] == "loaded" and report["target"]["verdict"] == "loaded"
    assert report["targets"]["flops"]["pass"] is True
    assert "LOADED" in capsys.readouterr().err

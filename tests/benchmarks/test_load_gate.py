"""benchmarks/_common.LoadGate: the load average before and after a run, and no target verdict above its limit."""

import os
import time

import _common
import pytest


class Readings:
    """A fake os.getloadavg returning the given 1-minute averages in turn."""

    def __init__(self, *ones):
        self.ones = list(ones)

    def __call__(self):
        return (self.ones.pop(0), 0.0, 0.0)


class Other:
    """A stand-in for OtherLoad: the cores other processes used during the run."""

    def __init__(self, cores):
        self.cores = cores

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _report():
    return {"results": {"1024": {"median_s": 0.5}},
            "targets": {"speed": {"ratio": 2.5, "pass": True}, "flat": False,
                        "flops": {"value": 0.4, "pass": True, "load_free": True}},
            "records": [{"meets_target": False}], "target": {"verdict": "pass"}}


@pytest.fixture(autouse=True)
def _real_limit(monkeypatch):
    monkeypatch.setattr(_common.LoadGate, "LIMIT", 1.5)  # undo the conftest's quiet gate: this file tests the gate


@pytest.mark.parametrize("after, others", [(1.5, 0.9), (1.9, 0.1)])
def test_quiet_run_keeps_verdicts(after, others):
    # Quiet: nothing above the limit, or an "after" above it made by the benchmark's own threads (others idle).
    gate = _common.LoadGate(Readings(0.4, after), other=Other(others))
    assert gate.verdict(True) is True
    report = gate.stamp(_report())
    assert report["load"] == {"load_1m_before": 0.4, "load_1m_after": after, "limit": 1.5,
                              "other_processes_cores": others, "loaded": False, "host_malloc": _common.HOST_MALLOC,
                              "cpu": _common.host_cpu()}
    assert {k: v for k, v in report.items() if k != "load"} == _report()


@pytest.mark.parametrize("before, after, others", [(1.6, 0.2, 0.0), (0.2, 1.51, 0.3), (0.2, 1.8, None)])
def test_loaded_run_reports_loaded_never_pass(before, after, others, capsys):
    gate = _common.LoadGate(Readings(before, after), other=Other(others))
    report = gate.stamp(_report())
    assert report["load"]["loaded"] is True and gate.verdict(True) == "loaded" and gate.verdict(False) == "loaded"
    # The numbers stay; every verdict, pass or fail, is "loaded"; a FLOP count's verdict does not depend on load.
    assert report["results"] == _report()["results"] and report["targets"]["speed"]["ratio"] == 2.5
    assert report["targets"]["speed"]["pass"] == "loaded" and report["targets"]["flat"] == "loaded"
    assert report["records"][0]["meets_target"] == "loaded" and report["target"]["verdict"] == "loaded"
    assert report["targets"]["flops"]["pass"] is True
    assert "LOADED" in capsys.readouterr().err



def test_a_live_child_counts_as_our_own_cpu():
    """A peer worker (PipeWorker's Python) burning CPU is this benchmark's work, not another process's: its time is
    in _own_s while it still runs (os.times() counts a child only once it has exited)."""
    import subprocess
    import sys

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ninput()"
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while _common._live_children_s() < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _common._live_children_s() >= 0.2
    finally:
        child.communicate("\n")


def test_peer_allocators_offer_the_default_and_our_settings(monkeypatch):
    monkeypatch.setattr(_common, "HOST_MALLOC", {"M_ARENA_MAX": 1})
    assert _common.peer_allocators("both") == {"": {}, "_host_malloc": {"MALLOC_ARENA_MAX": "1"}}
    assert _common.peer_allocators("default") == {"": {}}
    assert _common.peer_allocators("host") == {"_host_malloc": {"MALLOC_ARENA_MAX": "1"}}
    monkeypatch.setattr(_common, "HOST_MALLOC", None)  # not applied here: peers get the default only
    assert _common.peer_allocators("both") == {"": {}} == _common.peer_allocators("host")


def test_host_cpu_reads_the_first_processor_and_its_vector_isa(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512f\n")
    cpu = _common.host_cpu(str(info))
    assert cpu["model_name"] == "AMD EPYC" and (cpu["family"], cpu["model"]) == ("25", "1")
    assert cpu["vector_isa"] == ["avx2", "fma"] and cpu["cores"] == os.cpu_count()
    assert _common.host_cpu(str(tmp_path / "missing")) == {"cores": os.cpu_count()}

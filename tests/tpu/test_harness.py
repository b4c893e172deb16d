"""The compile harness reports each job's outcome and survives a job that kills its process (tests/tpu/harness.py).

The jobs are tests/tpu/fake_jobs.py's stand-ins (no JAX), so each child starts in a fraction of a second.
"""

import pytest

from tests.tpu.harness import Job, run_jobs

FAKE = "tests.tpu.fake_jobs"


def test_run_jobs_reports_each_job_and_reruns_the_rest_after_a_crash():
    jobs = [
        Job("passes", f"{FAKE}:passes", {"value": 1}),
        Job("raises", f"{FAKE}:raises"),
        Job("aborts", f"{FAKE}:aborts"),
        Job("passes after the abort", f"{FAKE}:passes", {"value": 1}),
        Job("fails after the abort", f"{FAKE}:passes", {"value": 2}),
        Job("no such function", f"{FAKE}:missing"),
    ]
    results = run_jobs(jobs)
    assert set(results) == {job.name for job in jobs}
    assert results["passes"].ok and results["passes after the abort"].ok
    assert str(results["raises"]) == "raises: error: ValueError: unsupported block shape (8, 100)"
    assert results["aborts"].status == "signal"
    assert results["aborts"].message.startswith("process killed by SIGABRT: Check failed: rank == best_window")
    assert results["fails after the abort"].message == "AssertionError: value 2"
    assert results["no such function"].message.startswith("AttributeError")


def test_run_jobs_kills_a_job_past_its_timeout_and_goes_on():
    results = run_jobs([Job("hangs", f"{FAKE}:hangs"), Job("then passes", f"{FAKE}:passes", {"value": 1})],
                       job_timeout_s=2.0)
    assert (results["hangs"].status, results["hangs"].message) == ("timeout", "killed after 2 s")
    assert results["then passes"].ok


def test_run_jobs_refuses_duplicate_names():
    with pytest.raises(ValueError, match="unique"):
        run_jobs([Job("a", f"{FAKE}:passes"), Job("a", f"{FAKE}:passes")])

"""The `compile_results` fixture: every compile job of a test module's selected tests, run once, in one harness.

Each test of tests/tpu/test_*_compile.py takes one `Job` as its `job` parameter. The fixture collects the jobs of
the tests this run selected in the module (after -m / -k), runs them together (harness.run_jobs: one child process
for all, a fresh one after a job that kills it) and gives {job name: Result}; each test then checks its own.
"""

import importlib.util

import pytest

from tests.tpu.harness import run_jobs


@pytest.fixture(scope="module")
def compile_results(request):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'effarch[tpu]'): TPU compiles need it")
    jobs = [item.callspec.params["job"] for item in request.session.items
            if item.module is request.module and "job" in getattr(getattr(item, "callspec", None), "params", {})]
    return run_jobs(jobs)

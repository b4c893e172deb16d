"""Loading a script of benchmarks/ in a test: benchmarks/ is a folder of scripts, not a package of effarch, so the file
is loaded by path (tests/benchmarks/conftest.py puts the folder on sys.path for their shared `_common` import)."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """The module of benchmarks/<name>.py, executed fresh (its own module object, named `benchmark_<name>`)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

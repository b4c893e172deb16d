import sys
from pathlib import Path

# The benchmark scripts import their shared helpers as `_common`, from their own folder (how `python
# benchmarks/<name>.py` runs them); the smoke tests load the scripts by path, so that folder goes on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

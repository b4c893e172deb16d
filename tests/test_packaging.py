"""The `effarch` namespace mapping works for wheels as well as the editable install the tests run from."""

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"layers": "effarch.layers", "arches": "effarch.arches", "pallas_kernels": "effarch.pallas_kernels",
          "train": "effarch.train"}


def test_every_package_directory_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in MAPPED.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_editable_install_maps_the_namespace():
    import effarch.layers.attention
    import effarch.train.data.mqar

    assert Path(effarch.layers.attention.__file__).resolve() == ROOT / "layers" / "attention.py"
    assert Path(effarch.train.data.mqar.__file__).resolve() == ROOT / "train" / "data" / "mqar.py"


def test_wheel_contains_and_imports_every_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("effarch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"{MAPPED[p.relative_to(ROOT).parts[0]].replace('.', '/')}/{'/'.join(p.relative_to(ROOT).parts[1:])}"
               for top in MAPPED for p in (ROOT / top).rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert any(n.endswith("entry_points.txt") for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import effarch.layers.attention as a, effarch.train.main as m, effarch.arches.lm as lm, "
            "effarch.pallas_kernels.lightning as l; print(a.__file__); print(lm.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert all(line.startswith(str(target)) for line in res.stdout.splitlines()), res.stdout

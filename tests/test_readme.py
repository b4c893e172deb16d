"""The examples of docs/layers.md (effarch layers in your own NNX / Linen model) run as written, so they cannot go
stale."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "layers.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_page_has_the_nnx_and_linen_examples():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "from flax import nnx" in blocks[0] and "to_linen" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["nnx", "linen"])
def test_example_runs(index, capsys):
    code = _blocks()[index]
    exec(compile(code, f"docs/layers.md[{index}]", "exec"), {"__name__": "docs_example"})
    if index == 1:  # the Linen example prints the mixer's partition spec from its logical axis names
        assert "('embed', 'heads')" in capsys.readouterr().out

"""The README's "Using the layers in your own model" examples run as written, so they cannot go stale."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the layers in your own model"


def _section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], flags=re.S)


def test_readme_section_has_the_nnx_and_linen_examples():
    blocks = _section_blocks()
    assert len(blocks) == 2
    assert "from flax import nnx" in blocks[0] and "to_linen" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["nnx", "linen"])
def test_readme_example_runs(index, capsys):
    code = _section_blocks()[index]
    exec(compile(code, f"README.md[{SECTION}][{index}]", "exec"), {"__name__": "readme_example"})
    if index == 1:  # the Linen example prints the mixer's partition spec from its logical axis names
        assert "('embed', 'heads')" in capsys.readouterr().out

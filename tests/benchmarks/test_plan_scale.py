"""benchmarks/plan_scale.py without compiling: every cell's overrides make a valid config of the stated size, and a
table and PNG are rendered from planned cells (the compiles themselves are `effarch plan`'s, tested in
tests/train/test_plan.py)."""

import json

import pytest

from effarch.train.config import load_config
from tests.helpers.benchmarks import load_benchmark

bench = load_benchmark("plan_scale")


@pytest.mark.parametrize("mechanism", bench.MECHANISMS)
def test_every_cell_is_a_valid_config(mechanism):
    for size, s in bench.SIZES.items():
        cfg = load_config([bench.BASE_CONFIG], bench.cell_overrides(mechanism, size, 8192, 32))
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.data.seq_len) == (s["d_model"], s["n_layers"], 8192)
        assert cfg.train.batch_size == 32 and cfg.train.compute_dtype == "bfloat16" and cfg.model.remat


def test_render_from_cells(tmp_path, capsys, monkeypatch):
    def cell(total, fits):
        return {"commit": "abc1234", "date": "2026-12-07", "load_before": 1.0, "params": 125_000_000,
                "per_device_bytes": {"total": total}, "fits": fits, "hbm_bytes": 95 * 2**30,
                "batch_size": 32, "seq_len": 8192, "devices": 32, "estimated_step_s": 8.192, "roofline_step_s": 4.0}

    cells = {bench.cell_key("softmax", "125M", 8192, "v5p-64"): cell(8 * 2**30, True),
             bench.cell_key("softmax", "125M", 32768, "v5p-64"): cell(200 * 2**30, False),
             bench.cell_key("based", "125M", 8192, "v5p-64"): {"error": "the TPU compiler aborted", "code": 3,
                                                                 "commit": "abc1234", "date": "2026-12-07",
                                                                 "load_before": 2.0},
             bench.cell_key("tnl", "125M", 8192, "v6e-256"): {**cell(2**30, True), "estimated_step_s": None}}
    out = tmp_path / "scale.json"
    bench.write_json(out, cells)
    monkeypatch.setitem(bench.HOST_LIMITS, "titans_mac/8B", "needs more host RAM than this host has")
    assert bench.main(["--out", str(out), "--render"]) == 0
    assert json.loads(out.read_text())["cells"] == cells
    text = capsys.readouterr().out
    assert "| softmax 125M | 125M | 8.0 | 200.0 ✗ |" in text and "| based 125M |  | compile failed |" in text
    assert "| softmax 125M | 125M | 1,000 | — |" in text  # tokens/s from the compiler's step estimate
    assert "| tnl 125M | 125M |  |  | 2,048ʳ |" in text  # or from the roofline where the compiler has none
    assert out.with_suffix(".png").stat().st_size > 0
    page = out.with_suffix(".md").read_text()
    assert "4 of 96 cells planned (3 compiled)" in page and "- based/125M/8192/v5p-64: the TPU compiler" in page
    # The 92 cells not planned are listed, with the host's reason where one is known.
    assert page.count("\n- ") == 1 + 92 and "- moh/1B/8192/v5p-64: not planned yet" in page
    assert "- titans_mac/8B/32768/v6e-256: needs more host RAM than this host has" in page

"""Each mechanism's LM at about 125M, 1B and 8B parameters on TPU pod slices, planned with `effarch plan`.

For every cell — mechanism × size × sequence length × slice — this runs `effarch plan` (train/plan.py, one child
process per cell: `run_in_subprocess`), which compiles the real training step for the slice's TPU chips from this
host (XLA's TPU compiler in libtpu; nothing runs on a TPU) and reads the compiled program's memory and cost
analysis. Reported per cell: parameters, per-device bytes (arguments, temporaries, total) against the chip's HBM,
fits, the compiler's step-time estimate and the tokens/s per chip and MFU it implies. The estimates are the
compiler's cost model, not measurements (docs/planning.md, "What the numbers are").

The models (all: vocabulary 32,000 tied, float32 parameters and AdamW state with bfloat16 compute
`train.compute_dtype=bfloat16`, `model.remat=true`, pure FSDP over every chip `mesh.fsdp=-1 mesh.data=1`, one
sequence per chip):

| size | d_model | layers | MLP hidden | heads (head dim) | KV heads |
|---|---|---|---|---|---|
| 125M | 768 | 12 | 2048 | 12 (64) | 12 |
| 1B | 2048 | 16 | 8192 | 32 (64) | 8 |
| 8B | 4096 | 32 | 14336 | 32 (128) | 8 |

Mechanisms (`MECHANISMS`): `softmax` (attention, GQA as above; XLA's attention, which holds the [T, T] scores: the
TPU default), `softmax_splash` (the same with `model.attention.implementation=pallas_tpu`: jax's splash flash-attention
kernel, opt-in), `based` (configs/lm/based_small.yaml's layer pattern:
gated convolutions, BASED linear attention with feature dim 16, sliding-window attention of 64 tokens), `tnl`
(configs/lm/tnl_small.yaml: Lightning attention with heads of 128, SRMSNorm, SGLU), `titans_mac` (memory heads of
128, expansion 2, chunks of 16, segments of 512), `landmark` (blocks of 50), `moh` (a quarter of the heads shared, half
of the routed ones active), `diffqkv` (a quarter as many key heads and half as many value heads as query heads). Each
takes the slice's default kernels (what `effarch train` would run there; the JSON counts the Pallas kernel calls).

Slices: v5p-64 (`v5p:2x4x4`, 32 chips, 95 GiB each) and v6e-256 (`v6e:16x16`, 256 chips, 32 GiB each); sequences of
8,192 and 32,768 tokens.

Resumable: the JSON (--out) is rewritten after every cell, and a rerun plans only the cells it lacks (or, with
--redo, those that failed). Each cell records the effarch commit, the wall seconds and the load average, so a table
built over several sessions says where each number came from. `--render` only rewrites the table and the PNG.

Run:   .venv/bin/python benchmarks/plan_scale.py [--out benchmarks/results/plan_scale.json] [--only softmax,tnl]
       [--sizes 125M 1B] [--jobs 2] [--render]
Needs libtpu (`pip install 'effarch[tpu]'`; the test extra has it too). Host memory: a cell's compile needs up to
9 GiB, except Titans MAC at 8B: about 30 GiB (peak resident + swapped, sampled), so give the host swap or RAM.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import LoadGate

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "lm" / "quickstart.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plan_scale.json"
GIB = 2**30

SIZES = {
    "125M": dict(d_model=768, n_layers=12, hidden=2048, heads=12, kv_heads=12),
    "1B": dict(d_model=2048, n_layers=16, hidden=8192, heads=32, kv_heads=8),
    "8B": dict(d_model=4096, n_layers=32, hidden=14336, heads=32, kv_heads=8),
}
SEQ_LENS = (8192, 32768)
SLICES = {"v5p-64": ("v5p:2x4x4", 32), "v6e-256": ("v6e:16x16", 256)}


def _mechanism_overrides(name: str, s: dict) -> list[str]:
    d, h, kv = s["d_model"], s["heads"], s["kv_heads"]
    if name in ("softmax", "softmax_splash"):
        splash = ["model.attention.implementation=pallas_tpu"] if name == "softmax_splash" else []
        return ["model.mixers=[attention]", f"model.attention.n_heads={h}", f"model.attention.n_kv_heads={kv}",
                *splash]
    if name == "based":
        return ["model.mixers=[base_conv,based,sliding_window,base_conv,base_conv]", "model.based.feature_dim=16",
                f"model.based.n_heads={h}", f"model.sliding_window.n_heads={h}", "model.sliding_window.window=64"]
    if name == "tnl":
        return ["model.mixers=[lightning]", "model.norm=srms", "model.mlp.kind=sglu",
                f"model.lightning.n_heads={d // 128}"]
    if name == "titans_mac":
        return ["model.mixers=[titans_mac]", f"model.titans.n_heads={d // 128}", "model.titans.expansion=2",
                "model.titans.chunk_size=16", "model.titans.batch_size=64", "model.titans.n_persistent=4",
                f"model.titans_attention.n_heads={h}", "model.titans_attention.segment_len=512"]
    if name == "landmark":
        return ["model.mixers=[landmark]", f"model.landmark.n_heads={h}", "model.landmark.block_len=50"]
    if name == "moh":
        return ["model.mixers=[moh]", f"model.moh.n_heads={h}", f"model.moh.n_shared={h // 4}",
                f"model.moh.top_k={(h - h // 4) // 2}", f"model.moh.n_kv_heads={h}"]
    if name == "diffqkv":
        return ["model.mixers=[diffqkv]", f"model.diffqkv.n_q_heads={h}", f"model.diffqkv.n_k_heads={h // 4}",
                f"model.diffqkv.n_v_heads={h // 2}"]
    raise ValueError(f"unknown mechanism {name!r}")


MECHANISMS = ("softmax", "softmax_splash", "based", "tnl", "titans_mac", "landmark", "moh", "diffqkv")
# Cells a host could not plan, by "mechanism/size", and why (the page lists missing cells under "Not planned"). None
# now: Titans MAC at 8B, whose compiles need about 30 GiB of host memory, was planned on the 24 GiB host with 40 GiB
# of swap added (`fallocate -l 40G /swapfile && mkswap /swapfile && swapon /swapfile`), 9-49 min a cell.
HOST_LIMITS: dict[str, str] = {}


def cell_overrides(mechanism: str, size: str, seq_len: int, chips: int) -> list[str]:
    """The `effarch plan` overrides of one cell, on top of configs/lm/quickstart.yaml."""
    s = SIZES[size]
    return [
        "model.vocab_size=32000", f"model.d_model={s['d_model']}", f"model.n_layers={s['n_layers']}",
        "model.mlp.kind=swiglu", f"model.mlp.hidden={s['hidden']}", "model.remat=true", "train.compute_dtype=bfloat16",
        *_mechanism_overrides(mechanism, s),
        f"data.seq_len={seq_len}", f"train.batch_size={chips}", f"train.eval_batch_size={chips}",
        "mesh.fsdp=-1", "mesh.data=1",
    ]


def cell_key(mechanism: str, size: str, seq_len: int, slice_name: str) -> str:
    return f"{mechanism}/{size}/{seq_len}/{slice_name}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plan_cell(mechanism: str, size: str, seq_len: int, slice_name: str, timeout: float) -> dict:
    from effarch.train.plan import run_in_subprocess

    topology, chips = SLICES[slice_name]
    overrides = cell_overrides(mechanism, size, seq_len, chips)
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    try:
        out = run_in_subprocess([BASE_CONFIG], overrides, topology, decode=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        out = {"code": 3, "error": f"the plan did not finish in {timeout:.0f} s"}
    record = {"mechanism": mechanism, "size": size, "seq_len": seq_len, "slice": slice_name, "topology": topology,
              "overrides": overrides, "commit": _commit(), "wall_s": round(time.perf_counter() - t0, 1),
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "loaded": max(load_before, os.getloadavg()[0]) > LoadGate.LIMIT,
              "date": datetime.date.today().isoformat()}
    if "report" not in out:
        return {**record, "error": out["error"], "code": out["code"]}
    r = out["report"]
    keep = ("params", "devices", "batch_size", "per_device_bytes", "hbm_bytes", "fits", "flops_per_step",
            "estimated_step_s", "estimated_tokens_per_s_per_chip", "estimated_mfu", "roofline_step_s",
            "model_flops_per_step", "compiler_oom", "advice", "warnings")
    return {**record, **{k: r.get(k) for k in keep}, "kernels": r.get("pallas_kernels"),
            "largest_buffers": r.get("largest_buffers", [])[:3]}


def write_json(path: Path, cells: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "plan_scale", "sizes": SIZES, "slices": SLICES,
                               "seq_lens": SEQ_LENS, "cells": cells}, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a killed run leaves the previous table whole


def _gib(n) -> str:
    return "—" if n is None else f"{n / GIB:.1f}"


def step_estimate(c: dict) -> tuple[float | None, str]:
    """(seconds, kind) of a planned cell's step: the compiler's estimate ("compiler"), or where it has none (libtpu
    0.0.52 gives none for v6e) the roofline of its counts ("roofline": max(FLOPs / peak, bytes / HBM bandwidth))."""
    if c.get("estimated_step_s"):
        return c["estimated_step_s"], "compiler"
    if c.get("roofline_step_s"):
        return c["roofline_step_s"], "roofline"
    return None, ""


def tokens_per_s_per_chip(c: dict) -> float | None:
    s, _ = step_estimate(c)
    return None if not s or not c.get("fits") else c["batch_size"] * c["seq_len"] / c["devices"] / s


def _tok(c: dict) -> str:
    t = tokens_per_s_per_chip(c)
    return "—" if t is None else f"{t:,.0f}" + ("ʳ" if step_estimate(c)[1] == "roofline" else "")


def table(cells: dict) -> str:
    """Two markdown tables, one row per mechanism and size, one column per slice and length: the per-chip GiB of the
    training step (✗ = does not fit), and the estimated tokens/s per chip (ʳ: from the roofline)."""
    cols = [(sl, t) for sl in SLICES for t in SEQ_LENS]
    out = []
    for title, fmt in (("GiB per chip (✗: does not fit)", lambda c: f"{_gib(c['per_device_bytes']['total'])}"
                        + ("" if c["fits"] else " ✗")), ("estimated tokens/s per chip", _tok)):
        head = f"| {title} | params | " + " | ".join(f"{sl}, {t // 1024}k" for sl, t in cols) + " |"
        lines = [head, "|---|---|" + "---|" * len(cols)]
        for m in MECHANISMS:
            for size in SIZES:
                row, params = [], None
                for sl, t in cols:
                    c = cells.get(cell_key(m, size, t, sl))
                    if c is None:
                        row.append("")
                    elif "error" in c:
                        row.append("compile failed")
                    else:
                        params = c["params"]
                        row.append(fmt(c))
                p = "" if params is None else f"{params / 1e6:,.0f}M"
                lines.append(f"| {m} {size} | {p} | " + " | ".join(row) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def markdown(cells: dict, tables: str) -> str:
    """The page written beside the JSON: what was planned, from which commits, the two tables and the failures."""
    done = [c for c in cells.values() if "error" not in c]
    commits = sorted({c["commit"] for c in cells.values()})
    loads = [c["load_before"] for c in cells.values()]
    total = len(MECHANISMS) * len(SIZES) * len(SEQ_LENS) * len(SLICES)
    failed = [f"- {k}: {c['error']}" for k, c in cells.items() if "error" in c]
    missing = [cell_key(m, size, t, sl) for m in MECHANISMS for size in SIZES for t in SEQ_LENS for sl in SLICES
               if cell_key(m, size, t, sl) not in cells]
    not_planned = [f"- {k}: {HOST_LIMITS.get('/'.join(k.split('/')[:2]), 'not planned yet (the script resumes)')}"
                   for k in missing]
    return "\n".join([
        "# effarch plan: each mechanism's LM on TPU slices",
        "",
        f"Written by benchmarks/plan_scale.py (its docstring has the models and the method). {len(cells)} of {total} "
        f"cells planned ({len(done)} compiled), effarch commit(s) {', '.join(commits)}, on "
        f"{', '.join(sorted({c['date'] for c in cells.values()}))}; the compiles ran on a 2-core CPU host (load "
        f"average {min(loads):.1f} to {max(loads):.1f}; compile times are not results). Memory is the compiled "
        "program's; tokens/s are the compiler's cost-model estimates (ʳ: the roofline of its counts where it gives "
        "none), which count a loop's body once and a Pallas kernel only through its declared cost estimate (jax's "
        "splash kernel declares none): an upper bound for chunked and scanned mixers and for splash attention. "
        "Compare memory across mechanisms; treat tokens/s as the compiler's view, not a measurement "
        "(docs/planning.md, \"What the numbers are\"). Nothing ran on a TPU.",
        "",
        tables,
        "",
        *(["Did not compile:", "", *failed, ""] if failed else []),
        *(["Not planned:", "", *not_planned, ""] if not_planned else []),
        "![memory and tokens/s per chip](plan_scale.png)",
        "",
    ])


def plot(cells: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(sl, t) for sl in SLICES for t in SEQ_LENS]
    fig, axes = plt.subplots(2, len(cols), figsize=(4.2 * len(cols), 7.5), sharex=True)
    sizes = list(SIZES)
    for j, (sl, t) in enumerate(cols):
        ax_mem, ax_tok = axes[0, j], axes[1, j]
        hbm = None
        for m in MECHANISMS:
            xs, mem, tok, no_fit = [], [], [], []
            for i, size in enumerate(sizes):
                c = cells.get(cell_key(m, size, t, sl))
                if c is None or "error" in c:
                    continue
                hbm = c["hbm_bytes"]
                xs.append(i)
                mem.append(c["per_device_bytes"]["total"] / GIB)
                tok.append(tokens_per_s_per_chip(c))
                no_fit.append(not c["fits"])
            if not xs:
                continue
            line, = ax_mem.plot(xs, mem, marker="o", label=m)
            ax_mem.scatter([x for x, n in zip(xs, no_fit) if n], [y for y, n in zip(mem, no_fit) if n],
                           marker="x", s=80, color=line.get_color())
            tx = [(x, y) for x, y in zip(xs, tok) if y]
            if tx:
                ax_tok.plot(*zip(*tx), marker="o", color=line.get_color(), label=m)
        if hbm:
            ax_mem.axhline(hbm / GIB, color="k", ls="--", lw=1, label="HBM per chip")
        ax_mem.set_yscale("log")
        ax_tok.set_yscale("log")
        ax_mem.set_title(f"{sl}, {t // 1024}k tokens")
        ax_mem.set_ylabel("GiB per chip (compiled; x = does not fit)")
        ax_tok.set_ylabel("tokens/s per chip (estimate)")
        ax_tok.set_xticks(range(len(sizes)), sizes)
        ax_tok.set_xlabel("model size")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("effarch plan: training step per chip on TPU slices (compiled from a CPU host, not run)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--only", default=",".join(MECHANISMS), help="comma-separated mechanisms")
    p.add_argument("--sizes", nargs="*", default=list(SIZES))
    p.add_argument("--slices", nargs="*", default=list(SLICES))
    p.add_argument("--seq-lens", nargs="*", type=int, default=list(SEQ_LENS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    p.add_argument("--jobs", type=int, default=1, help="cells planned at once (each is one process)")
    p.add_argument("--redo", action="store_true", help="plan again the cells that failed")
    p.add_argument("--render", action="store_true", help="only rewrite the table and the PNG from --out")
    args = p.parse_args(argv)
    cells = json.loads(args.out.read_text())["cells"] if args.out.exists() else {}
    if not args.render:
        todo = [(m, size, t, sl) for size in args.sizes for sl in args.slices for t in args.seq_lens
                for m in args.only.split(",")
                if cell_key(m, size, t, sl) not in cells or (args.redo and "error" in cells[cell_key(m, size, t, sl)])]
        todo.sort(key=lambda cell: cell[0] != "titans_mac")  # the slowest compiles first, overlapping the rest
        lock, done = threading.Lock(), []

        def run(cell):
            c = plan_cell(*cell, args.timeout)
            with lock:  # one writer at a time; the JSON is whole after every cell
                cells[cell_key(*cell)] = c
                write_json(args.out, cells)
                done.append(cell)
                what = c.get("error") or (f"{_gib(c['per_device_bytes']['total'])} GiB/chip, fits={c['fits']}, "
                                          f"{_tok(c)} tok/s/chip")
                print(f"[{len(done)}/{len(todo)}] {cell_key(*cell)}: {what} ({c['wall_s']} s, load "
                      f"{c['load_before']} -> {c['load_after']})", flush=True)

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, todo))
    if cells:
        text = table(cells)
        print(text)
        args.out.with_suffix(".md").write_text(markdown(cells, text))
        plot(cells, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

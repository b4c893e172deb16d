"""Decode speed of every mixer with a decode path: tokens per second of `effarch generate`'s program (prefill of a
P-token prompt, then a scan of decode steps; `effarch.train.generate.generate_fn`) at batch 1 and 16, against the
softmax KV-cache baseline (`attention`), on the CPU.

Setup: a 4-layer byte LM (d_model 128, vocab of the config) per mixer, random weights (speed only), from the
configs/lm/ file that uses the mixer with `model.n_layers=4 model.mixers=[<mixer>]`:
    attention (the baseline)       attention_512.yaml         4 heads of 32, KV cache
    sliding_window                 based_small.yaml           2 heads of 64, window 64 (ring buffer)
    based                          based_small.yaml           2 heads, F 16, V 64 (recurrent state)
    lightning                      tnl_small.yaml             4 heads of 32 (recurrent state)
    titans_lmm, titans_mac,        titans_mac_small.yaml      2 memory heads, expansion 2, chunk 16, mini-batch 64;
    titans_mag, titans_mal                                    attention 2 heads, segment 64
    landmark                       landmark_small.yaml        4 heads of 32, blocks of 15 + a landmark
    diffqkv                        diffqkv_small.yaml         8 / 2 / 4 q / k / v heads (K cache compressed)
    moh                            moh_small.yaml             4 heads, 2 shared + top-1
    sparse_sink_window             sink_window_small.yaml     4 sinks + window 64 in blocks of 16 (bounded)
    sparse_s2                      sparse_attention_small.yaml  S2 pattern, blocks of 16 (KV cache)
For each (mixer, batch) two programs are compiled: P + N and P + 1 (prefill and the first token). Each is called
once untimed, then `--reps` times, alternating; "decode_tokens_per_s" = batch (N - 1) / (median(P + N) - median(P +
1)), the decode steps alone; "end_to_end_tokens_per_s" = batch N / median(P + N), the prefill included (what
`effarch generate` achieves after its compile); "vs_attention" = decode tokens/s over the baseline's at the same
batch. Greedy (temperature 0).

Load: `_common.LoadGate` records the 1-minute load average before and after; above 1.5 the report is marked
"loaded" (the numbers only show that the benchmark works).

Run:   .venv/bin/python benchmarks/decode_cpu.py [--mixers attention based] [--batches 1 16] [--prompt 256]
           [--new-tokens 128] [--out benchmarks/results/decode_cpu.json]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from _common import LoadGate, emit, platform_info
from flax import nnx

from effarch.train.config import load_config
from effarch.train.generate import generate_fn
from effarch.train.lora import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lm"
BASELINE = "attention"
# name -> (configs/lm file, the registry mixer)
MIXERS: dict[str, tuple[str, str]] = {
    "attention": ("attention_512.yaml", "attention"),
    "sliding_window": ("based_small.yaml", "sliding_window"),
    "based": ("based_small.yaml", "based"),
    "lightning": ("tnl_small.yaml", "lightning"),
    "titans_lmm": ("titans_mac_small.yaml", "titans_lmm"),
    "titans_mac": ("titans_mac_small.yaml", "titans_mac"),
    "titans_mag": ("titans_mac_small.yaml", "titans_mag"),
    "titans_mal": ("titans_mac_small.yaml", "titans_mal"),
    "landmark": ("landmark_small.yaml", "landmark"),
    "diffqkv": ("diffqkv_small.yaml", "diffqkv"),
    "moh": ("moh_small.yaml", "moh"),
    "sparse_sink_window": ("sink_window_small.yaml", "sparse_attention"),
    "sparse_s2": ("sparse_attention_small.yaml", "sparse_attention"),
}


def model_config(name: str, n_layers: int):
    """The run config of `name`'s LM: its configs/lm file, `n_layers` layers of the one mixer."""
    file, mixer = MIXERS[name]
    return load_config([CONFIGS / file], [f"model.n_layers={n_layers}", f"model.mixers=[{mixer}]"])


def build(name: str, n_layers: int):
    """The LM of `name` (random weights) and its config."""
    cfg = model_config(name, n_layers)
    return cfg, build_model(cfg, nnx.Rngs(0))


def measure(model, batch: int, prompt_len: int, new_tokens: int, *, vocab: int, reps: int) -> dict:
    """Median seconds of generate's program at P + N and at P + 1 new tokens, and the tokens per second."""
    prompt = np.random.default_rng(0).integers(0, vocab, (batch, prompt_len), dtype=np.int32)
    key = jax.random.key(0)
    progs, record = {}, {}
    for n in (new_tokens, 1):
        run, state = generate_fn(model, batch, prompt_len, n)
        start = time.perf_counter()
        progs[n] = run.lower(state, prompt, key).compile()
        record[f"compile_s_{n}"] = time.perf_counter() - start
        jax.block_until_ready(progs[n](state, prompt, key))  # warmup
    times: dict[int, list[float]] = {n: [] for n in progs}
    for _ in range(reps):
        for n, prog in progs.items():
            start = time.perf_counter()
            jax.block_until_ready(prog(state, prompt, key))
            times[n].append(time.perf_counter() - start)
    full, prefill = statistics.median(times[new_tokens]), statistics.median(times[1])
    record.update(
        median_s=full, prefill_median_s=prefill, times_s=times[new_tokens], prefill_times_s=times[1],
        decode_s_per_step=(full - prefill) / max(new_tokens - 1, 1),
        decode_tokens_per_s=batch * (new_tokens - 1) / (full - prefill) if full > prefill else None,
        end_to_end_tokens_per_s=batch * new_tokens / full,
    )
    return record


def run(mixers: Sequence[str], batches: Sequence[int], *, prompt_len: int, new_tokens: int, n_layers: int,
        reps: int, log: Callable[[str], None] | None = None) -> dict:
    results: dict[str, dict] = {}
    for name in mixers:
        cfg, model = build(name, n_layers)
        results[name] = {"config": MIXERS[name][0], "params": int(sum(x.size for x in
                                                                      jax.tree.leaves(nnx.state(model, nnx.Param))))}
        for b in batches:
            r = measure(model, b, prompt_len, new_tokens, vocab=cfg.model.vocab_size, reps=reps)
            results[name][str(b)] = r
            if log:
                dec = r["decode_tokens_per_s"]
                log(f"{name:20s} batch {b:3d}: decode {'n/a' if dec is None else f'{dec:9.1f}'} tok/s, end to end "
                    f"{r['end_to_end_tokens_per_s']:9.1f} tok/s (prefill {r['prefill_median_s']:.3f} s)")
    for name, per in results.items():
        for b in batches:
            base = results.get(BASELINE, {}).get(str(b), {}).get("decode_tokens_per_s")
            own = per[str(b)]["decode_tokens_per_s"]
            per[str(b)]["vs_attention"] = own / base if own and base else None
    return results


def table(report: dict) -> str:
    """The markdown table of benchmarks/README.md: decode tokens/s (x attention) per mixer and batch."""
    batches = report["config"]["batches"]
    lines = ["| mixer | " + " | ".join(f"batch {b}: decode tok/s (x attention) | end to end" for b in batches) + " |",
             "|" + "---|" * (1 + 2 * len(batches))]
    for name, per in report["results"].items():
        cells = []
        for b in batches:
            r = per[str(b)]
            dec, ratio = r["decode_tokens_per_s"], r["vs_attention"]
            cells.append("—" if dec is None else f"{dec:,.0f}" + ("" if ratio is None else f" ({ratio:.2f}x)"))
            cells.append(f"{r['end_to_end_tokens_per_s']:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), help=f"any of {list(MIXERS)}")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=256, help="P: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="N: tokens generated after the prompt (>= 2)")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/decode_cpu.json", help="the JSON report")
    p.add_argument("--no-out", action="store_true", help="print the JSON only")
    a = p.parse_args(argv)
    unknown = [m for m in a.mixers if m not in MIXERS]
    if unknown:
        p.error(f"--mixers: unknown {unknown}; choose from {list(MIXERS)}")
    if a.new_tokens < 2 or a.prompt < 1 or min(a.batches) < 1 or a.reps < 1:
        p.error("--new-tokens must be >= 2, --prompt, --batches and --reps >= 1")
    gate = LoadGate()
    results = run(a.mixers, a.batches, prompt_len=a.prompt, new_tokens=a.new_tokens, n_layers=a.n_layers,
                  reps=a.reps, log=lambda s: print(s, file=sys.stderr, flush=True))
    report = {"benchmark": "decode_cpu", "config": {"mixers": a.mixers, "batches": a.batches, "prompt": a.prompt,
              "new_tokens": a.new_tokens, "n_layers": a.n_layers, "reps": a.reps, **platform_info()},
              "results": results}
    emit(gate.stamp(report), None if a.no_out else a.out)
    print(("LOADED machine (numbers only show it works):\n" if report["load"]["loaded"] else "") + table(report),
          file=sys.stderr)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

"""`effarch heads RUN_DIR`: each attention head's retrieval score on a needle task, and the masking test (Wu et al.,
"Retrieval Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574; nightdessert/Retrieval_Head
`retrieval_head_detection.py::retrieval_calculate`, `needle_in_haystack_with_mask.py`).

Retrieval score (§2). Each trial is a needle example of the run's task (passkey: the 5-digit key; niah: the 7-digit
value) whose answer is a copy of the needle. The prompt up to the answer is prefilled, its last token decoded, and the
answer generated greedily, one decode step per answer token. At a step that generates token t, query head h of layer
l gets credit when its most-attended cache position (top-1 of its attention) lies inside the needle span [s, e) and
the prompt token there equals t (copy-paste); the trial's score is the credits / (e − s). As in the paper, a trial
counts when its answer's ROUGE-1 recall (token overlap) is > 0.5, and a head's score is the mean over the trials that
count. The per-step attention comes from the `probe` decode policy (layers/kv_policies/probe.py), so the attention
layers' own code is untouched: every mixer that takes a KV policy works (attention, GQA, MoH, DiffQKV with one K and V
head count, sparse_attention with a KV cache, whose decode then reads the full cache).

Masking (`--mask-top P`, §4): the top P% heads by score (at least one) are masked at every decode step (prefill is
not, as in the paper), the answer regenerated and the exact-match accuracy measured on the same trials; then the same
number of random heads drawn from the rest, for each of `--mask-seeds` seeds. Masking follows the paper's code by
default (`--mask-mode uniform`: the head attends uniformly over its visible keys); `--mask-mode zero` zeroes the
head's output instead.

Result: RUN_DIR/heads/<task>.json (or --out DIR) and <task>.png (the layers x heads heatmap):
`{"task", "run_dir", "checkpoint_step", "options", "n_layers", "layers" (those scored), "n_heads" (per layer, null
where none), "n_kv_heads", "scores" (per layer: one score per query head, null where the layer has no attention),
"ranking" ([{"layer", "head", "score"}], best first), "trials" ({"total", "counted"}), "accuracy" (exact match
unmasked), "mask" (when asked: {"percent", "count", "mode", "top": {"heads", "accuracy"}, "random": [{"seed",
"heads", "accuracy"}], "random_mean"}), "wall_s", "png"}`. `razor`'s `heads=` option reads "scores".
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Int

from effarch.arches.lm import DecoderLM
from effarch.layers.kv_policies.probe import MASK_MODES, ProbePolicy
from effarch.train.config import ConfigError
from effarch.train.data import niah, passkey
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.evals.common import check_vocab, positive_int, unit_float
from effarch.train.evals.passkey import DEPTHS
from effarch.train.evals.plots import PlotsUnavailable, _pyplot

USAGE = """effarch heads RUN_DIR [--task passkey|niah] [--lengths N ...] [--depths D ...] [--trials N]
                     [--mask-top P] [--mask-seeds N] [--mask-mode uniform|zero] [--batch-size B] [--seed S]
                     [--out DIR]"""
TASKS = ("passkey", "niah")


class HeadsError(ConfigError):
    """The diagnostic cannot run as asked (a bad option, a model without attention heads it can read)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through HeadsError (exit status 2 in the CLI)
        raise HeadsError(f"effarch heads: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="effarch heads", usage=USAGE)
    p.add_argument("run_dir")
    p.add_argument("--task", choices=TASKS, default=None, help="needle task (default: the run's data.task)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None, help="context lengths (default "
                   "data.seq_len)")
    p.add_argument("--depths", type=unit_float, nargs="+", default=list(DEPTHS))
    p.add_argument("--trials", type=positive_int, default=8, help="needles per (length, depth)")
    p.add_argument("--mask-top", type=float, default=None, metavar="P",
                   help="also re-evaluate with the top P%% heads masked vs as many random heads")
    p.add_argument("--mask-seeds", type=positive_int, default=3, help="random head sets for --mask-top")
    p.add_argument("--mask-mode", choices=MASK_MODES, default="uniform")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/heads)")
    return p


# --- scoring (pure numpy) -------------------------------------------------------------------------------------------

def retrieval_hits(top: Int[np.ndarray, "N H"], generated: Int[np.ndarray, " N"], tokens: Int[np.ndarray, " T"],
                   span: tuple[int, int]) -> np.ndarray:
    """One trial's retrieval score per head [H]: the decode steps (N, one per generated token) at which the head's
    most-attended position lies in the needle span [s, e) and holds the token generated at that step, / (e − s)."""
    s, e = span
    inside = (top >= s) & (top < e)
    copied = np.asarray(tokens)[np.clip(top, 0, len(tokens) - 1)] == np.asarray(generated)[:, None]
    return (inside & copied).sum(0) / (e - s)


def rouge1_recall(generated, answer) -> float:
    """Unigram recall of the answer in the generated tokens (ROUGE-1 recall: clipped token-count overlap)."""
    g, a = Counter(np.asarray(generated).tolist()), Counter(np.asarray(answer).tolist())
    return sum(min(c, g[t]) for t, c in a.items()) / max(sum(a.values()), 1)


def needle_span(tokens: np.ndarray, answer: np.ndarray, end: int) -> tuple[int, int]:
    """[s, e) of the last occurrence of the answer in tokens[:end] (the needle the answer copies)."""
    n = len(answer)
    for s in range(end - n, -1, -1):
        if np.array_equal(tokens[s : s + n], answer):
            return s, s + n
    raise HeadsError("effarch heads: the answer does not occur in the prompt (not a copy task)")


def head_ranking(scores: list) -> list[dict]:
    """[{"layer", "head", "score"}] over every scored head, best first (ties: lower layer, then head)."""
    rows = [(layer, h, float(s)) for layer, row in enumerate(scores) if row is not None for h, s in enumerate(row)]
    return [{"layer": layer, "head": h, "score": s} for layer, h, s in sorted(rows, key=lambda r: (-r[2], r[0], r[1]))]


# --- decoding through the probe ----------------------------------------------------------------------------------

def greedy_probe(model: DecoderLM, prompts: Int[np.ndarray, "B P"], n_new: int):
    """Greedy generation of n_new tokens after `prompts` (all but the last token prefilled, then one decode step per
    token) through the model's probe policy. Returns (generated [B, n_new], tops: {layer: [n_new, B, Hq]} the
    most-attended position of each head at each step)."""
    graphdef, state = nnx.split(model)
    B, P = prompts.shape

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        st, _ = m.prefill(m.init_state(B, P - 1 + n_new), x[:, :-1])

        def step(carry, _):
            st, tok = carry
            st, logits = m.decode_step(st, tok)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            tops = {i: s["policy"]["top"] for i, s in enumerate(st) if isinstance(s, dict) and "policy" in s}
            return (st, nxt), (nxt, tops)

        _, (gen, tops) = jax.lax.scan(step, (st, x[:, -1]), None, length=n_new)
        return gen.T, tops

    gen, tops = run(state, jnp.asarray(prompts, jnp.int32))
    return np.asarray(gen), {i: np.asarray(t) for i, t in tops.items()}


def task_batch(task: str, rng, n: int, length: int, depths) -> tuple[np.ndarray, np.ndarray]:
    try:
        if task == "passkey":
            x, y, _ = passkey.passkey_batch(rng, n, length, depths=depths)
        else:
            x, y = niah.niah_batch(rng, n, length, depths=depths)
    except ValueError as e:
        raise HeadsError(f"effarch heads: task {task}, length {length}: {e}") from None
    return x, y


def trials_of(x: np.ndarray, y: np.ndarray) -> list[dict]:
    """Per row: the prompt (up to the token that predicts the first answer token), the answer and the needle span."""
    out = []
    for row_x, row_y in zip(x, y, strict=True):
        cols = np.nonzero(row_y != IGNORE_LABEL)[0]
        p0, answer = int(cols[0]), row_y[cols]
        out.append({"prompt": row_x[: p0 + 1], "answer": answer, "span": needle_span(row_x, answer, p0 + 1)})
    return out


def run_trials(model: DecoderLM, trials: list[dict], batch_size: int):
    """(generated answers [N, n], tops {layer: [N, n, Hq]}) of every trial, in batches of prompts of one length."""
    gens, tops = [None] * len(trials), [None] * len(trials)
    by_len: dict[tuple, list[int]] = {}
    for i, t in enumerate(trials):
        by_len.setdefault((len(t["prompt"]), len(t["answer"])), []).append(i)
    for (_, n_new), rows in by_len.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            pad = batch_size - len(chunk) if len(rows) > batch_size else 0  # one compiled shape per length
            prompts = np.stack([trials[i]["prompt"] for i in chunk] + [trials[chunk[0]]["prompt"]] * pad)
            gen, top = greedy_probe(model, prompts, n_new)
            for j, i in enumerate(chunk):
                gens[i] = gen[j]
                tops[i] = {layer: t[:, j] for layer, t in top.items()}
    return gens, tops


def accuracy(gens, trials) -> float:
    return float(np.mean([np.array_equal(g, t["answer"]) for g, t in zip(gens, trials, strict=True)]))


def with_probe(model: DecoderLM, masked=(), mode: str = "uniform") -> list[int]:
    try:
        return model.set_kv_policy(ProbePolicy(masked=tuple(masked), mask_mode=mode))
    except ValueError as e:
        raise HeadsError(f"effarch heads reads attention through a decode policy: {e}") from None


def run_heads(argv) -> dict:
    """The diagnostic (module docstring) of `effarch heads ARGV`; writes the JSON and PNG and returns the result."""
    from effarch.train.generate import load_run_config, restore_run

    args = parser().parse_args(list(argv))
    if args.mask_top is not None and not 0 < args.mask_top <= 100:
        raise HeadsError(f"effarch heads: --mask-top is a percentage in (0, 100], got {args.mask_top}")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise HeadsError(f"effarch heads: run dir {str(run_dir)!r} does not exist")
    run_cfg = load_run_config(run_dir)
    task = args.task or run_cfg.data.task
    if task not in TASKS:
        raise HeadsError(f"effarch heads: the run was trained on data.task {task}; give --task passkey or niah (a "
                         "needle task of its own token ids)")
    cfg, model, step = restore_run(run_dir)
    check_vocab(cfg.model, passkey.VOCAB_SIZE if task == "passkey" else niah.VOCAB_SIZE, task)
    layers = with_probe(model)
    start = time.perf_counter()
    lengths = args.lengths or [cfg.data.seq_len]
    rng = np.random.default_rng(args.seed)
    trials = []
    for T in lengths:
        d = np.repeat(np.asarray(args.depths, float), args.trials)
        trials += trials_of(*task_batch(task, rng, len(d), T, d))
    gens, tops = run_trials(model, trials, args.batch_size)
    heads_per_layer = {layer: tops[0][layer].shape[-1] for layer in layers}
    totals = {layer: np.zeros(h) for layer, h in heads_per_layer.items()}
    counted = 0
    for g, top, t in zip(gens, tops, trials, strict=True):
        if rouge1_recall(g, t["answer"]) > 0.5:
            counted += 1
            for layer in layers:
                totals[layer] += retrieval_hits(top[layer], g, t["prompt"], t["span"])
    n_layers = len(model.blocks)
    scores = [None if i not in totals else (totals[i] / max(counted, 1)).round(6).tolist() for i in range(n_layers)]
    ranking = head_ranking(scores)
    result = {"task": task, "run_dir": str(run_dir), "checkpoint_step": step,
              "options": {"lengths": lengths, "depths": args.depths, "trials": args.trials, "seed": args.seed,
                          "mask_top": args.mask_top, "mask_seeds": args.mask_seeds, "mask_mode": args.mask_mode},
              "n_layers": n_layers, "layers": layers,
              "n_heads": [heads_per_layer.get(i) for i in range(n_layers)],
              "n_kv_heads": [kv_heads(model.blocks[i].mixer) if i in totals else None for i in range(n_layers)],
              "scores": scores, "ranking": ranking, "trials": {"total": len(trials), "counted": counted},
              "accuracy": accuracy(gens, trials)}
    if args.mask_top is not None:
        result["mask"] = mask_test(model, trials, ranking, args)
    with_probe(model)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    out = Path(args.out) if args.out else run_dir / "heads"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.json"
    result["file"], result["png"] = str(path), None
    path.write_text(json.dumps(result, indent=2) + "\n")
    try:
        heatmap(scores, out / f"{task}.png", title=f"retrieval score, {task} ({run_dir.name})")
        result["png"] = str(out / f"{task}.png")
    except PlotsUnavailable as e:
        result["png_skipped"] = str(e)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def kv_heads(mixer) -> int:
    """The KV head count of an attention mixer (DiffQKV names it n_k_heads)."""
    c = mixer.config
    return c.n_k_heads if hasattr(c, "n_k_heads") else c.kv_heads


def mask_test(model: DecoderLM, trials: list[dict], ranking: list[dict], args) -> dict:
    """Accuracy with the top `args.mask_top`% heads masked, and with as many random heads from the rest."""
    heads = [(r["layer"], r["head"]) for r in ranking]
    count = max(1, int(round(args.mask_top / 100 * len(heads))))
    top, rest = heads[:count], heads[count:]

    def masked_accuracy(masked) -> float:
        with_probe(model, masked, args.mask_mode)
        return accuracy(run_trials(model, trials, args.batch_size)[0], trials)

    out = {"percent": args.mask_top, "count": count, "mode": args.mask_mode,
           "top": {"heads": [list(h) for h in top], "accuracy": masked_accuracy(top)}, "random": []}
    if len(rest) >= count:
        for seed in range(args.mask_seeds):
            pick = np.random.default_rng(seed).choice(len(rest), count, replace=False)
            chosen = sorted(rest[i] for i in pick)
            out["random"].append({"seed": seed, "heads": [list(h) for h in chosen],
                                  "accuracy": masked_accuracy(chosen)})
        out["random_mean"] = float(np.mean([r["accuracy"] for r in out["random"]]))
    else:
        out["random_mean"] = None  # fewer heads outside the top than masked ones: no random set of that size
    return out


def heatmap(scores: list, path: Path, title: str) -> None:
    """Layers (rows) x query heads (columns) of retrieval scores, annotated; layers without heads left blank."""
    plt = _pyplot()
    width = max((len(r) for r in scores if r is not None), default=1)
    grid = np.full((len(scores), width), np.nan)
    for i, row in enumerate(scores):
        if row is not None:
            grid[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * width + 1.5), max(2.0, 0.4 * len(scores) + 1.2)))
    im = ax.imshow(grid, vmin=0, vmax=max(1e-6, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0),
                   cmap="viridis", aspect="auto", origin="lower")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(scores)))
    if width * len(scores) <= 400:
        for i in range(len(scores)):
            for j in range(width):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieval score")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def table(result: dict) -> str:
    """Markdown: one row per layer, one column per query head; then the top heads and the masking test."""
    width = max((len(r) for r in result["scores"] if r is not None), default=0)
    lines = ["| layer | " + " | ".join(f"h{h}" for h in range(width)) + " |", "|---" * (width + 1) + "|"]
    for i, row in enumerate(result["scores"]):
        cells = ["-"] * width if row is None else [f"{s:.3f}" for s in row] + [""] * (width - len(row))
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    best = ", ".join(f"L{r['layer']}H{r['head']} {r['score']:.3f}" for r in result["ranking"][:8])
    lines.append(f"\ntop heads: {best}")
    lines.append(f"trials counted (answer recall > 0.5): {result['trials']['counted']} of {result['trials']['total']}; "
                 f"exact-match accuracy {result['accuracy']:.3f}")
    m = result.get("mask")
    if m:
        rnd = ", ".join(f"{r['accuracy']:.3f}" for r in m["random"])
        mean = "n/a" if m["random_mean"] is None else f"{m['random_mean']:.3f}"
        lines.append(f"mask ({m['mode']}) top {m['percent']:g}% = {m['count']} heads: accuracy "
                     f"{m['top']['accuracy']:.3f}; {m['count']} random heads: {mean} (seeds: {rnd or 'none'})")
    return "\n".join(lines)

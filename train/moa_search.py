"""MoA's plan search (Fu et al., arXiv 2406.14909; thu-nics/MoA): `effarch moa-search RUN_DIR --density D --out
plan.json` finds, for a trained softmax-attention model, one elastic span rule S(N) = α + β·N per layer and KV head
under a model-wide density budget, and writes the plan file that `sparse_attention` with `pattern: moa` reads
(layers/moa_plan.py; `effarch convert RUN OUT --to sparse_attention pattern=moa plan=plan.json`).

1. Profile (MoA's attention influence, thu-nics/MoA `MoA/models/llama/modify_llama_profile.py`). The dense model
   runs on calibration batches of the run's own training data, cropped to each profiled length N; in a profiling
   forward (`profiled_hidden`: the attention layers' softmax written out, with a zero "probe" added to each
   attention matrix, so that the probe's gradient is ∂L/∂A; the layers' own code paths are untouched) it gets the
   post-softmax A and Gr = ∂L/∂A of every attention layer, L being each sample's mean cross entropy over its labelled
   positions. Masking A_ij and renormalising row i changes the loss, to first order, by

       ΔL_ij = −A_ij (Gr_ij − Σ_n A_in Gr_in) / (1 − A_ij + eps)      (row 0: −A_0j Gr_0j, nothing to renormalise)

   |ΔL| is sum-pooled into blocks of `block` tokens (E_h[I, J]), averaged over the samples, and max-pooled over the
   query heads of each KV head (one rule per KV head: GQA groups share their keys, hence their cache).
2. Candidates (thu-nics/MoA's elastic-rule generator): α on a grid from −min(lengths) to max(lengths) in
   steps of max(lengths) / 8 (MoA: −2k..8k in steps of 1024 for lengths up to 8k), β ∈ {0, 1/8, ..., 1}; a pair is
   kept when α + β·N ≤ N at every profiled length and α + β·min(lengths) > 0. Pairs whose spans are equal at every
   profiled length cannot be told apart by the profile: the one with the smallest |α|, then the smallest β, stays.
3. Loss and density of a candidate p for head h at length N: the span's token set (sparse_patterns.moa_spans, the
   layer's exact rule) covers a fraction c_p[I, J] of the causal pairs of block (I, J), and
   L_h(p, N) = Σ_{I,J} E_h[I, J] (1 − c_p[I, J]) (the influence of what the plan masks; exact for block 1);
   density_p(N) = S_p(N) / N, the head's KV-cache fraction (MoA's "kv" density).
4. Choice: a MILP (scipy.optimize.milp, HiGHS) picks one candidate per head minimising Σ_N L(N) / E_total(N) (each
   profiled length weighted equally: effarch's single objective where MoA runs a multi-objective search), with
   Σ_heads density(N) ≤ D · #heads at every profiled length and at most `max_plans_per_layer` distinct candidates
   per layer (MoA's --num_plan_limit 2).
"""

import argparse
import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.arches.lm import DecoderLM
from effarch.layers import moa_plan, sparse_patterns
from effarch.layers.attention import Attention
from effarch.train.config import ConfigError
from effarch.train.data.labels import IGNORE_LABEL

USAGE = """usage: effarch moa-search RUN_DIR --density D --out plan.json [--calibration-batches N] [--lengths N ...]
                          [--block B] [--batch-size B] [--n-sink S] [--alphas A ...] [--betas B ...]
                          [--max-plans-per-layer K]"""


class SearchError(ConfigError):
    """The search cannot run as asked (a run without attention layers, a density no candidate reaches, ...)."""


# --- 1. profiling ---------------------------------------------------------------------------------------------------

def attention_layers(model: DecoderLM) -> list[int]:
    """Indices of the blocks whose mixer is causal softmax self-attention (`attention`): the layers a plan covers."""
    return [i for i, b in enumerate(model.blocks)
            if type(b.mixer) is Attention and b.mixer.config.causal and b.mixer.context_dim is None]


def _causal_softmax(q: Float[Array, "B T H K"], k: Float[Array, "B T Hkv K"]) -> Float[Array, "B H T T"]:
    """The post-softmax attention matrix of causal attention (scale 1/sqrt(K), as dot_product_attention), in float32
    at least."""
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)
    dt = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.einsum("BTHK,BSHK->BHTS", q.astype(dt), k.astype(dt)) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)


def profiled_hidden(model: DecoderLM, tokens: Int[Array, "B T"], probes: dict) -> tuple[Array, dict]:
    """The model's forward up to the last block (`DecoderLM.hidden`) with the attention matrix of each layer l in
    `probes` written out: its output is (A_l + probes[l]) V instead of the fused attention, so with zero probes the
    result is the model's and the probes' gradient is ∂L/∂A. Returns (h [B, T, D], {l: A_l [B, H, T, T]})."""
    T = tokens.shape[1]
    h = model.embed(tokens)
    attn = {}
    for i, block in enumerate(model.blocks):
        if i not in probes:
            h = block(h)
            continue
        m = block.mixer
        q, k, v = m.project_qkv(block.norm1(h), jnp.arange(T))
        A = _causal_softmax(q, k)
        v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2).astype(A.dtype)
        o = jnp.einsum("BHTS,BSHK->BTHK", A + probes[i], v).astype(q.dtype)
        h = block._channel_mix(h + m.o_proj(o.reshape(*o.shape[:2], -1)))  # Block.__call__ with this mixer output
        attn[i] = A
    return h, attn


def per_sample_loss(logits: Float[Array, "B T V"], labels: Int[Array, "B T"]) -> Float[Array, " B"]:
    """Each sample's mean cross entropy over its labelled positions (0 for a row without labels)."""
    mask = labels != IGNORE_LABEL
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    return jnp.sum(ce * mask, -1) / jnp.maximum(mask.sum(-1), 1)


def influence(A: Float[Array, "... T T"], grad: Float[Array, "... T T"]) -> Float[Array, "... T T"]:
    """ΔL_ij of masking A_ij and renormalising row i (module docstring), to first order; row 0 without renormalising.
    eps is float32's, as MoA uses its dtype's."""
    eps = float(jnp.finfo(jnp.float32).eps)
    AG = A * grad
    dl = -A * (grad - AG.sum(-1, keepdims=True)) / (1.0 - A + eps)
    return dl.at[..., 0, :].set(-AG[..., 0, :])


def block_sum(x: Float[Array, "... T T"], block: int) -> Float[Array, "... nB nB"]:
    """Sum-pools the last two axes into blocks of `block` (zero-padded to a multiple of it)."""
    T = x.shape[-1]
    nb = -(-T // block)
    pad = nb * block - T
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, pad)])
    return x.reshape(*x.shape[:-2], nb, block, nb, block).sum((-3, -1))


def make_profiler(model: DecoderLM, layers: list[int], block: int):
    """A jitted (tokens [B, N], labels [B, N]) -> ({l: Σ_samples |ΔL| pooled [H, nB, nB]}, number of samples with
    a label), one compile per length."""
    graphdef, state = nnx.split(model)
    H = model.blocks[layers[0]].mixer.config.n_heads

    @jax.jit
    def run(state, tokens, labels):
        m = nnx.merge(graphdef, state)
        B, T = tokens.shape
        zeros = {i: jnp.zeros((B, H, T, T), jnp.float32) for i in layers}

        def loss(probes):
            h, attn = profiled_hidden(m, tokens, probes)
            return per_sample_loss(m.logits(h), labels).sum(), attn

        grads, attn = jax.grad(loss, has_aux=True)(zeros)
        valid = (labels != IGNORE_LABEL).any(-1)
        pooled = {i: jnp.einsum("B,BHIJ->HIJ", valid.astype(jnp.float32),
                                block_sum(jnp.abs(influence(attn[i], grads[i])), block)) for i in layers}
        return pooled, valid.sum()

    return lambda tokens, labels: run(state, jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32))


def profile(model: DecoderLM, batches, lengths: list[int], block: int) -> dict[int, np.ndarray]:
    """{N: E [n_attention_layers, Hkv, nB, nB]}: the influence averaged over the samples of `batches` (an iterable
    of (inputs [B, T], labels [B, T]), each cropped to its first N tokens) and max-pooled over each KV head's
    query heads."""
    layers = attention_layers(model)
    att = model.blocks[layers[0]].mixer.config
    group = att.n_heads // att.kv_heads
    run = make_profiler(model, layers, block)
    sums = {n: None for n in lengths}
    counts = dict.fromkeys(lengths, 0)
    for inputs, labels in batches:
        for n in lengths:
            pooled, count = run(inputs[:, :n], labels[:, :n])
            e = np.stack([np.asarray(pooled[i], np.float64) for i in layers])
            sums[n] = e if sums[n] is None else sums[n] + e
            counts[n] += int(count)
    out = {}
    for n in lengths:
        if not counts[n]:
            raise SearchError(f"--lengths: no calibration row has a labelled position in its first {n} tokens")
        e = sums[n] / counts[n]  # [L, H, nB, nB]
        out[n] = e.reshape(e.shape[0], att.kv_heads, group, *e.shape[2:]).max(2)
    return out


# --- 2, 3. candidates, their losses and densities -----------------------------------------------------------------

def candidates(lengths: list[int], *, alphas=None, betas=None, n_sink: int) -> list[tuple[float, float]]:
    """The (α, β) grid of the module docstring (or the given values), filtered as MoA does, one per distinct tuple of
    spans over `lengths` (the smallest |α|, then the smallest β)."""
    lo, hi = min(lengths), max(lengths)
    if alphas is None:
        step = hi / 8
        alphas = [step * k for k in range(-math.floor(lo / step), 9)]
    if betas is None:
        betas = [k / 8 for k in range(9)]
    kept = {}
    for a, b in sorted(((float(a), float(b)) for a in alphas for b in betas), key=lambda p: (abs(p[0]), p[1], p[0])):
        if any(a + b * n > n for n in lengths) or a + b * lo <= 0:
            continue
        spans = tuple(int(sparse_patterns.moa_spans([a], [b], n, n_sink)[0][0]) for n in lengths)
        kept.setdefault(spans, (a, b))
    return list(kept.values())


def covered_fraction(n: int, block: int, window: np.ndarray, sink: np.ndarray) -> np.ndarray:
    """[P, nB, nB]: per candidate (window, sink [P], sparse_patterns.moa_spans), the fraction of the causal token
    pairs (i >= j) of block (I, J) that the rule shows (t - window < j <= t, or j < sink), 1 where a block has no
    causal pair. Counted per query row as interval overlaps: O(P · N · nB)."""
    nb = -(-n // block)
    i = np.arange(n)[None, :, None]                    # [1, N, 1] queries
    j0 = (np.arange(nb) * block)[None, None, :]        # [1, 1, nB] first key of block J
    j1 = np.minimum(j0 + block, n) - 1                 # last key of block J

    def overlap(lo, hi):  # |[lo, hi] ∩ [j0, j1]| per (candidate, query, key block)
        return np.maximum(0, np.minimum(hi, j1) - np.maximum(lo, j0) + 1)

    w, s = np.asarray(window)[:, None, None], np.asarray(sink)[:, None, None]
    win_lo = np.maximum(0, i - w + 1)
    shown = overlap(win_lo, i) + overlap(0, np.minimum(s, win_lo) - 1)  # window, and the sinks before it
    causal = overlap(0, i)

    def pool(x):  # sum over the queries of each query block: [P, N, nB] -> [P, nB, nB]
        x = np.pad(x, ((0, 0), (0, nb * block - n), (0, 0)))
        return x.reshape(x.shape[0], nb, block, nb).sum(2)

    c = pool(causal)
    return np.where(c > 0, pool(shown) / np.maximum(c, 1), 1.0)


def plan_losses(E: dict[int, np.ndarray], plans: list[tuple[float, float]], *, block: int,
                n_sink: int) -> tuple[np.ndarray, np.ndarray]:
    """(loss [n_lengths, L, Hkv, P], density [n_lengths, P]) of every candidate at every profiled length."""
    losses, densities = [], []
    a, b = np.array([p[0] for p in plans]), np.array([p[1] for p in plans])
    for n, e in E.items():
        span, window, sink = sparse_patterns.moa_spans(a, b, n, n_sink)
        uncovered = 1.0 - covered_fraction(n, block, window, sink)  # [P, nB, nB]
        losses.append(np.einsum("lhij,pij->lhp", e, uncovered))
        densities.append(span / n)
    return np.stack(losses), np.stack(densities)


# --- 4. the MILP ---------------------------------------------------------------------------------------------------

def solve(loss: np.ndarray, density: np.ndarray, budget: float, *, max_plans_per_layer: int = 2,
          length_weights=None) -> np.ndarray:
    """One candidate per head: [L, Hkv] indices into the candidates.

    Args:
      loss: [n_lengths, L, Hkv, P] the loss of each candidate for each head at each length.
      density: [n_lengths, P] each candidate's density at each length.
      budget: the mean density over the heads may not exceed it, at any length.
      max_plans_per_layer: distinct candidates one layer may use.
      length_weights: [n_lengths] weight of each length's loss in the objective (default 1; the search passes
        1 / the length's total influence, so that every length counts equally).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array, vstack

    n_len, L, H, P = loss.shape
    G = L * H  # heads; x[g, p] is variable g * P + p, then y[l, p] (layer l uses p) at G * P + l * P + p
    n_x, n_var = G * P, G * P + L * P
    w = np.ones(n_len) if length_weights is None else np.asarray(length_weights, np.float64)
    weights = np.einsum("t,tlhp->lhp", w, loss).reshape(G, P)
    c = np.concatenate([weights.ravel(), np.zeros(L * P)])

    def rows(entries, n_rows):
        r, col, v = (np.asarray(t) for t in zip(*entries, strict=True)) if entries else ([], [], [])
        return coo_array((v, (r, col)), shape=(n_rows, n_var))

    g, p = np.divmod(np.arange(n_x), P)
    one_each = rows(list(zip(g, np.arange(n_x), np.ones(n_x), strict=True)), G)  # Σ_p x[g, p] = 1
    y_of = n_x + (g // H) * P + p
    link = rows([(k, k, 1.0) for k in range(n_x)] + [(k, int(y_of[k]), -1.0) for k in range(n_x)], n_x)  # x <= y
    per_layer = rows([(l_, n_x + l_ * P + q, 1.0) for l_ in range(L) for q in range(P)], L)  # Σ_p y[l, p] <= K
    dens = rows([(t, k, float(density[t, p[k]])) for t in range(n_len) for k in range(n_x)], n_len)
    A = vstack([one_each, link, per_layer, dens]).tocsr()
    lb = np.concatenate([np.ones(G), np.full(n_x, -np.inf), np.full(L, -np.inf), np.full(n_len, -np.inf)])
    ub = np.concatenate([np.ones(G), np.zeros(n_x), np.full(L, max_plans_per_layer), np.full(n_len, budget * G)])
    res = milp(c, constraints=LinearConstraint(A, lb, ub), integrality=np.ones(n_var), bounds=Bounds(0, 1))
    if res.x is None:
        raise SearchError(f"--density {budget}: no plan meets it ({res.message.strip()}); the sparsest candidate's "
                          f"density is {density.min(1).max():.4g}")
    return np.argmax(res.x[:n_x].reshape(L, H, P), axis=-1)


# --- the command ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SearchResult:
    plan_path: Path
    plan: dict


def search(run_dir: str | Path, out: str | Path, *, density: float, calibration_batches: int = 4,
           lengths: list[int] | None = None, block: int = 64, batch_size: int | None = None, n_sink: int = 4,
           alphas: list[float] | None = None, betas: list[float] | None = None,
           max_plans_per_layer: int = 2) -> SearchResult:
    """Profiles run `run_dir`, solves the plan and writes it to `out` (module docstring)."""
    from effarch.train.data import build_data
    from effarch.train.generate import load_run_config, restore_run
    from effarch.train.lora import merged

    if not 0 < density <= 1:
        raise SearchError(f"--density must be in (0, 1], got {density}")
    cfg = load_run_config(run_dir)
    batch_size = batch_size or min(cfg.train.batch_size, 8)
    try:
        stream = build_data(cfg.data, cfg.model.vocab_size, batch_size)[0]
    except ValueError as e:
        raise SearchError(f"calibration data: {e}") from None
    row_len = stream.batch(0)[0].shape[1]  # data.seq_len, or the longest MQAR segment
    lengths = sorted(set(lengths or [row_len]))
    if lengths[-1] > row_len:
        raise SearchError(f"--lengths {lengths}: each must be at most {row_len}, the length of the run's training "
                          f"rows (longer profiles need a run trained on longer rows)")
    plans = candidates(lengths, alphas=alphas, betas=betas, n_sink=n_sink)
    if not plans:
        raise SearchError(f"--alphas / --betas: no candidate has 0 < α + β·N <= N at the lengths {lengths}")
    cfg, model, step = restore_run(run_dir)
    cfg, model = merged(cfg, model)  # a LoRA run profiles its merged weights
    layers = attention_layers(model)
    if not layers:
        raise SearchError(f"{run_dir}: model.mixers {list(cfg.model.layer_mixers())} has no causal 'attention' layer "
                          "to plan (moa-search profiles a dense softmax-attention model)")
    E = profile(model, (stream.batch(s) for s in range(calibration_batches)), lengths, block)
    loss, dens = plan_losses(E, plans, block=block, n_sink=n_sink)
    totals = np.array([E[n].sum() for n in lengths])
    choice = solve(loss, dens, density, max_plans_per_layer=max_plans_per_layer,  # [L_attn, Hkv]
                   length_weights=1.0 / np.where(totals > 0, totals, 1.0))
    entries = [None] * cfg.model.n_layers
    for row, layer in enumerate(layers):
        entries[layer] = {"alpha": [plans[c][0] for c in choice[row]], "beta": [plans[c][1] for c in choice[row]]}
    heads = np.arange(choice.shape[1])
    chosen_loss = loss[:, np.arange(len(layers))[:, None], heads[None, :], choice].sum((1, 2))  # [n_lengths]
    # The best single candidate for every head within the budget: what one uniform rule loses, for comparison.
    ok = np.flatnonzero((dens <= density).all(0))
    uniform = None
    if len(ok):
        best = ok[np.argmin(np.einsum("t,tlhp->p", 1.0 / np.where(totals > 0, totals, 1.0), loss[..., ok]))]
        uniform = {"alpha": plans[best][0], "beta": plans[best][1],
                   "loss": {str(n): float(loss[t, :, :, best].sum()) for t, n in enumerate(lengths)}}
    metadata = {
        "density": density, "lengths": lengths, "block": block, "n_sink": n_sink, "source_run": str(Path(run_dir)),
        "checkpoint_step": step, "calibration_batches": calibration_batches, "batch_size": batch_size,
        "candidates": len(plans), "max_plans_per_layer": max_plans_per_layer,
        "plan_density": {str(n): float(dens[t][choice].mean()) for t, n in enumerate(lengths)},
        "plan_loss": {str(n): float(chosen_loss[t]) for t, n in enumerate(lengths)},
        "total_influence": {str(n): float(E[n].sum()) for n in lengths},
        "best_uniform_rule": uniform,
    }
    path = moa_plan.write_plan(out, entries, **metadata)
    return SearchResult(path, moa_plan.read_plan(path))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def main(argv: list[str]) -> SearchResult:
    """`effarch moa-search ...`; raises ConfigError (one line) on bad input."""
    from effarch.train.evals.common import positive_int

    p = argparse.ArgumentParser(prog="effarch moa-search", usage=USAGE.removeprefix("usage: "),
                                description="Profile a trained attention run (MoA's attention influence) and pick "
                                "one elastic span rule alpha + beta*N per layer and KV head under a density budget.")
    p.add_argument("run_dir")
    p.add_argument("--density", type=float, required=True, help="mean KV fraction S/N over the heads, at most")
    p.add_argument("--out", required=True, help="the plan file to write (JSON)")
    p.add_argument("--calibration-batches", type=positive_int, default=4, help="training batches to profile on")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                   help="profiled lengths N (rows cropped to N tokens); default data.seq_len")
    p.add_argument("--block", type=positive_int, default=64, help="influence pooling block, tokens (1: exact)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per batch (default min(train, 8))")
    p.add_argument("--n-sink", type=int, default=4, help="sink tokens of the plan's layout (moa's n_sink)")
    p.add_argument("--alphas", type=_number, nargs="+", default=None, help="candidate alphas (tokens)")
    p.add_argument("--betas", type=_number, nargs="+", default=None, help="candidate betas (in [0, 1])")
    p.add_argument("--max-plans-per-layer", type=positive_int, default=2, help="distinct rules per layer")
    args = p.parse_args(argv)
    if args.n_sink < 0:
        raise SearchError(f"--n-sink must be >= 0, got {args.n_sink}")
    if args.betas is not None and min(args.betas) < 0:
        raise SearchError(f"--betas must be >= 0, got {min(args.betas)}")
    return search(args.run_dir, args.out, density=args.density, calibration_batches=args.calibration_batches,
                  lengths=args.lengths, block=args.block, batch_size=args.batch_size, n_sink=args.n_sink,
                  alphas=args.alphas, betas=args.betas, max_plans_per_layer=args.max_plans_per_layer)

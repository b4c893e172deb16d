"""Attention sinks of a trained text run: the attention mass on the first key per layer and head, and held-out bits
per byte of a sink_window model with its sink keys at true positions or at StreamingLLM's cache positions (issue
#21's sink_window evidence; configs/lm/sink_window_bos.yaml has the measurements).

- `--mass L`: the run's held-out windows of L tokens (as `effarch eval RUN perplexity --lengths L` cuts them: with
  `data.text.bos`, BOS at position 0), each attention layer's softmax probabilities rebuilt from its own q, k
  (`project_qkv` at positions 0..L-1), scale 1/sqrt(head_dim) and mask (causal; sink_window: key j < n_sink or within
  the window). Reported per layer and head, averaged over the queries from `--query-from` on: the mass on key 0
  (BOS), on keys 0-3, on the newest 64 keys, and the uniform mass per visible key. Each layer's o_proj(P v) is
  checked against the layer's own output (relative error reported), so the probabilities are the layer's.
- `--lengths L1 L2 ...`: bits per byte on the same held-out windows and labels as `effarch eval RUN perplexity
  --lengths`, with every sink_window layer computed densely for `--sink-positions true` (effarch's layer: RoPE at
  true positions, reproducing `effarch eval`; checked by tests/benchmarks/test_attention_sinks.py) or `cache`:
  StreamingLLM's positions within its cache (arXiv 2309.17453 §3.2), where query t sees sink key j at distance
  min(t, n_sink + window - 1) - j (a cache of n_sink + window slots), never farther than in training; the window
  keys keep their true distances, which are the same in both. The layer computes the same with
  `sparse_attention.sink_positions: cache` (layers/sparse_attention.py; `effarch convert RUN OUT --to sparse_attention
  sink_positions=cache` gives a run `effarch eval` scores so: equal to `cache` here to 4 decimals); this script
  computes both densely from one run, without a conversion.

Run:      .venv/bin/python benchmarks/attention_sinks.py --run-dir RUN --lengths 256 512 1024 2048
              --sink-positions true cache [--mass 256 --query-from 128] [--max-examples N] [--out FILE]
"""

import argparse
import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, platform_info

from effarch.layers.attention import Attention
from effarch.layers.sparse_attention import SparseAttention
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.evals.perplexity import heldout_text
from effarch.train.generate import restore_run


def _mask(layer, T: int) -> np.ndarray:
    """[T, T] bool: the keys query t sees in `layer` (causal; sink_window: sinks or window)."""
    t, j = np.arange(T)[:, None], np.arange(T)[None]
    mask = j <= t
    if isinstance(layer, SparseAttention):
        c = layer.sparse
        if c.pattern != "sink_window":
            raise ValueError(f"attention_sinks: pattern {c.pattern!r}; only sink_window (and dense attention) are read")
        mask = mask & ((j < c.n_sink) | (t - j < c.window))
    return mask


def attend(layer, h, sink_positions: str = "true"):
    """(output [B, T, D], probabilities [B, H, T, T]) of an attention layer on its input h [B, T, D], dense.

    sink_positions "cache": a sink_window layer's sink keys outside the window are scored with the query rotated at
    min(t, n_sink + window - 1) (StreamingLLM's cache position; module docstring)."""
    T = h.shape[1]
    pos = jnp.arange(T)
    q, k, v = layer.project_qkv(h, pos)
    H, Hkv = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, H // Hkv, 2), jnp.repeat(v, H // Hkv, 2)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    mask = _mask(layer, T)
    if sink_positions == "cache" and isinstance(layer, SparseAttention) and layer.sparse.n_sink:
        c = layer.sparse
        qs = layer.project_qkv(h, jnp.minimum(pos, c.n_sink + c.window - 1))[0]
        ls = jnp.einsum("bthd,bshd->bhts", qs, k[:, : c.n_sink]).astype(jnp.float32) * scale
        t, j = np.arange(T)[:, None], np.arange(c.n_sink)[None]
        outside = t - j >= c.window  # a sink key inside the window is a window key: true distance
        logits = logits.at[..., : c.n_sink].set(jnp.where(outside, ls, logits[..., : c.n_sink]))
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1)
    o = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v)
    return layer.o_proj(o.reshape(*o.shape[:2], -1)), p


@contextlib.contextmanager
def dense_layers(hook=None, sink_positions: str = "true"):
    """Within: every Attention / SparseAttention call returns `attend`'s output (hook(layer, probabilities, own
    output, dense output) is called first when given). Restored on exit."""
    saved = {cls: cls.__call__ for cls in (Attention, SparseAttention)}

    def make(cls):
        def call(self, h, *args, **kwargs):
            out, p = attend(self, h, sink_positions)
            if hook is not None:
                hook(self, p, saved[cls](self, h, *args, **kwargs), out)
            return out
        return call

    try:
        for cls in saved:
            cls.__call__ = make(cls)
        yield
    finally:
        for cls, fn in saved.items():
            cls.__call__ = fn


def sink_mass(model, x: np.ndarray, query_from: int, batch: int = 8) -> list[dict]:
    """Per attention layer: mass on key 0, on keys 0-3, on the newest 64 keys ([H] lists, averaged over windows and
    queries >= query_from), the uniform mass per visible key, and the relative error of the dense recomputation."""
    records = []

    def hook(layer, p, own, out):
        p = np.asarray(p)[:, :, query_from:]  # [B, H, Tq, T]
        tq = np.arange(query_from, p.shape[-1])
        recent = (np.arange(p.shape[-1])[None] > tq[:, None] - 64) & (np.arange(p.shape[-1])[None] <= tq[:, None])
        records.append(dict(key0=p[..., 0].mean((0, 2)), keys0_3=p[..., :4].sum(-1).mean((0, 2)),
                            last64=(p * recent).sum(-1).mean((0, 2)),
                            uniform=float((1.0 / _mask(layer, p.shape[-1])[query_from:].sum(1)).mean()),
                            rel_err=float(jnp.abs(own - out).max() / (jnp.abs(own).max() + 1e-30))))

    with dense_layers(hook):
        for i in range(0, len(x), batch):
            model(jnp.asarray(x[i : i + batch]))
    n_layers = len(records) // -(-len(x) // batch)
    out = []
    for layer in range(n_layers):
        rs = records[layer::n_layers]
        out.append({k: [round(float(v), 5) for v in np.mean([r[k] for r in rs], 0)]
                    for k in ("key0", "keys0_3", "last64")}
                   | {"uniform": round(rs[0]["uniform"], 5), "rel_err": max(r["rel_err"] for r in rs)})
    return out


def heldout_bits(model, held, length: int, rows: int, sink_positions: str, max_examples: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of the held-out windows of `length` (all labels, as effarch eval)."""
    x, y = held.windows(length)
    x, y = x[:max_examples], y[:max_examples]
    with dense_layers(sink_positions=sink_positions):
        fwd = jax.jit(lambda t: model(t))
        ce_sum, n = 0.0, 0
        for i in range(0, len(x), rows):
            logp = jax.nn.log_softmax(fwd(jnp.asarray(x[i : i + rows])).astype(jnp.float32), -1)
            yy = jnp.asarray(y[i : i + rows])
            keep = yy != IGNORE_LABEL
            ce = -jnp.take_along_axis(logp, jnp.where(keep, yy, 0)[..., None], -1)[..., 0]
            ce_sum += float(jnp.where(keep, ce, 0.0).sum())
            n += int(keep.sum())
    loss = ce_sum / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2) / held.bytes_per_label,
            "tokens": n, "windows": len(x)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a trained text (or bytes) run")
    ap.add_argument("--lengths", type=int, nargs="*", default=[], help="window lengths for bits per byte")
    ap.add_argument("--sink-positions", nargs="+", choices=("true", "cache"), default=["true"])
    ap.add_argument("--mass", type=int, default=None, help="window length of the attention-mass readout")
    ap.add_argument("--query-from", type=int, default=None, help="mass: queries from here on (default L // 2)")
    ap.add_argument("--mass-windows", type=int, default=32, help="mass: held-out windows read")
    ap.add_argument("--max-examples", type=int, default=None, help="bits per byte: windows per length (default all)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cfg, model, step = restore_run(args.run_dir)
    held = heldout_text(cfg)
    report = {"config": {"run_dir": args.run_dir, "step": step, "mixers": list(cfg.model.layer_mixers()),
                         "bos": cfg.data.task == "text" and cfg.data.text.bos, "platform": platform_info()},
              "bits": {}, "mass": None}
    for positions in args.sink_positions:
        for length in args.lengths:
            rows = max(1, cfg.train.eval_batch_size * cfg.data.seq_len // length)  # as effarch eval
            r = heldout_bits(model, held, length, rows, positions, args.max_examples)
            report["bits"].setdefault(positions, {})[str(length)] = r
            print(f"sink positions {positions}, L={length}: {r['windows']} windows, {r['tokens']} labels, "
                  f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.4f}, bits/byte {r['bits_per_byte']:.4f}",
                  flush=True)
    if args.mass:
        x = held.windows(args.mass)[0][: args.mass_windows]
        q_from = args.mass // 2 if args.query_from is None else args.query_from
        report["mass"] = {"length": args.mass, "query_from": q_from, "windows": len(x),
                          "layers": sink_mass(model, x, q_from)}
    return emit(report, args.out)


if __name__ == "__main__":
    main()

"""Inputs and a literal per-query oracle shared by the landmark op tests."""

import jax
import numpy as np

B, H, K, V = 2, 3, 5, 7


def layout(kind: str, T: int, L: int = 5, seed: int = 0) -> np.ndarray:
    """is_landmark [B, T] for a named layout.

    aligned: a landmark closes every block of L regular tokens (positions L, 2L + 1, ...).
    misaligned: the same stream cut at an offset, so the window starts mid-block (row 0) or on a landmark (row 1).
    random: Bernoulli(0.25), with adjacent landmarks and a landmark at position 0 (empty blocks).
    none: no landmark.
    """
    pos = np.arange(T)
    if kind == "aligned":
        row = pos % (L + 1) == L
        return np.stack([row, row])
    if kind == "misaligned":
        return np.stack([(pos + 2) % (L + 1) == L, (pos + L) % (L + 1) == L])
    if kind == "random":
        lm = np.random.default_rng(seed).random((B, T)) < 0.25
        lm[0, :2] = True
        lm[1, 3:5] = True
        return lm
    if kind == "none":
        return np.zeros((B, T), bool)
    raise ValueError(kind)


def make_inputs(seed: int, T: int):
    """q, k [B, T, H, K], v [B, T, H, V] and a cotangent [B, T, H, V], from one key split once."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(kq, (B, T, H, K)),
        jax.random.normal(kk, (B, T, H, K)),
        jax.random.normal(kv, (B, T, H, V)),
        jax.random.normal(kc, (B, T, H, V)),
    )


def literal_weights(q, k, is_landmark) -> np.ndarray:
    """w [B, H, T, S] by the issue's definitions, one query at a time in float64 (no masks, no log-space)."""
    q, k, lm = np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(is_landmark)
    Bn, T, Hn, Kn = q.shape
    w = np.zeros((Bn, Hn, T, T))
    for b in range(Bn):
        blk = [int(lm[b, :j].sum()) for j in range(T)]
        for h in range(Hn):
            s = k[b, :, h] @ q[b, :, h].T / np.sqrt(Kn)  # [S, T]
            for i in range(T):
                e = np.exp(s[:, i])
                cur = [j for j in range(i + 1) if not lm[b, j] and blk[j] == blk[i]]
                lms = [j for j in range(i) if lm[b, j]]
                z = sum(e[j] for j in cur) + sum(e[j] for j in lms)
                if z == 0:
                    continue
                for j in cur:
                    w[b, h, i, j] = e[j] / z
                for lj in lms:
                    group = [j for j in range(lj) if not lm[b, j] and blk[j] == blk[lj]]
                    gz = sum(e[j] for j in group)
                    for j in group:
                        w[b, h, i, j] = e[lj] / z * e[j] / gz
    return w

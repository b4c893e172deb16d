"""Random causal block lists: a density baseline for experiments, and the lists the op's tests, compile checks and
benchmarks run on."""

import numpy as np


def random_causal_lists(batch: int, groups: int, n_blocks: int, kmax: int, *,
                        rng: np.random.Generator | int = 0, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Each query block lists itself (the diagonal, so no causal row is empty) and kmax - 1 distinct earlier key
    blocks drawn at random (all of them near the start): about kmax / n_blocks of the blocks.

    Returns numpy (idx int32 [batch, groups, n_blocks, kmax] padded with -1, cnt int32 [batch, groups, n_blocks]) for
    `block_sparse_attention` with q_block = kv_block; `shuffle` leaves each list in random order (the op takes any).
    """
    if kmax < 1:
        raise ValueError(f"kmax must be at least 1 (the diagonal block), got {kmax}")
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    idx = np.full((batch, groups, n_blocks, kmax), -1, np.int32)
    cnt = np.broadcast_to(np.minimum(np.arange(n_blocks) + 1, kmax).astype(np.int32), (batch, groups, n_blocks))
    for b, g, i in np.ndindex(batch, groups, n_blocks):
        listed = np.concatenate([[i], rng.choice(i, cnt[b, g, i] - 1, replace=False)])
        idx[b, g, i, : len(listed)] = rng.permutation(listed) if shuffle else listed
    return idx, cnt.copy()

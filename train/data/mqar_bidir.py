"""Bidirectional MQAR: multi-query associative recall read non-causally, the answers masked (task "mqar_bidir").

Zoology's MQAR (train/data/mqar.py; Arora, Eyuboglu et al., arXiv 2312.04927) puts every query after the context,
so a causal model can answer it. Here the sequence is seq_len / 2 two-token slots in random order: D slots hold a
key-value pair `k v`, D slots a query `k MASK` (the same keys, in another order), the rest filler pairs. The label
sits at each MASK: the value paired with the key before it; every other label is -100 (the loss and the accuracy
count the masked slots only, as a masked LM's). A query comes before its pair about half of the time, so a causal
model answers at most the other half: the task needs the whole sequence, a non-causal mixer (`attention` with
causal: false, `sparse_attention` with pattern biformer or bidir_window).

Tokens: MASK = 0; keys from [1, V/2), distinct within an example; values from [V/2, V), drawn with replacement;
filler from [V/2, V) too, so no filler is a key and every query has exactly one answer. The layout is the same for
every vocabulary: V only sets the ranges.

Speed: everything is vectorised over examples (one argsort of uniforms per example draws the slots and the keys).
"""

import numbers

import numpy as np
from jaxtyping import Int

from effarch.train.data.labels import IGNORE_LABEL

MASK = 0


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def bidirectional_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, *,
                       seed: int = 0) -> tuple[Int[np.ndarray, "B T"], Int[np.ndarray, "B T"]]:
    """Generates bidirectional MQAR examples (module docstring).

    Example (V = 16, N = 12, D = 2, seed 0, the second row): slots [filler, query 5, pair 5 -> 8, filler,
    query 7, pair 7 -> 13]; the query of key 5 comes before its pair:
        inputs    13   10 |    5    0 |    5    8 |   15   14 |    7    0 |    7   13
        labels  -100 -100 | -100    8 | -100 -100 | -100 -100 | -100   13 | -100 -100

    Args:
      vocab_size: V >= 4. Keys from [1, V/2) (at least D of them), values and filler from [V/2, V).
      seq_len: N, even; N / 2 >= 2D slots.
      num_kv_pairs: D >= 1.
      num_examples: B >= 1.
      seed: seeds numpy's default_rng.

    Returns:
      (inputs, labels), int32 [B, N] each; D labels per row, at the MASK tokens.
    """
    _check_int("vocab_size", vocab_size, 4)
    _check_int("seq_len", seq_len, 2)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    _check_int("num_examples", num_examples, 1)
    _check_int("seed", seed, 0)
    n, d, half = num_examples, num_kv_pairs, vocab_size // 2
    slots = seq_len // 2
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (two-token slots), got {seq_len}")
    if 2 * d > slots:
        raise ValueError(f"num_kv_pairs must satisfy 4 * num_kv_pairs <= seq_len, got {num_kv_pairs=}, {seq_len=}")
    if d > half - 1:
        raise ValueError(f"vocab_size={vocab_size} has {half - 1} keys, fewer than num_kv_pairs={d}")
    rng = np.random.default_rng(seed)
    keys = rng.random((n, half - 1)).argsort(axis=1)[:, :d] + 1  # D distinct keys per row
    values = rng.integers(half, vocab_size, (n, d))
    order = rng.random((n, slots)).argsort(axis=1)  # slot order: first D pairs, next D queries, then filler
    pair_slot, query_slot = order[:, :d], order[:, d:2 * d]
    query_key = np.take_along_axis(keys, rng.random((n, d)).argsort(axis=1), axis=1)  # the queries' own order
    inputs = rng.integers(half, vocab_size, (n, seq_len)).astype(np.int32)  # filler everywhere, then overwritten
    np.put_along_axis(inputs, 2 * pair_slot, keys, axis=1)
    np.put_along_axis(inputs, 2 * pair_slot + 1, values, axis=1)
    np.put_along_axis(inputs, 2 * query_slot, query_key, axis=1)
    np.put_along_axis(inputs, 2 * query_slot + 1, MASK, axis=1)
    # The value of each query's key: key i of the row has value i, so look the query's key up by its rank in keys.
    value_of = np.zeros((n, half), np.int64)
    np.put_along_axis(value_of, keys, values, axis=1)
    labels = np.full((n, seq_len), IGNORE_LABEL, np.int32)
    np.put_along_axis(labels, 2 * query_slot + 1, np.take_along_axis(value_of, query_key, axis=1), axis=1)
    return inputs, labels

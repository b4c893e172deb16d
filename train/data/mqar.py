"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

Paper: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", arXiv 2312.04927.
Reference: HazyResearch/zoology@d88d6f5, zoology/data/multiquery_ar.py::multiquery_ar (unchanged since dbcb60d).

An example is a context of D key-value pairs `k1 v1 k2 v2 ...` followed by a query region in which every key appears
once more, at an even offset 2·gap drawn from a power law that favours short gaps. The label at a query key is its
value; every other label is -100.

Choices:
- With `random_non_queries=False` the output equals Zoology's token for token for the same seed: the generator is the
  legacy `np.random.RandomState(seed)` (what `np.random.seed` seeds) and the numpy calls run in Zoology's order (all
  keys, then all values, then all gaps, one example after another).
- Zoology draws the filler that replaces the zeros from torch's unseeded global generator. Here the filler comes from
  the same RandomState, drawn after everything else, so a call is reproducible from `seed` alone and its non-filler
  tokens equal the `random_non_queries=False` output. As in Zoology, the filler is uniform over [0, V) and may collide
  with keys (an unlabelled distractor).
- Zoology's `num_passes` (JRT repetition of the context) is not supported: it is always 1.
- Outputs are int32 (what JAX uses without x64) instead of Zoology's int64 torch tensors.

Speed: Zoology's `np.random.choice(..., replace=False)` without `p` shuffles the whole key pool (V/2 - 1 tokens) for
every example, about 1.4 Mersenne Twister draws per pool token. Matching its sequences exactly therefore costs one full
permutation per example and pool; those draws are sequential and cannot be vectorised over examples. Everything else
(the power-law gaps, the assembly, the filler) is vectorised or runs on a pre-drawn block of uniforms.
"""

import numbers
from collections.abc import Sequence

import numpy as np
from jaxtyping import Int

from effarch.train.data.labels import IGNORE_LABEL

# (seq_len, num_kv_pairs, num_examples): training segments of Zoology's standard sweep
# (zoology/experiments/mqar_example_configs/original_mqar_configs.py), vocabulary 8192.
TRAIN_SEGMENTS = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
# (seq_len, num_kv_pairs): test segments of the same sweep, TEST_NUM_EXAMPLES examples each.
TEST_SEGMENTS = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))
TEST_NUM_EXAMPLES = 1_000
VOCAB_SIZE = 8_192


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _validate(vocab_size, seq_len, num_kv_pairs, num_examples, power_a, seed) -> None:
    _check_int("vocab_size", vocab_size, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    _check_int("num_examples", num_examples, 1)
    _check_int("seed", seed, 0)
    if seed >= 2**32:
        raise ValueError(f"seed must be < 2**32 (numpy RandomState), got {seed}")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must be > seq_len, got vocab_size={vocab_size}, seq_len={seq_len}")
    # Zoology: num_kv_pairs * 2 * num_passes + num_kv_pairs * 2 <= input_seq_len, with num_passes = 1.
    if 2 * num_kv_pairs + 2 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs must satisfy 4 * num_kv_pairs <= seq_len, got {num_kv_pairs=}, {seq_len=}")
    if not (isinstance(power_a, numbers.Real) and np.isfinite(power_a) and power_a > 0):
        raise ValueError(f"power_a must be a finite number > 0, got {power_a!r}")


def _sample_from_pool(rng: np.random.RandomState, pool_start: int, pool_size: int, k: int, n: int) -> np.ndarray:
    """n rows of k distinct tokens from [pool_start, pool_start + pool_size), as Zoology's per-row
    `np.random.choice(pool, size=k, replace=False)`, which is `permutation(pool_size)[:k]` (same draws)."""
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        out[i] = rng.permutation(pool_size)[:k]
    return out + pool_start


def _power_law_gaps(rng: np.random.RandomState, p: np.ndarray, k: int, n: int) -> np.ndarray:
    """n rows of k distinct gaps in [0, len(p)), as Zoology's per-row `np.random.choice(space, size=k, replace=False,
    p=p)`: rounds of `rand(k - found)` mapped through the CDF of p with the found gaps zeroed, keeping first
    occurrences, until k are found.

    Each `rand(m)` call takes m consecutive doubles of the stream, so the doubles are drawn in one block and consumed
    by offset; afterwards the generator is rewound and advanced by exactly what was consumed.
    """
    cdf0 = np.cumsum(p)
    cdf0 /= cdf0[-1]
    state = rng.get_state()
    # Expected first-round cost plus slack; the block grows if the repeats need more.
    block = rng.random_sample(2 * n * k + 64)
    first_round = cdf0.searchsorted(block, side="right")
    out = np.empty((n, k), dtype=np.int64)
    pos = 0
    for i in range(n):
        # Worst case for this row: every round finds a single new gap.
        need = pos + k * (k + 1) // 2
        if need > block.size:
            extra = rng.random_sample(max(need - block.size, block.size // 2))
            block = np.concatenate([block, extra])
            first_round = np.concatenate([first_round, cdf0.searchsorted(extra, side="right")])
        # dict keeps insertion order: the first occurrences in draw order, as np.unique(return_index) + sort.
        found = list(dict.fromkeys(first_round[pos : pos + k].tolist()))
        pos += k
        if len(found) < k:
            p_left = p.copy()
            while len(found) < k:
                draws = block[pos : pos + k - len(found)]
                pos += k - len(found)
                p_left[found] = 0
                cdf = np.cumsum(p_left)
                cdf /= cdf[-1]
                found.extend(dict.fromkeys(cdf.searchsorted(draws, side="right").tolist()))
        out[i] = found
    rng.set_state(state)
    rng.random_sample(pos)
    return out


def multiquery_ar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    *,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[Int[np.ndarray, "B T"], Int[np.ndarray, "B T"]]:
    """Generates MQAR examples (Zoology's `multiquery_ar` with `num_passes=1`).

    Example (V = 32, N = 16, D = 2, seed 0, random_non_queries=False), one row:
        inputs  2   20  7   28  0 0 0 0 2  0 0 0 0 0 7  0
        labels  -100 ...                20 ...          28 -100

    Args:
      vocab_size: V. Keys come from [1, V // 2), values from [V // 2, V); must be > seq_len.
      seq_len: N, even. The context (keys and values) fills the first 2D tokens, the queries the rest.
      num_kv_pairs: D >= 1, with 4D <= N (Zoology's `2D·passes + 2D <= N`).
      num_examples: B >= 1.
      power_a: a > 0. Query gaps g in [0, (N - 2D) / 2) are drawn with p(g) ∝ a·(g + 1)^(a - 1); 1.0 is uniform.
      random_non_queries: replace every 0 in the inputs with a uniform token in [0, V), drawn after all else.
      seed: seed of the numpy RandomState, in [0, 2**32).

    Returns:
      (inputs, labels), both int32 [B, N]. labels[b, t] is the value of key inputs[b, t] at the D query positions
      and -100 elsewhere.
    """
    _validate(vocab_size, seq_len, num_kv_pairs, num_examples, power_a, seed)
    rng = np.random.RandomState(seed)
    n, k = num_examples, num_kv_pairs
    half = vocab_size // 2
    keys = _sample_from_pool(rng, 1, half - 1, k, n)
    values = _sample_from_pool(rng, half, vocab_size - half, k, n)

    context = 2 * k
    space = (seq_len - context) // 2
    # Same expression as Zoology, so the CDF and hence the gaps match bit for bit.
    p = float(power_a) * np.arange(1, space + 1) ** (float(power_a) - 1)
    p = p / p.sum()
    gaps = _power_law_gaps(rng, p, k, n)

    inputs = np.zeros((n, seq_len), dtype=np.int32)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys.astype(np.int32), axis=1)
    labels = np.full((n, seq_len), IGNORE_LABEL, dtype=np.int32)
    np.put_along_axis(labels, query_pos, values.astype(np.int32), axis=1)

    if random_non_queries:
        # Drawn for every position, used only at the zeros (Zoology's torch.randint does the same).
        filler = rng.randint(0, vocab_size, size=(n, seq_len), dtype=np.int64).astype(np.int32)
        inputs = np.where(inputs == 0, filler, inputs)
    return inputs, labels


def make_mixture(
    segments: Sequence[tuple[int, ...]],
    vocab_size: int,
    seed: int,
    pad_to: int | None = None,
    *,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Generates one (inputs, labels) pair per segment, segment i with seed `seed + i`.

    Use base seeds at least len(segments) apart for train and test (e.g. TRAIN_SEGMENTS with seed 0, TEST_SEGMENTS
    with seed 100): the same seed and the same (N, D) give the same keys for the first examples.

    Args:
      segments: (seq_len, num_kv_pairs, num_examples) tuples like TRAIN_SEGMENTS, or (seq_len, num_kv_pairs) pairs
        like TEST_SEGMENTS, which get TEST_NUM_EXAMPLES examples each.
      vocab_size: V, shared by all segments.
      seed: base seed.
      pad_to: if given, every segment is right-padded to this length (inputs with 0, labels with -100), so the
        segments can be concatenated; a causal model's outputs before the padding do not change.
      power_a, random_non_queries: passed to `multiquery_ar` for every segment.

    Returns:
      A list with one (inputs, labels) pair of int32 [B_i, N_i] arrays per segment (N_i = pad_to if given).
    """
    out = []
    for i, segment in enumerate(segments):
        if len(segment) == 2:
            seq_len, num_kv_pairs, num_examples = *segment, TEST_NUM_EXAMPLES
        elif len(segment) == 3:
            seq_len, num_kv_pairs, num_examples = segment
        else:
            raise ValueError(f"segments[{i}] must be (seq_len, num_kv_pairs[, num_examples]), got {segment!r}")
        if pad_to is not None and pad_to < seq_len:
            raise ValueError(f"pad_to must be >= every seq_len, got pad_to={pad_to} < {seq_len} (segments[{i}])")
        inputs, labels = multiquery_ar(vocab_size, seq_len, num_kv_pairs, num_examples, power_a=power_a,
                                       random_non_queries=random_non_queries, seed=seed + i)
        if pad_to is not None:
            width = ((0, 0), (0, pad_to - seq_len))
            inputs = np.pad(inputs, width, constant_values=0)
            labels = np.pad(labels, width, constant_values=IGNORE_LABEL)
        out.append((inputs, labels))
    return out

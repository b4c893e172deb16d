"""Single needle in a haystack: RULER's S-NIAH (Hsieh et al., arXiv 2404.06654) as tokens, for small vocabularies.

RULER's niah_single_1 hides "One of the special magic numbers for {key} is: {value}." in a noise haystack and asks
"What is the special magic number for {key} mentioned in the provided text? The special magic number for {key}
mentioned in the provided text is", so the answer continues words that introduced the value. Here, tokenizer-free:

    [preamble] [noise cycle ...] [KEY] k1 k2 [VAL] v1 .. v7 [noise cycle ...] [Q] k1 k2 [VAL] v1 .. v7

The key is two key-word tokens (RULER's adjective-noun word pair), the value 7 digit tokens (RULER's 7-digit
number). The noise is a fixed repeated cycle of NOISE tokens ("The grass is green. ..."). The question ends with
`k1 k2 [VAL]`, the tokens that preceded the value in the needle, as RULER's question ends with the words that
introduced the number: the answer is a copy of what followed them. The preamble (one noise cycle) stands for
RULER's task description, which always precedes the haystack: depth 0 puts the needle right after it, never at
position 0, where the first tokens of a causal model act as an attention sink. The needle sits at a depth in
[0, 1] of the noise (0: right after the preamble, 1: right before the question). Only the 7 value digits carry
labels (each at the position before it, the next-token convention of the other tasks). Scoring: exact match of the
7 digits.

Training can ask the question `n_queries` times (the noise after the needle is cut into that many equal parts,
each followed by the question and its answer): every answer is the same retrieval, so one sequence carries
n_queries times the labels of the one-question test. Evaluation asks once, at the end (train/data/passkey.py does
the same). Beware with local attention: a later question can copy the answer from the previous one, so with 4
questions in 256 tokens every answer lay within 64 tokens of an earlier copy and a model with a 64-token window
never needed its long-range path in training (configs/niah/titans_mac.yaml therefore asks once).
"""

import numpy as np

from effarch.train.data.labels import IGNORE_LABEL

DIGITS = tuple(range(10))  # token d is digit d
KEY_WORDS = tuple(range(10, 26))  # 16 key words; a key is an ordered pair (256 keys)
NOISE = (26, 27, 28, 29, 30, 31, 32)
KEY, VAL, QUERY = 33, 34, 35
VOCAB_SIZE = 36
KEY_LEN, VALUE_LEN = 2, 7
_PREAMBLE = len(NOISE)
_NEEDLE = 1 + KEY_LEN + 1 + VALUE_LEN  # [KEY] k1 k2 [VAL] v1..v7
_QUESTION = 1 + KEY_LEN + 1 + VALUE_LEN  # [Q] k1 k2 [VAL] answer


def niah_example(
    key: np.ndarray, value: np.ndarray, depth: float, seq_len: int, n_queries: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One example of exactly seq_len tokens.

    Args:
      key: 2 key-word tokens (from KEY_WORDS).
      value: 7 digits, [7] ints in 0..9.
      depth: where the needle sits in the noise, 0 (right after the preamble) to 1 (just before the question).
      seq_len: tokens.
      n_queries: how many times the question is asked (the last one ends the sequence).

    Returns:
      (inputs [seq_len], labels [seq_len]: -100 except at the 7 positions before each answer's digits).
    """
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    overhead = _PREAMBLE + _NEEDLE + n_queries * _QUESTION
    n_noise = seq_len - overhead
    if n_noise < 0:
        raise ValueError(f"seq_len={seq_len} is too short for a needle example with {n_queries} question(s) "
                         f"({overhead} tokens)")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key, value = np.asarray(key, np.int64), np.asarray(value, np.int64)
    if key.shape != (KEY_LEN,) or not np.isin(key, KEY_WORDS).all():
        raise ValueError(f"key must be {KEY_LEN} tokens from KEY_WORDS {KEY_WORDS[0]}..{KEY_WORDS[-1]}, got {key}")
    if value.shape != (VALUE_LEN,) or value.min() < 0 or value.max() > 9:
        raise ValueError(f"value must be {VALUE_LEN} digits 0..9, got {value}")
    noise = np.resize(np.asarray(NOISE), _PREAMBLE + n_noise)
    n_prefix = _PREAMBLE + int(round(depth * n_noise))
    parts = [noise[:n_prefix], [KEY], key, [VAL], value]
    answers = []  # index of each question's [VAL], the token that predicts the first digit
    for chunk in np.array_split(noise[n_prefix:], n_queries):
        parts += [chunk, [QUERY], key, [VAL]]
        answers.append(sum(map(len, parts)) - 1)
        parts.append(value)
    inputs = np.concatenate(parts)
    labels = np.full(seq_len, IGNORE_LABEL)
    for a in answers:  # the question's [VAL] and the first six answer digits predict the next answer digit
        labels[a : a + VALUE_LEN] = value
    return inputs, labels


def niah_batch(
    rng: np.random.Generator, n: int, seq_len: int, depths: np.ndarray | None = None, n_queries: int = 1, *,
    depth_grid: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """n examples with random keys and values at random depths (or the given `depths` [n]).

    The depths are uniform in [0, 1] when depth_grid is 0, else drawn from depth_grid evenly spaced depths 0, ..,
    1 (RULER draws essay-haystack depths from 40 of them): the grid holds both ends, the needle right after the
    preamble and the needle right before the question, which uniform depths almost never give.

    Returns (inputs [n, seq_len] int32, labels [n, seq_len] int32).
    """
    if depth_grid == 1 or depth_grid < 0:
        raise ValueError(f"depth_grid must be 0 (uniform depths) or >= 2, got {depth_grid}")
    keys = rng.choice(np.asarray(KEY_WORDS), (n, KEY_LEN))
    values = rng.integers(0, 10, (n, VALUE_LEN))
    if depths is None:
        depths = rng.integers(0, depth_grid, n) / (depth_grid - 1) if depth_grid else rng.random(n)
    depths = np.asarray(depths)
    rows = [niah_example(k, v, float(d), seq_len, n_queries) for k, v, d in zip(keys, values, depths, strict=True)]
    return (np.stack([r[0] for r in rows]).astype(np.int32), np.stack([r[1] for r in rows]).astype(np.int32))

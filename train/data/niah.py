"""Single needle in a haystack, token-level analogue of RULER's S-NIAH for small vocabularies (specs §7.3, choice).

RULER's niah_single_1 hides "One of the special magic numbers for {key} is: {value}." in a noise haystack and asks
for the number of {key}. Here, tokenizer-free:

    [noise cycle ...] [KEY] k1 k2 [VAL] v1 .. v7 [noise cycle ...] [Q] k1 k2 v1 .. v7

The key is two key-word tokens (RULER's adjective-noun word pair), the value 7 digit tokens (RULER's 7-digit
number). The noise is a fixed repeated cycle of NOISE tokens ("The grass is green. ..."); the needle sits at a depth
in [0, 1] of the noise (0: at the start, 1: right before the question). Only the 7 value digits carry labels (each
at the position before it, the next-token convention of the other tasks). Scoring: exact match of the 7 digits.
"""

import numpy as np

DIGITS = tuple(range(10))  # token d is digit d
KEY_WORDS = tuple(range(10, 26))  # 16 key words; a key is an ordered pair (256 keys)
NOISE = (26, 27, 28, 29, 30, 31, 32)
KEY, VAL, QUERY = 33, 34, 35
VOCAB_SIZE = 36
KEY_LEN, VALUE_LEN = 2, 7
IGNORE = -100
_NEEDLE = 1 + KEY_LEN + 1 + VALUE_LEN  # [KEY] k1 k2 [VAL] v1..v7
_OVERHEAD = _NEEDLE + 1 + KEY_LEN + VALUE_LEN  # + [Q] k1 k2 answer


def niah_example(key: np.ndarray, value: np.ndarray, depth: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One example of exactly seq_len tokens.

    Args:
      key: 2 key-word tokens (from KEY_WORDS).
      value: 7 digits, [7] ints in 0..9.
      depth: where the needle sits in the noise, 0 (start) to 1 (just before the question).
      seq_len: tokens.

    Returns:
      (inputs [seq_len], labels [seq_len]: -100 except at the 7 positions that predict the answer digits).
    """
    n_noise = seq_len - _OVERHEAD
    if n_noise < 0:
        raise ValueError(f"seq_len={seq_len} is too short for a needle example ({_OVERHEAD} tokens)")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key, value = np.asarray(key, np.int64), np.asarray(value, np.int64)
    if key.shape != (KEY_LEN,) or not np.isin(key, KEY_WORDS).all():
        raise ValueError(f"key must be {KEY_LEN} tokens from KEY_WORDS {KEY_WORDS[0]}..{KEY_WORDS[-1]}, got {key}")
    if value.shape != (VALUE_LEN,) or value.min() < 0 or value.max() > 9:
        raise ValueError(f"value must be {VALUE_LEN} digits 0..9, got {value}")
    noise = np.resize(np.asarray(NOISE), n_noise)
    n_prefix = int(round(depth * n_noise))
    needle = np.concatenate([[KEY], key, [VAL], value])
    inputs = np.concatenate([noise[:n_prefix], needle, noise[n_prefix:], [QUERY], key, value])
    labels = np.full(seq_len, IGNORE)
    # The last key token of the question and the first six answer digits predict the next answer digit.
    labels[seq_len - VALUE_LEN - 1 : seq_len - 1] = value
    return inputs, labels


def niah_batch(
    rng: np.random.Generator, n: int, seq_len: int, depths: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n examples with random keys and values at uniform random depths (or the given `depths` [n]).

    Returns (inputs [n, seq_len] int32, labels [n, seq_len] int32).
    """
    keys = rng.choice(np.asarray(KEY_WORDS), (n, KEY_LEN))
    values = rng.integers(0, 10, (n, VALUE_LEN))
    depths = rng.random(n) if depths is None else np.asarray(depths)
    rows = [niah_example(k, v, float(d), seq_len) for k, v, d in zip(keys, values, depths, strict=True)]
    return (np.stack([r[0] for r in rows]).astype(np.int32), np.stack([r[1] for r in rows]).astype(np.int32))

"""Passkey retrieval, token-level analogue for small vocabularies (Mohtashami & Jaggi, arXiv 2305.16300).

The landmark paper's task (epfml/landmark-attention, llama/run_test.py::generate_prompt) hides a 5-digit pass key in
filler text and asks for it at the end. Here, tokenizer-free:

    [preamble] [garbage cycle ...] [PK] d1 d2 d3 d4 d5 [/PK] [garbage cycle ...] [Q] [PK] d1 d2 d3 d4 d5

The garbage is a fixed repeated cycle of GARBAGE tokens; the key sits at a depth in [0, 1] of the garbage (0: at
its start, 1: right before the question). The preamble (one garbage cycle) stands for the paper's task description,
which always precedes the garbage: depth 0 puts the key right after it, never at position 0, where the first tokens
of a causal model act as an attention sink and the paper's prompt never puts the key. The question ends with the
key's opening marker, as the paper's ends with "The pass key is", the words that introduced the key: the answer is a
copy of what followed the earlier occurrence. Only the answer digits carry labels.

Training can ask the question `n_queries` times (the garbage after the key is cut into that many equal parts, each
followed by `[Q] [PK] key`): each answer is the same retrieval, so one sequence carries n_queries times the labels of
the one-question test. Evaluation keeps one question at the end. With `landmark_block_len` L a
landmark token follows every L tokens (the layout of layers/landmark.py), and labels skip it
(`text.landmark_targets`'s rule). Scoring: exact match of the five digits, greedy.
"""

import numpy as np

from effarch.train.data.labels import IGNORE_LABEL

DIGITS = tuple(range(10))  # token d is digit d
GARBAGE = (10, 11, 12, 13, 14)
PK_OPEN, PK_CLOSE, QUERY, LANDMARK = 15, 16, 17, 18
VOCAB_SIZE = 19
KEY_LEN = 5
_INFO, _QUESTION = KEY_LEN + 2, 2 + KEY_LEN  # [PK] key [/PK];  [Q] [PK] answer
_PREAMBLE = len(GARBAGE)


def raw_length(seq_len: int, landmark_block_len: int = 0) -> int:
    """Regular tokens that fit in seq_len positions once landmarks are inserted."""
    if not landmark_block_len:
        return seq_len
    n = seq_len * landmark_block_len // (landmark_block_len + 1)
    while n + 1 + (n + 1) // landmark_block_len <= seq_len:
        n += 1
    while n + n // landmark_block_len > seq_len:
        n -= 1
    return n


def passkey_example(
    key: np.ndarray, depth: float, seq_len: int, landmark_block_len: int = 0, n_queries: int = 1
) -> tuple[np.ndarray, np.ndarray, int]:
    """One example of exactly seq_len positions.

    Args:
      key: the 5 digits, [5] ints in 0..9.
      depth: where the key sits in the garbage, 0 (start) to 1 (just before the question).
      seq_len: positions, landmarks included.
      landmark_block_len: L > 0 inserts a landmark after every L tokens.
      n_queries: how many times the question is asked (the last one ends the sequence).

    Returns:
      (inputs [seq_len], labels [seq_len] (-100 except the answer digits), position of the token that predicts
      the first digit of the last answer: the last question's [PK]).
    """
    n_raw = raw_length(seq_len, landmark_block_len)
    overhead = _INFO + n_queries * _QUESTION
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    n_garbage = n_raw - overhead - _PREAMBLE
    if n_garbage < 0:
        raise ValueError(f"seq_len={seq_len} is too short for a passkey example ({overhead} tokens + landmarks)")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    garbage = np.resize(np.asarray(GARBAGE), _PREAMBLE + n_garbage)
    n_prefix = _PREAMBLE + int(round(depth * n_garbage))
    key = np.asarray(key, np.int64)
    parts = [garbage[:n_prefix], [PK_OPEN], key, [PK_CLOSE]]
    answers = []  # raw index of each question's [PK]
    for chunk in np.array_split(garbage[n_prefix:], n_queries):
        parts += [chunk, [QUERY, PK_OPEN], key]
        answers.append(sum(map(len, parts)) - KEY_LEN - 1)
    raw = np.concatenate(parts)
    raw_labels = np.full(n_raw, IGNORE_LABEL)
    for a in answers:  # the question's [PK] and the first four answer digits predict the next answer digit
        raw_labels[a : a + KEY_LEN] = key
    if landmark_block_len:
        positions = np.arange(n_raw) + np.arange(n_raw) // landmark_block_len
    else:
        positions = np.arange(n_raw)
    inputs = np.full(seq_len, GARBAGE[0])
    labels = np.full(seq_len, IGNORE_LABEL)
    if landmark_block_len:
        inputs[np.arange(seq_len) % (landmark_block_len + 1) == landmark_block_len] = LANDMARK
    inputs[positions] = raw
    labels[positions] = raw_labels
    return inputs, labels, int(positions[answers[-1]])


def passkey_batch(
    rng: np.random.Generator, n: int, seq_len: int, landmark_block_len: int = 0, depths: np.ndarray | None = None,
    n_queries: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n examples with random keys at uniform random depths (or the given `depths` [n]).

    Returns (inputs [n, seq_len], labels [n, seq_len], positions of the question's [PK] [n]).
    """
    keys = rng.integers(0, 10, (n, KEY_LEN))
    depths = rng.random(n) if depths is None else depths
    rows = [passkey_example(k, float(d), seq_len, landmark_block_len, n_queries)
            for k, d in zip(keys, depths, strict=True)]
    return (np.stack([r[0] for r in rows]).astype(np.int32), np.stack([r[1] for r in rows]).astype(np.int32),
            np.array([r[2] for r in rows]))

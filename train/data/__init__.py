"""Training and evaluation data, addressed by step so that a resumed run sees exactly the batches it would have.

The iterator position is the step: batch s of the train stream is a pure function of (data config, seed, s),
so a checkpoint only needs the step to resume the data where it stopped.
"""

import dataclasses

import numpy as np

from effarch.train.data import mqar, text


@dataclasses.dataclass(frozen=True)
class Segment:
    """One evaluation set: inputs/labels [N, seq_len] and a name for the metrics."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray


class TrainStream:
    """Shuffled epochs over a fixed set of examples; `batch(step)` is deterministic."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        if len(inputs) < batch_size:
            raise ValueError(f"train set has {len(inputs)} examples, fewer than batch_size={batch_size}")
        self.inputs, self.labels = inputs, labels
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(inputs) // batch_size  # the remainder of each epoch is dropped
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Global batch `step` (or the `rows` of it that this process loads)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size][rows]
        return self.inputs[idx], self.labels[idx]


def _pad(x: np.ndarray, length: int, value: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def _segments(data_cfg) -> tuple[tuple, tuple]:
    if data_cfg.mixture == "zoology_standard":
        return mqar.TRAIN_SEGMENTS, tuple((n, d, 1000) for n, d in mqar.TEST_SEGMENTS)
    return data_cfg.train_segments, data_cfg.test_segments


def build_data(data_cfg, vocab_size: int, batch_size: int) -> tuple[TrainStream, list[Segment]]:
    """The train stream (segments padded on the right to the longest) and one eval Segment per test segment.

    Right padding (token 0, label -100) is safe for causal models: no real position sees a pad.
    """
    if data_cfg.task == "bytes":
        if vocab_size < 256:
            raise ValueError(f"model.vocab_size={vocab_size}: the bytes task needs at least 256")
        x, y, vx, vy = text.byte_lm_examples(data_cfg.text_source, data_cfg.seq_len, data_cfg.max_bytes,
                                             data_cfg.val_fraction)
        return TrainStream(x, y, batch_size, seed=data_cfg.seed), [Segment("bytes_val", vx, vy)]
    train_segs, test_segs = _segments(data_cfg)
    max_len = max(n for n, _, _ in train_segs)
    xs, ys = [], []
    for i, (n, d, count) in enumerate(train_segs):
        x, y = mqar.multiquery_ar(vocab_size, n, d, count, power_a=data_cfg.power_a,
                                  random_non_queries=data_cfg.random_non_queries, seed=data_cfg.seed + i)
        xs.append(_pad(x, max_len, 0))
        ys.append(_pad(y, max_len, -100))
    stream = TrainStream(np.concatenate(xs), np.concatenate(ys), batch_size, seed=data_cfg.seed)
    evals = []
    for i, (n, d, count) in enumerate(test_segs):
        x, y = mqar.multiquery_ar(vocab_size, n, d, count, power_a=data_cfg.power_a,
                                  random_non_queries=data_cfg.random_non_queries, seed=data_cfg.seed + 1000 + i)
        evals.append(Segment(f"mqar_N{n}_D{d}", x, y))
    return stream, evals

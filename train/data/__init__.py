"""Training and evaluation data, addressed by step so that a resumed run sees exactly the batches it would have.

The iterator position is the step: batch s of the train stream is a pure function of (data config, seed, s),
so a checkpoint only needs the step to resume the data where it stopped. Every stream has
`batch(step, rows) -> (inputs, labels)` (numpy, the `rows` of the global batch this process loads), safe to call
from a prefetching thread, and `max_labels_per_example`.
"""

import dataclasses
import threading

import numpy as np

from effarch.train.data import mqar, mqar_bidir, niah, passkey, text
from effarch.train.data.labels import IGNORE_LABEL
from effarch.train.data.text_stream import TextStream, build_text_data


@dataclasses.dataclass(frozen=True)
class Segment:
    """One evaluation set: inputs/labels [N, seq_len] and a name for the metrics. `bytes_per_label`: the UTF-8
    bytes a label stands for on average (text task), which turns the loss into bits per byte."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    bytes_per_label: float | None = None

    @property
    def max_labels_per_example(self) -> int:
        return int((self.labels != IGNORE_LABEL).sum(1).max())


class TrainStream:
    """Shuffled epochs over a fixed set of examples; `batch(step)` is deterministic."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        if len(inputs) < batch_size:
            raise ValueError(f"train set has {len(inputs)} examples, fewer than batch_size={batch_size}")
        self.inputs, self.labels = inputs, labels
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(inputs) // batch_size  # the remainder of each epoch is dropped
        self.max_labels_per_example = int((labels != IGNORE_LABEL).sum(1).max())
        self._perm_epoch, self._perm = -1, None
        self._lock = threading.Lock()  # the cached permutation is shared with a prefetching thread

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs))
                self._perm_epoch = epoch
            return self._perm

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Global batch `step` (or the `rows` of it that this process loads)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size][rows]
        return self.inputs[idx], self.labels[idx]


def mqar_segments(data_cfg) -> tuple[tuple, tuple]:
    """(train, test) MQAR segments of `data_cfg`: Zoology's standard mixture or the config's own."""
    if data_cfg.mqar.mixture == "zoology_standard":
        return mqar.TRAIN_SEGMENTS, tuple((n, d, 1000) for n, d in mqar.TEST_SEGMENTS)
    return data_cfg.mqar.train_segments, data_cfg.mqar.test_segments


def build_data(data_cfg, vocab_size: int, batch_size: int) -> tuple[TrainStream | TextStream, list[Segment]]:
    """The train stream (segments padded on the right to the longest) and one eval Segment per test segment.

    Right padding (token 0, label -100) is safe for causal models: no real position sees a pad.
    """
    if data_cfg.task == "text":
        stream, (vx, vy, bytes_per_label) = build_text_data(data_cfg, vocab_size, batch_size)
        return stream, [Segment("text_val", vx, vy, bytes_per_label)]
    if data_cfg.task == "bytes":
        if vocab_size < 256:
            raise ValueError(f"model.vocab_size={vocab_size}: the bytes task needs at least 256")
        if data_cfg.landmark.block_len and vocab_size <= data_cfg.landmark.token:
            raise ValueError(f"model.vocab_size={vocab_size} has no id for data.landmark.token="
                             f"{data_cfg.landmark.token}")
        x, y, vx, vy = text.byte_lm_examples(data_cfg.text.source, data_cfg.seq_len, data_cfg.text.max_bytes,
                                             data_cfg.text.val_fraction, landmark_block_len=data_cfg.landmark.block_len,
                                             landmark_token=data_cfg.landmark.token, data_dir=data_cfg.data_dir,
                                             field=data_cfg.text.field)
        return TrainStream(x, y, batch_size, seed=data_cfg.seed), [Segment("bytes_val", vx, vy)]
    if data_cfg.task == "passkey":
        if vocab_size < passkey.VOCAB_SIZE:
            raise ValueError(f"model.vocab_size={vocab_size}: the passkey task needs at least {passkey.VOCAB_SIZE}")
        rng = np.random.default_rng(data_cfg.seed)
        x, y, _ = passkey.passkey_batch(rng, data_cfg.passkey.examples, data_cfg.seq_len, data_cfg.landmark.block_len,
                                        n_queries=data_cfg.passkey.queries)
        vx, vy, _ = passkey.passkey_batch(np.random.default_rng(data_cfg.seed + 1000), 256, data_cfg.seq_len,
                                          data_cfg.landmark.block_len)
        return TrainStream(x, y, batch_size, seed=data_cfg.seed), [Segment(f"passkey_{data_cfg.seq_len}", vx, vy)]
    if data_cfg.task == "niah":
        if vocab_size < niah.VOCAB_SIZE:
            raise ValueError(f"model.vocab_size={vocab_size}: the niah task needs at least {niah.VOCAB_SIZE}")
        x, y = niah.niah_batch(np.random.default_rng(data_cfg.seed), data_cfg.niah.examples, data_cfg.seq_len,
                              n_queries=data_cfg.niah.queries, depth_grid=data_cfg.niah.depths)
        vx, vy = niah.niah_batch(np.random.default_rng(data_cfg.seed + 1000), 256, data_cfg.seq_len)
        return TrainStream(x, y, batch_size, seed=data_cfg.seed), [Segment(f"niah_{data_cfg.seq_len}", vx, vy)]
    if data_cfg.task == "mqar_bidir":
        c = data_cfg.mqar_bidir
        if vocab_size <= 2 * c.num_kv_pairs + 1:
            raise ValueError(f"model.vocab_size={vocab_size}: the mqar_bidir task needs more than 2 x "
                             f"num_kv_pairs + 1 = {2 * c.num_kv_pairs + 1} ids (MASK, keys, values)")
        x, y = mqar_bidir.bidirectional_mqar(vocab_size, data_cfg.seq_len, c.num_kv_pairs, c.examples,
                                             seed=data_cfg.seed)
        vx, vy = mqar_bidir.bidirectional_mqar(vocab_size, data_cfg.seq_len, c.num_kv_pairs, c.test_examples,
                                               seed=data_cfg.seed + 1000)
        return TrainStream(x, y, batch_size, seed=data_cfg.seed), [
            Segment(f"mqar_bidir_N{data_cfg.seq_len}_D{c.num_kv_pairs}", vx, vy)]
    train_segs, test_segs = mqar_segments(data_cfg)
    options = dict(power_a=data_cfg.mqar.power_a, random_non_queries=data_cfg.mqar.random_non_queries)
    max_len = max(n for n, _, _ in train_segs)
    train = mqar.make_mixture(train_segs, vocab_size, data_cfg.seed, pad_to=max_len, **options)
    stream = TrainStream(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), batch_size,
                         seed=data_cfg.seed)
    # Test data from seed + 1000: a stream disjoint from the training segments' seeds.
    tests = mqar.make_mixture(test_segs, vocab_size, data_cfg.seed + 1000, **options)
    evals = [Segment(f"mqar_N{n}_D{d}", x, y) for (n, d, _), (x, y) in zip(test_segs, tests, strict=True)]
    return stream, evals

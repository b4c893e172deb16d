"""A split of a TFDS dataset written as array_record shards one example at a time: memory independent of its size.

TFDS's own writer (`tfds.core.writer.Writer`) collects a whole split in its Shuffler, sorts the serialized examples
by the md5 hash of their key salted with the split name (`tfds.core.hashing.Hasher(split)`), then cuts them into
shards; it keeps up to 1 GB in memory and spills the rest through `tf.io.gfile`, so without TensorFlow a larger split
cannot be written. Here the order is computed from the keys alone (`tfds_order`), before any example is read, and
the number of shards from the examples' serialized sizes, which are known from their lengths (`bytes_example_size`);
the caller then produces the examples in that order and each is serialized and written as it comes.

The result is what TFDS writes: the same records in the same order, the same shard count and lengths, the files
named by the builder's `ShardedFileTemplate` (`<name>-<split>.array_record-000NN-of-000MM`, array_record options
`group_size:1`), and the `SplitInfo` (shard lengths, bytes) that goes into dataset_info.json, so
`builder.as_data_source` and `tfds.data_source` read it unchanged. Only examples whose features are all single
byte strings (tfds `Text`) are supported: their serialized size is a function of the lengths.
"""

from collections.abc import Iterable, Sequence

from array_record.python.array_record_module import ArrayRecordWriter
from tensorflow_datasets.core import example_serializer, hashing, naming, splits
from tensorflow_datasets.core.utils import shard_utils

# What TFDS's ArrayRecordFileAdapter.write_examples passes: one record per chunk, so any record is read alone.
ARRAY_RECORD_OPTIONS = "group_size:1"


def tfds_order(keys: Sequence[str], split: str) -> list[str]:
    """`keys` in the order TFDS's Shuffler writes their examples: by the md5 of the split name then the key."""
    hasher = hashing.Hasher(split)
    hashed = sorted((hasher.hash_key(k), k) for k in keys)
    for (h1, k1), (h2, k2) in zip(hashed, hashed[1:]):
        if h1 == h2:  # TFDS raises too (DuplicatedKeysError): a key normalized to another ('\\' -> '/')
            raise ValueError(f"two examples of split {split!r} share a key: {k1!r} and {k2!r}")
    return [k for _, k in hashed]


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field(n: int) -> int:
    """Bytes of a length-delimited protobuf field of field number < 16 holding n bytes: tag, length, payload."""
    return 1 + _varint_len(n) + n


def bytes_example_size(lengths: dict[str, int]) -> int:
    """Bytes of the serialized tf.train.Example whose features (name -> length) each hold one byte string:
    Example{features: Features{feature: map entries {key, Feature{bytes_list: BytesList{value: [bytes]}}}}}."""
    return _field(sum(_field(_field(len(k.encode())) + _field(_field(_field(n)))) for k, n in lengths.items()))


def write_split(split: str, template: naming.ShardedFileTemplate, features, sizes: Sequence[int],
                examples: Iterable[tuple[str, dict]], keys: Sequence[str],
                shard_config: shard_utils.ShardConfig | None = None) -> splits.SplitInfo:
    """Writes `examples` ((key, example) pairs, in the order of `keys`) as the shards of `split`; returns its info.

    Args:
      split: the split's name.
      template: where the shards go (the builder's `_get_filename_template(split)`).
      features: the builder's FeaturesDict (encodes and serializes each example).
      sizes: [n] the serialized size of each example (`bytes_example_size`), in order: they fix the shard count
        before the first example is written. An example of another size raises (its file changed meanwhile).
      examples: the examples, produced one at a time in the order of `keys`.
      keys: [n] the keys, in TFDS's order (`tfds_order`).
      shard_config: how many shards (TFDS's default: from the total size, 64 MiB to 1 GiB a shard).
    """
    total, n = sum(sizes), len(sizes)
    if n == 0:
        raise ValueError(f"split {split!r} has no examples")
    n_shards = (shard_config or shard_utils.ShardConfig()).get_number_shards(total, n)
    bounds = shard_utils.get_shard_boundaries(n, n_shards)  # [n_shards] the end index of each shard
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    shard, writer, i = 0, None, 0
    try:
        for key, example in examples:
            if i >= n or key != keys[i]:
                raise ValueError(f"split {split!r}: example {i} has key {key!r} where {keys[i]!r} was expected"
                                 if i < n else f"split {split!r}: more than the {n} examples expected")
            record = serializer.serialize_example(features.encode_example(example))
            if len(record) != sizes[i]:
                raise ValueError(f"{key} changed while the corpus was being prepared ({len(record)} bytes serialized "
                                 f"where its size gave {sizes[i]}); prepare it again")
            if writer is None:
                path = template.sharded_filepath(shard_index=shard, num_shards=n_shards)
                writer = ArrayRecordWriter(str(path), ARRAY_RECORD_OPTIONS)
                if not writer.ok():
                    raise OSError(f"cannot write {path}")
            writer.write(record)
            i += 1
            if i == bounds[shard]:
                _close(writer, template, shard, n_shards)
                writer, shard = None, shard + 1
        if i != n:
            raise ValueError(f"split {split!r}: {i} examples produced where {n} were expected")
    finally:
        if writer is not None:  # an error mid-shard: the caller's temporary directory is removed
            writer.close()
    return splits.SplitInfo(name=split, shard_lengths=[b - a for a, b in zip([0, *bounds], bounds)], num_bytes=total,
                            filename_template=template)


def _close(writer: ArrayRecordWriter, template: naming.ShardedFileTemplate, shard: int, n_shards: int) -> None:
    ok = writer.ok()  # False once closed: ask first
    writer.close()
    if not ok:
        raise OSError(f"writing {template.sharded_filepath(shard_index=shard, num_shards=n_shards)} failed")

"""tf.data input pipeline over DeepLab2-format TFRecords.

    files -> (shard per input pipeline) -> [train: shuffle, repeat]
          -> parallel interleave of TFRecord readers -> [train: shuffle]
          -> decode -> [copy-paste: zip with a second, independently shuffled
             stream] -> preprocess + targets -> per-replica batch -> prefetch

Evaluation reads the files in sorted order, one at a time, with deterministic
maps, so example i of the dataset is always the same image. Under
tf.distribute, pass the InputContext (`strategy.distribute_datasets_from_function`)
and each pipeline reads its share of the files (or records) and batches
`batch_size / num_replicas`.

Bad data fails fast and names its file: matched files that hold no record
at all are rejected when the dataset is created (training would otherwise
wait forever for a first batch), and a shard that cannot be read to its end
(corrupt record, truncated file) stops iteration with an error naming the
shard when the reader reaches it.
"""

import concurrent.futures
from typing import Any, List, Optional, Sequence, Union

import tensorflow as tf

from deeplab_kmax import cli_errors
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import sample_generator as sample_generator_lib
from deeplab_kmax.data import tfrecord_codec

CYCLE_LENGTH = 32
SHUFFLE_BUFFER_SIZE = 1000
# Bytes a TFRecord adds around each record: length, length CRC, data CRC.
RECORD_OVERHEAD_BYTES = 8 + 4 + 4
CORRUPT_SHARD_MESSAGE = 'is corrupt or truncated'
_STAT_THREADS = 32


class EmptyDatasetError(ValueError, cli_errors.ExpectedError):
  """The file pattern matches only files that hold no record.

  Command-line tools print it alone, without a traceback (`cli_errors`).
  """


def _patterns(file_pattern: Union[str, Sequence[str]]) -> List[str]:
  return [file_pattern] if isinstance(file_pattern, str) else list(
      file_pattern)


def list_files(file_pattern: Union[str, Sequence[str]]) -> List[str]:
  """Sorted files matching any of the patterns; none matching is an error."""
  patterns = _patterns(file_pattern)
  if not patterns:
    raise ValueError('DatasetOptions.file_pattern is empty.')
  files = sorted({f for pattern in patterns for f in tf.io.gfile.glob(pattern)})
  if not files:
    raise ValueError(f'No TFRecord files match file_pattern {patterns}.')
  return files


def file_sizes(files: Sequence[str]) -> List[int]:
  """Byte sizes, stat'ed in parallel (cheap even for cloud storage)."""
  with concurrent.futures.ThreadPoolExecutor(
      min(_STAT_THREADS, max(1, len(files)))) as pool:
    return list(pool.map(lambda f: tf.io.gfile.stat(f).length, files))


def require_records(files: Sequence[str], sizes: Sequence[int],
                    where: str) -> None:
  """Raises EmptyDatasetError if no file can hold a record (all empty)."""
  if not any(size > 0 for size in sizes):
    shown = ', '.join(files[:3]) + (', ...' if len(files) > 3 else '')
    raise EmptyDatasetError(
        f'{where}: the {len(files)} matched file(s) ({shown}) hold no record; '
        'was the dataset converted from an empty split?')


def checked_records(filename: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
  """The records of one TFRecord file; fails naming it if it is damaged.

  tf.data's reader reports a corrupt record without the file name and
  silently stops at a truncated record header. Here read errors end the
  file's stream instead, and a check after its last record compares the
  bytes read with the file size: a shortfall raises InvalidArgumentError
  naming the file. Costs a few tf.data function calls per record, small
  next to decoding the image.
  """
  records = tf.data.TFRecordDataset(filename).ignore_errors()
  end = tf.data.Dataset.from_tensors((tf.constant(b''), True))
  tagged = tf.data.Dataset.zip(
      (records, tf.data.Dataset.from_tensors(False).repeat())).concatenate(end)

  def count_bytes(consumed, element):
    record, is_end = element

    def check_size():
      message = tf.strings.format(
          'TFRecord file {} ' + CORRUPT_SHARD_MESSAGE + ': its readable '
          'records end after {} of its {} bytes (python '
          'data/check_tfrecords.py FILE tells why).',
          (filename, consumed, size))
      with tf.control_dependencies(
          [tf.debugging.Assert(tf.equal(consumed, size), [message])]):
        return tf.identity(consumed)

    def add_record():
      return consumed + tf.cast(tf.strings.length(record), tf.int64) + (
          RECORD_OVERHEAD_BYTES)

    return tf.cond(is_end, check_size, add_record), element

  return (tagged.scan(tf.constant(0, tf.int64), count_bytes)
          .filter(lambda record, is_end: tf.logical_not(is_end))
          .map(lambda record, is_end: record))


def _decoded_examples(files: List[str], sizes: List[int], decoder,
                      is_training: bool,
                      input_context: Optional[tf.distribute.InputContext],
                      cycle_length: int, shuffle_buffer_size: int,
                      max_num_examples: int, seed: Optional[int]):
  dataset = tf.data.Dataset.from_tensor_slices(
      (files, tf.constant(sizes, tf.int64)))
  shard_records = False
  if input_context and input_context.num_input_pipelines > 1:
    pipelines = input_context.num_input_pipelines
    if len(files) >= pipelines:
      pipeline = input_context.input_pipeline_id
      require_records(files[pipeline::pipelines], sizes[pipeline::pipelines],
                      f'input pipeline {pipeline} of {pipelines}')
      dataset = dataset.shard(pipelines, pipeline)
    else:  # Too few files: every pipeline reads all and keeps its records.
      shard_records = True
  if is_training:
    dataset = dataset.shuffle(len(files), seed=seed,
                              reshuffle_each_iteration=True).repeat()
  dataset = dataset.interleave(
      checked_records,
      cycle_length=min(cycle_length, len(files)) if is_training else 1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=not is_training)
  if shard_records:
    dataset = dataset.shard(input_context.num_input_pipelines,
                            input_context.input_pipeline_id)
  if is_training:
    dataset = dataset.shuffle(shuffle_buffer_size, seed=seed)
  if max_num_examples > 0:
    dataset = dataset.take(count=max_num_examples)
  return dataset.map(decoder, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=not is_training)


def create_dataset(
    dataset_options: Any,
    is_training: bool,
    input_context: Optional[tf.distribute.InputContext] = None,
    *,
    dataset_info: Optional[dataset_info_lib.DatasetInfo] = None,
    only_semantic_annotations: bool = False,
    center_targets: bool = False,
    max_num_examples: int = -1,
    cycle_length: int = CYCLE_LENGTH,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
    seed: Optional[int] = None,
) -> tf.data.Dataset:
  """Builds the dataset described by a DatasetOptions message.

  Args:
    dataset_options: DatasetOptions (DeepLab2 field names: dataset,
      file_pattern, batch_size, crop_size, min/max_resize_value,
      resize_factor, augmentations, thing_id_mask_annotations, ...).
    is_training: Random augmentation, shuffling and endless repetition when
      True; deterministic, single pass, order-preserving otherwise.
    input_context: From tf.distribute; selects this pipeline's shard and the
      per-replica batch size.
    dataset_info: Descriptor override; by default resolved from the options
      (`get_dataset_info`).
    only_semantic_annotations: Skip instance targets.
    center_targets: Also compute Panoptic-DeepLab's centre heatmap and
      offsets (and their loss weights), making samples equal DeepLab2's key
      for key. kMaX-DeepLab does not use them, so they are off by default.
    max_num_examples: If positive, read at most this many records.
    cycle_length: Files read concurrently in training.
    shuffle_buffer_size: Record-level shuffle buffer in training.
    seed: Seeds the file and record shuffles (augmentation stays random).

  Returns:
    A dataset of dicts keyed as in `sample_generator` with a leading batch
    dimension.
  """
  info = dataset_info or dataset_info_lib.get_dataset_info(dataset_options)
  files = list_files(dataset_options.file_pattern)
  sizes = file_sizes(files)
  require_records(files, sizes,
                  f'file_pattern {_patterns(dataset_options.file_pattern)}')
  batch_size = int(dataset_options.batch_size)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(batch_size)

  decoder = tfrecord_codec.ExampleDecoder(
      dataset_options.decode_groundtruth_label)
  generator = sample_generator_lib.generator_from_options(
      dataset_options, info, is_training,
      center_targets=center_targets,
      only_semantic_annotations=only_semantic_annotations)

  def examples(stream_seed):
    return _decoded_examples(files, sizes, decoder, is_training, input_context,
                             cycle_length, shuffle_buffer_size,
                             max_num_examples, stream_seed)

  if generator.uses_copy_paste:
    # The partner stream must be shuffled differently from the main one.
    partner_seed = None if seed is None else seed + 1
    dataset = tf.data.Dataset.zip((examples(seed), examples(partner_seed)))
    dataset = dataset.map(generator, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=not is_training)
  else:
    dataset = examples(seed).map(generator,
                                 num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=not is_training)
  dataset = dataset.batch(batch_size, drop_remainder=is_training)
  options = tf.data.Options()
  options.deterministic = not is_training
  dataset = dataset.with_options(options)
  return dataset.prefetch(tf.data.AUTOTUNE)

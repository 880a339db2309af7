"""Encoding and decoding of DeepLab2-format examples."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.data import tfrecord_codec


def _reference_records(reference_dir):
  path = str(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord')
  return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def test_label_bytes_are_little_endian_int32():
  label = np.array([[0, 1], [256 * 3 + 2, 2**31 - 1]])
  data = tfrecord_codec.encode_panoptic_label(label)
  assert data == np.array(label, '<i4').tobytes()
  assert data[:8] == b'\x00\x00\x00\x00\x01\x00\x00\x00'
  np.testing.assert_array_equal(
      tfrecord_codec.decode_panoptic_label(data, 2, 2), label)


def test_label_encoding_rejects_bad_input():
  with pytest.raises(ValueError, match='height, width'):
    tfrecord_codec.encode_panoptic_label(np.zeros((2, 2, 1)))
  with pytest.raises(ValueError, match='int32'):
    tfrecord_codec.encode_panoptic_label(np.array([[2**31]]))
  with pytest.raises(ValueError, match='needs 16'):
    tfrecord_codec.decode_panoptic_label(b'\x00' * 12, 2, 2)


def test_make_example_round_trip_through_the_decoder():
  image = tf.io.encode_png(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(
      2, 3, 3)).numpy()
  label = np.arange(6, dtype=np.int32).reshape(2, 3) * 257
  example = tfrecord_codec.make_example(
      image, 'png', 'stem', 2, 3, tfrecord_codec.encode_panoptic_label(label))
  values = tfrecord_codec.example_to_numpy(example.SerializeToString())
  assert values[tfrecord_codec.KEY_IMAGE_FILENAME] == b'stem'
  assert values[tfrecord_codec.KEY_IMAGE_FORMAT] == b'png'
  assert values[tfrecord_codec.KEY_IMAGE_CHANNELS] == 3
  assert values[tfrecord_codec.KEY_LABEL_FORMAT] == b'raw'
  np.testing.assert_array_equal(values['panoptic_label'], label)

  decoded = tfrecord_codec.ExampleDecoder()(
      tf.constant(example.SerializeToString()))
  assert decoded['image'].dtype == tf.uint8
  np.testing.assert_array_equal(decoded['label'][..., 0], label)
  assert (int(decoded['height']), int(decoded['width'])) == (2, 3)


def test_make_example_checks_its_arguments():
  with pytest.raises(ValueError, match='jpeg'):
    tfrecord_codec.make_example(b'', 'bmp', 'x', 1, 1)
  with pytest.raises(ValueError, match='expected 8'):
    tfrecord_codec.make_example(b'', 'png', 'x', 1, 2, b'\x00' * 4)


def test_decoder_reads_deeplab2_records(reference_dir):
  expected = np.load(reference_dir / 'tfrecord' / 'decoded_records.npz')
  decoder = tfrecord_codec.ExampleDecoder()
  records = _reference_records(reference_dir)
  assert len(records) == 3
  for i, record in enumerate(records):
    decoded = decoder(tf.constant(record))
    np.testing.assert_array_equal(decoded['image'].numpy(),
                                  expected[f'record{i}/image_decoded_uint8'])
    np.testing.assert_array_equal(decoded['label'].numpy()[..., 0],
                                  expected[f'record{i}/panoptic_label_int32'])
    assert decoded['image_name'].numpy() == f'{i + 1:012d}'.encode()


def test_decoder_without_labels(reference_dir):
  record = _reference_records(reference_dir)[0]
  decoded = tfrecord_codec.ExampleDecoder(decode_groundtruth_label=False)(
      tf.constant(record))
  assert decoded['label'] is None
  assert decoded['image'].shape == (48, 64, 3)


def test_shard_ranges_match_deeplab2_split():
  # ceil(10 / 4) = 3 per shard; the last shard gets the remainder.
  assert tfrecord_codec.shard_ranges(10, 4) == ((0, 3), (3, 6), (6, 9),
                                                (9, 10))
  assert tfrecord_codec.shard_ranges(2, 3) == ((0, 1), (1, 2), (2, 2))
  assert (tfrecord_codec.shard_filename('train', 3, 1000) ==
          'train-00003-of-01000.tfrecord')
  with pytest.raises(ValueError):
    tfrecord_codec.shard_ranges(1, 0)

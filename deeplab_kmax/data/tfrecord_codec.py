"""DeepLab2's TFRecord example format: feature keys, encoding and decoding.

One `tf.train.Example` per image:

  image/encoded                     bytes   the image file, unchanged
  image/filename                    bytes   file stem, e.g. b'000000000139'
  image/format                      bytes   b'jpeg' or b'png'
  image/height, image/width         int64
  image/channels                    int64   always 3
  image/segmentation/class/encoded  bytes   panoptic label, raw little-endian
                                            int32, H*W values
  image/segmentation/class/format   bytes   b'raw'

Records written here are byte-identical to DeepLab2's, so datasets converted
by either code base can be read by both.
"""

from typing import Any, Dict, Optional

import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.data.label_format import decode_panoptic_label
from deeplab_kmax.data.label_format import encode_panoptic_label  # pylint: disable=unused-import
# Shard naming lives with the rest of the shard-file rules.
from deeplab_kmax.data.shard_files import shard_filename  # pylint: disable=unused-import
from deeplab_kmax.data.shard_files import shard_ranges  # pylint: disable=unused-import

KEY_ENCODED_IMAGE = 'image/encoded'
KEY_IMAGE_FILENAME = 'image/filename'
KEY_IMAGE_FORMAT = 'image/format'
KEY_IMAGE_HEIGHT = 'image/height'
KEY_IMAGE_WIDTH = 'image/width'
KEY_IMAGE_CHANNELS = 'image/channels'
KEY_ENCODED_LABEL = 'image/segmentation/class/encoded'
KEY_LABEL_FORMAT = 'image/segmentation/class/format'

RAW_LABEL_FORMAT = 'raw'
IMAGE_FORMATS = ('jpeg', 'png')
_LABEL_ITEMSIZE = 4  # int32


def _bytes_feature(value) -> tf.train.Feature:
  if isinstance(value, str):
    value = value.encode('utf-8')
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(image_data: bytes, image_format: str, filename: str,
                 height: int, width: int,
                 label_data: Optional[bytes] = None,
                 label_format: str = RAW_LABEL_FORMAT) -> tf.train.Example:
  """Builds the Example; features are inserted in DeepLab2's order."""
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f'Image format must be one of {IMAGE_FORMATS}, got '
                     f'{image_format!r}.')
  features = {
      KEY_ENCODED_IMAGE: _bytes_feature(image_data),
      KEY_IMAGE_FILENAME: _bytes_feature(filename),
      KEY_IMAGE_FORMAT: _bytes_feature(image_format),
      KEY_IMAGE_HEIGHT: _int_feature(height),
      KEY_IMAGE_WIDTH: _int_feature(width),
      KEY_IMAGE_CHANNELS: _int_feature(3),
  }
  if label_data is not None:
    if label_format != RAW_LABEL_FORMAT:
      raise ValueError(f'Only {RAW_LABEL_FORMAT!r} panoptic labels are '
                       f'supported, got {label_format!r}.')
    expected = height * width * _LABEL_ITEMSIZE
    if len(label_data) != expected:
      raise ValueError(f'{filename}: raw label has {len(label_data)} bytes, '
                       f'expected {expected} for {height}x{width}.')
    features[KEY_ENCODED_LABEL] = _bytes_feature(label_data)
    features[KEY_LABEL_FORMAT] = _bytes_feature(label_format)
  return tf.train.Example(features=tf.train.Features(feature=features))


def example_to_numpy(serialized: bytes) -> Dict[str, Any]:
  """Every feature of a serialized Example as Python values (for tests/tools).

  Returns {key: bytes or int}; the raw label is additionally decoded under
  'panoptic_label' ([H, W] int32) when present.
  """
  example = tf.train.Example.FromString(serialized)
  values: Dict[str, Any] = {}
  for key, feature in example.features.feature.items():
    kind = feature.WhichOneof('kind')
    items = list(getattr(feature, kind).value)
    if len(items) != 1:
      raise ValueError(f'Feature {key} has {len(items)} values, expected 1.')
    values[key] = items[0]
  if KEY_ENCODED_LABEL in values:
    values['panoptic_label'] = decode_panoptic_label(
        values[KEY_ENCODED_LABEL], values[KEY_IMAGE_HEIGHT],
        values[KEY_IMAGE_WIDTH])
  return values


class ExampleDecoder:
  """Parses a serialized Example into image / label tensors (graph-safe).

  Output (see `keys`): `image` uint8 [H, W, 3], `image_name` string,
  `height` and `width` int32, `label` int32 [H, W, 1] or None.
  """

  def __init__(self, decode_groundtruth_label: bool = True):
    self._decode_label = decode_groundtruth_label
    text = tf.io.FixedLenFeature((), tf.string)
    number = tf.io.FixedLenFeature((), tf.int64)
    self._spec = {
        KEY_ENCODED_IMAGE: text,
        KEY_IMAGE_FILENAME: text,
        KEY_IMAGE_FORMAT: text,
        KEY_IMAGE_HEIGHT: number,
        KEY_IMAGE_WIDTH: number,
        KEY_IMAGE_CHANNELS: number,
    }
    if decode_groundtruth_label:
      self._spec[KEY_ENCODED_LABEL] = text

  def __call__(self, serialized: tf.Tensor) -> Dict[str, Optional[tf.Tensor]]:
    parsed = tf.io.parse_single_example(serialized, self._spec)
    image = tf.io.decode_image(parsed[KEY_ENCODED_IMAGE], channels=3,
                               dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    height = tf.cast(parsed[KEY_IMAGE_HEIGHT], tf.int32)
    width = tf.cast(parsed[KEY_IMAGE_WIDTH], tf.int32)
    label = None
    if self._decode_label:
      flat = tf.io.decode_raw(parsed[KEY_ENCODED_LABEL], tf.int32,
                              little_endian=True)
      label = tf.reshape(flat, tf.stack([height, width, 1]))
    return {keys.IMAGE: image, keys.IMAGE_NAME: parsed[KEY_IMAGE_FILENAME],
            keys.EXAMPLE_HEIGHT: height, keys.EXAMPLE_WIDTH: width,
            keys.EXAMPLE_LABEL: label}

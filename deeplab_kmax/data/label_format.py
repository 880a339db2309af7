"""How DeepLab2 stores a panoptic label in a TFRecord: raw little-endian int32.

Each pixel holds `semantic_id * panoptic_label_divisor + instance_id`; the
[H, W] map is written row-major as H*W little-endian int32 values (TFRecord
format 'raw'). Kept free of TensorFlow so converter worker processes can use
it.
"""

import numpy as np

_LABEL_DTYPE = np.dtype('<i4')


def encode_panoptic_label(label: np.ndarray) -> bytes:
  """[H, W] integer panoptic label -> raw little-endian int32 bytes."""
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f'Expected a [height, width] panoptic label, got shape '
                     f'{label.shape}.')
  info = np.iinfo(np.int32)
  if label.size and (label.min() < info.min or label.max() > info.max):
    raise ValueError('Panoptic label values do not fit in int32.')
  return label.astype(_LABEL_DTYPE).tobytes()


def decode_panoptic_label(data: bytes, height: int, width: int) -> np.ndarray:
  """Inverse of `encode_panoptic_label`."""
  expected = height * width * _LABEL_DTYPE.itemsize
  if len(data) != expected:
    raise ValueError(f'Raw panoptic label has {len(data)} bytes; a {height}x'
                     f'{width} int32 label needs {expected}.')
  return np.frombuffer(data, _LABEL_DTYPE).reshape(height, width).astype(
      np.int32)

"""Resize / scale / crop / pad / flip keep image and label aligned."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.data import preprocessing

_VOID = -1
_BLOCK = 8


def _block_scene(height=64, width=80):
  """Blocks of constant label, each with its own (non-mean) colour."""
  rows, cols = height // _BLOCK, width // _BLOCK
  block_label = np.arange(rows * cols).reshape(rows, cols)
  label = np.kron(block_label, np.ones((_BLOCK, _BLOCK), np.int64))
  palette = np.random.default_rng(0).integers(0, 100, (rows * cols, 3))
  palette[:, 0] = np.arange(rows * cols) * 2  # Unique, never 127.5.
  image = palette[label].astype(np.float32)
  return image, label[..., None].astype(np.int32), palette


def _interior(label):
  """Pixels whose 3x3 neighbourhood has one label (crop border excluded)."""
  padded = np.pad(label, 1, constant_values=-999)
  same = np.ones(label.shape, bool)
  for dy in range(3):
    for dx in range(3):
      same &= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
  return same


def test_range_resize_shapes():
  def shape(h, w, low, high, factor=0):
    return tuple(preprocessing.range_resize_shape(
        h, w, preprocessing.resize_spec(low), preprocessing.resize_spec(high),
        factor).numpy())
  assert shape(48, 64, [129], [129]) == (96, 129)  # DeepLab2's golden size.
  assert shape(64, 40, [129], [129]) == (129, 80)
  assert shape(100, 50, [], [80]) == (80, 40)
  assert shape(10, 20, [], [80]) == (10, 20)  # Never enlarged by max.
  assert shape(10, 20, [40], []) == (40, 80)
  assert shape(30, 40, [96], [200], factor=8) == (97, 129)
  # float32 floor, as in DeepLab2: 30 * float32(100 / 30) -> 99, then 8k+1.
  assert shape(30, 40, [100], [200], factor=8) == (105, 137)
  assert preprocessing.resize_spec([0]) is None
  assert preprocessing.resize_spec([]) is None
  assert preprocessing.resize_spec([5, 7]) == (5, 7)


def test_eval_resizes_then_pads_bottom_right():
  image, label, _ = _block_scene(48, 64)
  resized, out, out_label = preprocessing.preprocess(
      tf.constant(image), tf.constant(label), crop_size=(129, 129),
      is_training=False, label_pad_value=_VOID, min_resize_value=[129],
      max_resize_value=[129])
  assert resized.shape == (96, 129, 3) and out.shape == (129, 129, 3)
  out, out_label = out.numpy(), out_label.numpy()[..., 0]
  assert (out[96:] == 127.5).all() and (out_label[96:] == _VOID).all()
  assert (out_label[:96] != _VOID).all()
  # Padding happens in mean-subtracted space: equal up to float rounding.
  np.testing.assert_allclose(out[:96], resized.numpy(), atol=1e-4)
  again = preprocessing.preprocess(
      tf.constant(image), tf.constant(label), crop_size=(129, 129),
      is_training=False, label_pad_value=_VOID, min_resize_value=[129],
      max_resize_value=[129])
  # Deterministic: a second run agrees to float32 rounding (pixels <= 255).
  np.testing.assert_allclose(again[1].numpy(), out, rtol=1e-6, atol=1e-6 * 255)


def test_eval_rejects_max_resize_beyond_crop():
  image, label, _ = _block_scene()
  with pytest.raises(ValueError, match='exceeds the crop'):
    preprocessing.preprocess(tf.constant(image), tf.constant(label),
                             crop_size=(65, 65), is_training=False,
                             label_pad_value=0, max_resize_value=[129])


def test_training_augmentation_keeps_image_and_label_aligned():
  image, label, palette = _block_scene()
  seen_padding = seen_upscale = False
  for seed in range(12):
    tf.random.set_seed(seed)
    _, out, out_label = preprocessing.preprocess(
        tf.constant(image), tf.constant(label), crop_size=(65, 65),
        is_training=True, label_pad_value=_VOID, min_scale_factor=0.5,
        max_scale_factor=2.0, scale_factor_step_size=0.25)
    out, out_label = out.numpy(), out_label.numpy()[..., 0]
    assert out.shape == (65, 65, 3)
    void = out_label == _VOID
    # Void only where the image is padding, and all padding is void.
    np.testing.assert_array_equal(void, (out == 127.5).all(-1))
    inner = _interior(out_label) & ~void
    np.testing.assert_allclose(out[inner], palette[out_label[inner]],
                               atol=1e-3)
    seen_padding |= void.any()
    seen_upscale |= np.bincount(out_label[~void]).max() > 2 * _BLOCK ** 2
  assert seen_padding and seen_upscale


def test_flip_moves_image_and_label_together():
  image, label, _ = _block_scene()
  flipped = set()
  for seed in range(8):
    tf.random.set_seed(seed)
    out, out_label = preprocessing.random_flip_left_right(
        [tf.constant(image), tf.constant(label)])
    is_flipped = bool((out.numpy() == image[:, ::-1]).all())
    assert is_flipped == bool((out_label.numpy() == label[:, ::-1]).all())
    flipped.add(is_flipped)
  assert flipped == {True, False}


def test_random_scale_grid():
  tf.random.set_seed(0)
  draws = {round(float(preprocessing.random_scale(0.5, 1.5, 0.25)), 4)
           for _ in range(40)}
  assert draws == {0.5, 0.75, 1.0, 1.25, 1.5}
  assert preprocessing.random_scale(1.0, 1.0, 0.25) == 1.0
  with pytest.raises(ValueError):
    preprocessing.random_scale(2.0, 1.0, 0.1)

"""Panoptic copy-paste: which segments move, and that they move aligned."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.data import copy_paste
from deeplab_kmax.data import dataset_info

_INFO = dataset_info.from_json_dict({
    'name': 'toy', 'classes': [{'name': 'ball', 'isthing': True},
                               {'name': 'cup', 'isthing': True},
                               {'name': 'sky'}, {'name': 'grass'}]})
_DIV = 256
_PAD = 1  # void * divisor + 1


def _scene():
  canvas = np.full((12, 16), 3 * _DIV)  # sky
  canvas[6:, :] = 4 * _DIV              # grass
  canvas[2:5, 2:5] = 1 * _DIV + 1       # ball 1
  canvas[7:10, 8:12] = 2 * _DIV + 1     # cup 1
  paste = np.full((12, 16), 4 * _DIV)   # grass
  paste[0:4, :] = 3 * _DIV              # sky
  paste[5:8, 1:4] = 1 * _DIV + 1        # ball 1
  paste[5:8, 10:14] = 1 * _DIV + 2      # ball 2
  paste[9:11, 5:7] = 2 * _DIV           # cup crowd (instance 0)
  paste[11, :] = 0                      # void row
  paste[:, 15] = _PAD                   # padding column
  return canvas, paste


def _run(canvas, paste, **options):
  image = np.zeros((12, 16, 3), np.float32)
  paste_image = np.broadcast_to(
      (paste % 1000).astype(np.float32)[..., None], (12, 16, 3)).copy()
  out_image, out_label = copy_paste.panoptic_copy_paste(
      tf.constant(image), tf.constant(canvas[..., None], tf.int32),
      tf.constant(paste_image), tf.constant(paste[..., None], tf.int32),
      _INFO, _PAD, **options)
  return out_image.numpy(), out_label.numpy()[..., 0], paste_image


@pytest.mark.parametrize('seed', range(6))
def test_options_decide_what_is_pasted(seed):
  tf.random.set_seed(seed)
  canvas, paste = _scene()
  image, label, paste_image = _run(canvas, paste, thing_option='all',
                                   stuff_option='none', void_option='none')
  pasted = (image != 0).any(-1)
  thing = (paste // _DIV == 1) | (paste // _DIV == 2)
  np.testing.assert_array_equal(pasted, thing)  # All things, nothing else.
  np.testing.assert_array_equal(image[pasted], paste_image[pasted])
  np.testing.assert_array_equal(label[~pasted], canvas[~pasted])
  # Pasted instance ids count down from divisor - 1; crowd keeps 0.
  assert set(np.unique(label[pasted])) == {
      1 * _DIV + 254, 1 * _DIV + 253, 2 * _DIV}


def test_random_option_and_padding():
  canvas, paste = _scene()
  fractions = []
  for seed in range(20):
    tf.random.set_seed(seed)
    image, label, _ = _run(canvas, paste, thing_option='random',
                           stuff_option='random', void_option='all')
    pasted = (image != 0).any(-1)
    assert not pasted[:, 15].any()              # Padding never moves.
    assert (label[11, :15] == 0).all()          # Void 'all': always pasted.
    fractions.append(pasted.mean())
  assert len(set(fractions)) > 3  # Random subsets differ from draw to draw.


def test_too_many_instances_is_an_error():
  canvas, paste = _scene()
  paste[0, 0] = 1 * _DIV + 200
  with pytest.raises(tf.errors.InvalidArgumentError, match='label_divisor'):
    _run(canvas, paste)


def test_bad_option():
  canvas, paste = _scene()
  with pytest.raises(ValueError, match='random'):
    _run(canvas, paste, thing_option='some')

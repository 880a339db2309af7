"""Training targets, and the evaluation sample against DeepLab2's golden."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax.data import dataset_info
from deeplab_kmax.data import input_pipeline
from deeplab_kmax.data import sample_generator as sg

_INFO = dataset_info.from_json_dict({
    'name': 'toy', 'classes': [{'name': 'ball', 'isthing': True},
                               {'name': 'cup', 'isthing': True},
                               {'name': 'sky'}]})
_DIV = 256


def _label():
  label = np.full((10, 12), 3 * _DIV)   # sky
  label[0, :] = 0                       # void
  label[2:4, 6:9] = 2 * _DIV + 5        # cup 5 appears first in raster order
  label[3:8, 1:4] = 1 * _DIV + 1        # ball 1 (15 px)
  label[8:10, 8:12] = 1 * _DIV          # crowd ball (instance 0)
  label[6, 10] = 1 * _DIV + 2           # one-pixel ball 2
  return label


def test_targets_of_a_handmade_label():
  label = _label()
  generator = sg.PanopticSampleGenerator(
      _INFO, is_training=False, crop_size=(10, 12),
      thing_id_mask_annotations=True, max_thing_id=4,
      small_instance_threshold=10, small_instance_weight=3.0)
  sample = generator({
      'image': tf.zeros([10, 12, 3], tf.uint8), 'image_name': tf.constant('x'),
      'height': tf.constant(10), 'width': tf.constant(12),
      'label': tf.constant(label[..., None], tf.int32)})
  get = lambda key: sample[key].numpy()
  np.testing.assert_array_equal(get(keys.GT_SEMANTIC), label // _DIV)
  np.testing.assert_array_equal(get(keys.GT_PANOPTIC), label)
  crowd = np.zeros(label.shape, bool)
  crowd[8:10, 8:12] = True
  np.testing.assert_array_equal(get(keys.GT_IS_CROWD), crowd)
  # Thing ids in raster order of first appearance: cup, ball 1, ball 2.
  expected_ids = np.full(label.shape, -1)
  expected_ids[label == 2 * _DIV + 5] = 0
  expected_ids[label == 1 * _DIV + 1] = 1
  expected_ids[label == 1 * _DIV + 2] = 2
  np.testing.assert_array_equal(get(keys.GT_THING_ID_MASK), expected_ids)
  np.testing.assert_array_equal(get(keys.GT_THING_ID_CLASS), [2, 1, 1, -1])
  # Small instances (6 px cup, 1 px ball) get the larger weight.
  weight = np.ones(label.shape)
  weight[(label == 2 * _DIV + 5) | (label == 1 * _DIV + 2)] = 3.0
  np.testing.assert_array_equal(get(keys.SEMANTIC_LOSS_WEIGHT), weight)
  np.testing.assert_array_equal(get(keys.CENTER_LOSS_WEIGHT),
                                (label // _DIV != 0) & ~crowd)
  np.testing.assert_array_equal(get(keys.REGRESSION_LOSS_WEIGHT),
                                np.isin(label // _DIV, [1, 2]) & ~crowd)
  # Offsets point at the rounded mean of each instance; heatmap peaks there.
  offsets = get(keys.GT_INSTANCE_REGRESSION)
  heat = get(keys.GT_INSTANCE_CENTER)
  ys, xs = np.nonzero(label == 1 * _DIV + 1)
  cy, cx = int(round(ys.mean())), int(round(xs.mean()))
  np.testing.assert_array_equal(offsets[ys, xs, 0], cy - ys)
  np.testing.assert_array_equal(offsets[ys, xs, 1], cx - xs)
  assert heat[cy, cx] == 1.0 and heat[6, 10] == 1.0
  assert np.isclose(heat[cy, cx + 3], np.exp(-9 / 128))
  assert (offsets[label // _DIV == 3] == 0).all()
  # Evaluation extras.
  np.testing.assert_array_equal(get(keys.GT_SIZE_RAW), [10, 12])
  np.testing.assert_array_equal(get(keys.GT_IS_CROWD_RAW), crowd)


def test_too_many_things_for_max_thing_id():
  generator = sg.PanopticSampleGenerator(
      _INFO, is_training=False, crop_size=(10, 12),
      thing_id_mask_annotations=True, max_thing_id=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match='max_thing_id'):
    generator({'image': tf.zeros([10, 12, 3]), 'image_name': tf.constant('x'),
               'height': tf.constant(10), 'width': tf.constant(12),
               'label': tf.constant(_label()[..., None], tf.int32)})


def test_eval_sample_equals_deeplab2_golden(reference_dir):
  """Example 0 of the official eval pipeline, coco r50 config at crop 129."""
  config = config_lib.load_config(
      reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  options = config.eval_dataset_options
  del options.crop_size[:], options.min_resize_value[:]
  del options.max_resize_value[:], options.file_pattern[:]
  options.crop_size.extend([129, 129])
  options.min_resize_value.append(129)
  options.max_resize_value.append(129)
  options.file_pattern.append(
      str(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord'))
  sample = next(iter(input_pipeline.create_dataset(
      options, is_training=False, center_targets=True)))
  golden = np.load(reference_dir / 'golden' / 'sample_eval_example0.npz')
  assert set(sample) == set(golden.files)
  for key in golden.files:
    ours = sample[key].numpy()
    if key == 'image_name':  # Strings: object array here, fixed-width there.
      assert ours.tolist() == golden[key].tolist()
      continue
    assert ours.dtype == golden[key].dtype, key
    if ours.dtype.kind == 'f':
      # Computed floats (resized image, Gaussian centre heatmap, weights):
      # float32 rounding may depend on the CPU; 1e-6 of the largest value is
      # a few ulps (bilinear weights in [0, 1], values up to 255).
      np.testing.assert_allclose(ours, golden[key], rtol=1e-6,
                                 atol=1e-6 * np.abs(golden[key]).max(),
                                 err_msg=key)
    else:  # Labels, ids, flags and sizes: exact.
      np.testing.assert_array_equal(ours, golden[key], err_msg=key)

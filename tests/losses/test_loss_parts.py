"""Building blocks of the kMaX losses: reduction, sampling, mask targets."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.data import label_space
from deeplab_kmax.losses import kmax_loss
from deeplab_kmax.losses import mask_targets
from deeplab_kmax.losses import reduction
from deeplab_kmax.losses import sampling
from tests.losses import synthetic_case


@pytest.mark.parametrize('top_k_percent', [1.0, 0.3])
def test_average_nonzero_loss(top_k_percent):
  loss = np.random.default_rng(0).uniform(size=[3, 4, 5]).astype(np.float32)
  loss[0, :2] = 0.0  # Zero (e.g. void) entries do not count.
  loss[2] = 0.0  # An example without any loss gives 0, not NaN.
  got = reduction.average_nonzero_loss(tf.constant(loss), top_k_percent)
  expected = []
  for example in loss.reshape(3, -1):
    kept = np.sort(example)[::-1][:int(round(top_k_percent * example.size))]
    kept = kept[kept != 0]
    expected.append(kept.mean() if kept.size else 0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  with pytest.raises(ValueError, match='top_k_percent'):
    reduction.average_nonzero_loss(tf.constant(loss), 1.5)


def test_strided_downsample():
  labels = tf.reshape(tf.range(2 * 9 * 9), [2, 9, 9])
  np.testing.assert_array_equal(sampling.strided_downsample(labels, [3, 3]),
                                labels.numpy()[:, ::4, ::4])
  assert sampling.strided_downsample(labels, [9, 9]) is labels
  with pytest.raises(ValueError, match='s \\* k \\+ 1'):
    sampling.strided_downsample(labels, [4, 4])


def test_gumbel_top_k_draws_distinct_indices_and_skips_excluded():
  logits = tf.constant([[0.0] * 8 + [-99999.0] * 8] * 4)
  index = sampling.gumbel_top_k(logits, 8).numpy()
  for row in index:
    assert sorted(row) == list(range(8))


def test_stuff_class_ids():
  # COCO: void 0 and 133 classes; Cityscapes: 19 classes and ignore 255.
  assert label_space.LabelSpace(134, 0, 256, range(1, 81)).stuff_class_ids == (
      tuple(range(81, 134)))
  assert label_space.LabelSpace(
      19, 255, 1000, range(11, 19)).stuff_class_ids == tuple(range(11))


def test_mask_targets_layout():
  case = synthetic_case.make_case(seed=0, batch=1)
  targets = mask_targets.build_mask_targets(
      case.y_true['semantic_gt'], case.y_true['thing_id_mask_gt'],
      case.y_true['thing_id_class_gt'], [9, 9], synthetic_case.LABEL_SPACE)
  assert synthetic_case.LABEL_SPACE.stuff_class_ids == tuple(
      synthetic_case.STUFF_IDS)
  sem = case.y_true['semantic_gt'][0, ::4, ::4].ravel()
  tid = case.y_true['thing_id_mask_gt'][0, ::4, ::4].ravel()
  assert targets.pixel_masks.shape == [1, 81, 16 + 4]
  expected_id = np.where(tid >= 0, tid, -1)
  for k, stuff in enumerate(synthetic_case.STUFF_IDS):
    expected_id[sem == stuff] = 16 + k
  np.testing.assert_array_equal(targets.pixel_mask_id[0], expected_id)
  area = np.bincount(expected_id[expected_id >= 0], minlength=20)
  np.testing.assert_array_equal(targets.mask_area[0], area)
  classes = np.concatenate([case.y_true['thing_id_class_gt'][0],
                            synthetic_case.STUFF_IDS])
  np.testing.assert_array_equal(targets.mask_class[0],
                                np.where(area > 0, classes, -1))
  order = synthetic_case.THING_IDS + synthetic_case.STUFF_IDS
  np.testing.assert_array_equal(
      targets.mask_class_index[0],
      [order.index(c) if c >= 0 else -1 for c in targets.mask_class[0]])
  np.testing.assert_allclose(
      targets.pixel_inverse_area[0],
      81 / np.maximum(np.where(expected_id >= 0, area[expected_id], 0), 1))


def test_loss_with_dynamic_batch_size():
  case = synthetic_case.make_case(seed=6)
  loss = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                            instance_discrimination_sample_k=81)
  spec = tf.nest.map_structure(
      lambda a: tf.TensorSpec([None] + list(a.shape[1:]), a.dtype),
      (case.y_true, case.y_pred))
  dynamic = tf.function(loss.__call__, input_signature=spec)
  got = dynamic(case.y_true, case.y_pred)
  eager = loss(*tf.nest.map_structure(tf.constant,
                                      (case.y_true, case.y_pred)))
  for term, value in eager.items():
    np.testing.assert_allclose(got[term], value, rtol=1e-5, err_msg=term)

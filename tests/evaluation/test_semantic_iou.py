"""Tests for the streaming semantic mIoU accumulator."""

import numpy as np
import pytest
import tf_keras

from deeplab_kmax.evaluation import semantic_iou


def _naive_miou(pairs, num_classes, ignore_label):
  ious = []
  for c in range(num_classes):
    intersection = union = 0
    for gt, pred in pairs:
      valid = gt != ignore_label
      intersection += np.sum(valid & (gt == c) & (pred == c))
      union += np.sum(valid & ((gt == c) | (pred == c)))
    if union:
      ious.append(intersection / union)
  return np.mean(ious)


def _random_pairs(seed, num_classes=19, ignore_label=255, count=3):
  rng = np.random.default_rng(seed)
  pairs = []
  for _ in range(count):
    gt = rng.integers(0, num_classes - 3, size=(20, 30))  # some classes absent
    gt[rng.random(gt.shape) < 0.1] = ignore_label
    pred = np.where(rng.random(gt.shape) < 0.6, gt,
                    rng.integers(0, num_classes, size=gt.shape))
    pred[pred == ignore_label] = 0
    pairs.append((gt, pred))
  return pairs


def test_matches_naive_and_keras_mean_iou():
  pairs = _random_pairs(0)
  metric = semantic_iou.SemanticIoU(num_classes=19, ignore_label=255)
  # DeepLab2's evaluator: Keras MeanIoU with ignore pixels given weight 0.
  keras_metric = tf_keras.metrics.MeanIoU(num_classes=19)
  for gt, pred in pairs:
    metric.update(gt, pred)
    keras_metric.update_state(np.where(gt == 255, 0, gt), pred,
                              np.where(gt == 255, 0.0, 1.0))
  result = metric.result()
  assert result.mean_iou == pytest.approx(_naive_miou(pairs, 19, 255),
                                          rel=1e-12)
  assert result.mean_iou == pytest.approx(float(keras_metric.result()),
                                          rel=1e-5)
  assert result.to_flat_dict()['mIoU'] == result.mean_iou
  valid = np.concatenate([gt.ravel() != 255 for gt, _ in pairs])
  correct = np.concatenate([(gt == pred).ravel() for gt, pred in pairs])
  assert result.pixel_accuracy == pytest.approx(correct[valid].mean())


def test_out_of_range_prediction_is_a_miss_without_false_positive():
  metric = semantic_iou.SemanticIoU(num_classes=3, ignore_label=255)
  gt = np.array([[0, 0, 1, 1]])
  pred = np.array([[0, 255, 1, 1]])
  metric.update(gt, pred)
  result = metric.result()
  np.testing.assert_allclose(result.iou, [0.5, 1.0, 0.0])
  assert result.mean_iou == pytest.approx(0.75)  # class 2 is absent
  assert '75.00' in result.per_class_table(['a', 'b', 'c'])


def test_ignore_pixels_are_skipped_and_bad_labels_raise():
  metric = semantic_iou.SemanticIoU(num_classes=2, ignore_label=0)
  metric.update(np.array([0, 1, 1]), np.array([1, 1, 1]))
  assert metric.result().mean_iou == 1.0  # class 0 is void (COCO-style)
  with pytest.raises(ValueError, match='outside'):
    metric.update(np.array([3]), np.array([1]))
  with pytest.raises(ValueError, match='same shape'):
    metric.update(np.zeros((2, 2)), np.zeros(4))
  metric.reset()
  assert metric.result().confusion.sum() == 0

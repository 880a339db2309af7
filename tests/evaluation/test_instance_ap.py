"""Instance AP of panoptic thing segments against hand-computed COCO AP."""

import numpy as np
import pytest

from deeplab_kmax.evaluation import instance_ap

_DIV = 256
# COCO's 101 recall thresholds: AP is the mean interpolated precision there.
_RECALL_POINTS = 101


def _metric(**kwargs):
  return instance_ap.InstanceAveragePrecision(
      thing_class_ids=[1, 2], panoptic_label_divisor=_DIV,
      class_names={1: 'ball', 2: 'cup'}, **kwargs)


def _scene():
  """Ground truth: two balls, one cup, sky (stuff 3), a void strip."""
  gt = np.full((40, 40), 3 * _DIV)
  gt[0, :] = 0
  gt[5:15, 5:15] = 1 * _DIV + 1
  gt[20:30, 5:15] = 1 * _DIV + 2
  gt[5:15, 25:35] = 2 * _DIV + 1
  return gt


def _scores(pred, per_segment):
  """Class-confidence map with a given score per panoptic id."""
  scores = np.zeros(pred.shape, np.float32)
  for panoptic_id, score in per_segment.items():
    scores[pred == panoptic_id] = score
  return scores


def test_perfect_prediction_scores_one():
  gt = _scene()
  metric = _metric()
  metric.update({'panoptic_gt': gt, 'panoptic_pred': gt})
  result = metric.result()
  assert result['AP'] == pytest.approx(1.0)
  assert result['AP50'] == pytest.approx(1.0)
  assert result['AR100'] == pytest.approx(1.0)
  assert metric.report() == {'AP_per_class': {'ball': pytest.approx(1.0),
                                              'cup': pytest.approx(1.0)}}


@pytest.mark.parametrize('false_positive_score,expected_ap', [
    # Ranked after the true positive: precision 1 up to recall 1/2.
    (0.5, 51 / _RECALL_POINTS),
    # Ranked first: the best precision reachable at recall <= 1/2 is 1/2.
    (0.95, 0.5 * 51 / _RECALL_POINTS),
])
def test_ranking_by_score_matches_coco_interpolation(false_positive_score,
                                                     expected_ap):
  gt = np.full((40, 40), 3 * _DIV)
  gt[5:15, 5:15] = 1 * _DIV + 1
  gt[20:30, 5:15] = 1 * _DIV + 2
  pred = np.full((40, 40), 3 * _DIV)
  pred[5:15, 5:15] = 1 * _DIV + 1  # Finds ball 1 exactly; misses ball 2.
  pred[20:30, 25:35] = 1 * _DIV + 2  # A ball where there is none.
  metric = instance_ap.InstanceAveragePrecision([1], _DIV, detailed=False)
  metric.update({
      'panoptic_gt': gt, 'panoptic_pred': pred,
      'semantic_scores': _scores(pred, {_DIV + 1: 0.9,
                                        _DIV + 2: false_positive_score}),
      # Mask probabilities multiply in; uniform here, so ranking unchanged.
      'instance_scores': np.full(pred.shape, 0.8, np.float32)})
  result = metric.result()
  assert set(result) == {'AP', 'AP50', 'AP75'}
  assert result['AP'] == pytest.approx(expected_ap)
  assert result['AP50'] == pytest.approx(expected_ap)


def test_mask_probability_breaks_ties_between_equal_class_scores():
  gt = np.full((40, 40), 3 * _DIV)
  gt[5:15, 5:15] = 1 * _DIV + 1
  pred = np.full((40, 40), 3 * _DIV)
  pred[5:15, 5:15] = 1 * _DIV + 1
  pred[20:30, 25:35] = 1 * _DIV + 2
  probability = np.full(pred.shape, 0.9, np.float32)
  probability[pred == _DIV + 2] = 0.6  # The false positive is less sure.
  metric = instance_ap.InstanceAveragePrecision([1], _DIV)
  metric.update({'panoptic_gt': gt, 'panoptic_pred': pred,
                 'semantic_scores': np.full(pred.shape, 0.9, np.float32),
                 'instance_scores': probability})
  assert metric.result()['AP'] == pytest.approx(1.0)


def test_iou_thresholds_and_crowd():
  gt = np.full((40, 40), 3 * _DIV)
  gt[0:20, 0:20] = 1 * _DIV + 1  # 400 px
  gt[30:40, 30:40] = 1 * _DIV  # Crowd balls (instance 0).
  pred = np.full((40, 40), 3 * _DIV)
  pred[0:20, 0:14] = 1 * _DIV + 1  # IoU 280 / 400 = 0.7.
  pred[30:40, 30:40] = 1 * _DIV + 2  # On the crowd: neither TP nor FP.
  metric = instance_ap.InstanceAveragePrecision([1], _DIV)
  metric.update({'panoptic_gt': gt, 'panoptic_pred': pred})
  result = metric.result()
  # Matched at IoU thresholds .50 .. .70 (5 of 10), each with AP 1.
  assert result['AP50'] == pytest.approx(1.0)
  assert result['AP75'] == pytest.approx(0.0)
  assert result['AP'] == pytest.approx(0.5)


def test_streams_over_images_and_resets():
  gt = _scene()
  metric = _metric()
  metric.update({'panoptic_gt': gt, 'panoptic_pred': gt})
  empty = np.full(gt.shape, 3 * _DIV)
  metric.update({'panoptic_gt': gt, 'panoptic_pred': empty})
  # Half of the instances found, at full precision: AP = 51 / 101 per class.
  assert metric.result()['AP'] == pytest.approx(51 / _RECALL_POINTS)
  metric.reset()
  metric.update({'panoptic_gt': gt, 'panoptic_pred': empty})
  assert metric.result()['AP'] == 0.0  # Ground truth, no detections.
  metric.reset()
  metric.update({'panoptic_gt': np.full(gt.shape, 3 * _DIV),
                 'panoptic_pred': gt})
  assert metric.result() == {}  # No thing in the ground truth: nothing to rate.


def test_bad_inputs():
  with pytest.raises(ValueError, match='thing class'):
    instance_ap.InstanceAveragePrecision([], _DIV)
  metric = _metric()
  with pytest.raises(ValueError, match='differ in size'):
    metric.update({'panoptic_gt': np.zeros((4, 4)),
                   'panoptic_pred': np.zeros((4, 5))})

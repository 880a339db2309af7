"""Tests for the streaming panoptic-quality accumulator."""

import collections

import numpy as np
import pytest
from PIL import Image

from deeplab_kmax.evaluation import panoptic_quality

# Colours of the class PNGs (web colour names), as DeepLab2's test decodes them.
_CLASS_COLORS = {
    (0, 0, 0): 0,
    (0, 0, 255): 1,  # person
    (255, 0, 0): 2,  # bear
    (0, 255, 0): 3,  # tree
    (255, 0, 255): 4,  # bird
    (0, 255, 255): 5,  # sky
    (255, 255, 0): 6,  # cat
}
# Ground-truth instance value -> class, per image, from DeepLab2's test.
_GT_INSTANCE_CLASSES = {
    'bird': {92: 5, 176: 3, 255: 4},
    'cat': {0: 0, 255: 6},
    'team': {0: 0, 47: 1, 97: 1, 133: 1, 150: 1, 174: 1, 198: 2, 215: 1,
             244: 1, 255: 1},
}
_GT_FILES = {'bird': 'bird_gt.png', 'cat': 'cat_gt.png',
             'team': 'team_gt_instance.png'}


def _read(path, mode):
  with Image.open(path) as image:
    return np.array(image.convert(mode)).astype(np.int64)


def _load_image_pair(testdata, name, label_divisor):
  """(gt, pred) panoptic maps = class * label_divisor + instance value."""
  gt_instance = _read(testdata / _GT_FILES[name], 'L')
  classes = _GT_INSTANCE_CLASSES[name]
  assert set(np.unique(gt_instance)) == set(classes)
  gt_class = np.vectorize(classes.get)(gt_instance)

  rgb = _read(testdata / f'{name}_pred_class.png', 'RGB')
  pred_class = np.full(rgb.shape[:2], -1, np.int64)
  for color, c in _CLASS_COLORS.items():
    pred_class[np.all(rgb == color, axis=-1)] = c
  assert np.all(pred_class >= 0)
  pred_instance = _read(testdata / f'{name}_pred_instance.png', 'L')
  return (gt_class * label_divisor + gt_instance,
          pred_class * label_divisor + pred_instance)


# ---------------------------------------------------------------------------
# A naive implementation of the COCO panoptic definition: explicit loops over
# segment pairs with boolean masks.
# ---------------------------------------------------------------------------


def _naive_statistics(images, num_classes, ignore_label, label_divisor):
  stats = collections.defaultdict(lambda: np.zeros(4))  # iou, tp, fn, fp
  void = ignore_label * label_divisor
  for gt, pred, crowd in images:
    crowd = np.zeros(gt.shape, bool) if crowd is None else crowd
    crowd_ids = set(np.unique(gt[crowd]).tolist())
    matched_gt, matched_pred = set(), set()
    for g in np.unique(gt).tolist():
      if g // label_divisor == ignore_label or g in crowd_ids:
        continue
      for p in np.unique(pred).tolist():
        if p // label_divisor != g // label_divisor:
          continue
        intersection = np.sum((gt == g) & (pred == p))
        if intersection == 0:
          continue
        union = (np.sum(gt == g) + np.sum(pred == p) - intersection -
                 np.sum((gt == void) & (pred == p)))
        if intersection / union > 0.5:
          stats[g // label_divisor] += [intersection / union, 1, 0, 0]
          matched_gt.add(g)
          matched_pred.add(p)
    for g in np.unique(gt).tolist():
      if (g not in matched_gt and g not in crowd_ids and
          g // label_divisor != ignore_label):
        stats[g // label_divisor] += [0, 0, 1, 0]
    for p in np.unique(pred).tolist():
      if p in matched_pred or p // label_divisor == ignore_label:
        continue
      segment = pred == p
      same_class_crowd = crowd & (gt // label_divisor == p // label_divisor)
      ignored = np.sum(segment & ((gt == void) | same_class_crowd))
      if ignored / np.sum(segment) <= 0.5:
        stats[p // label_divisor] += [0, 0, 0, 1]
  table = np.zeros((4, num_classes))
  for c, values in stats.items():
    table[:, c] = values
  return table


def _naive_summary(table, class_ids):
  pq, sq, rq = [], [], []
  for c in class_ids:
    iou, tp, fn, fp = table[:, c]
    if tp + fn + fp == 0:
      continue
    sq.append(iou / tp if tp else 0.0)
    rq.append(tp / (tp + 0.5 * fn + 0.5 * fp))
    pq.append(sq[-1] * rq[-1])
  return np.mean(pq), np.mean(sq), np.mean(rq)


def _assert_same_statistics(result, table):
  np.testing.assert_allclose(result.iou_sum, table[0], rtol=1e-12)
  np.testing.assert_array_equal(result.tp, table[1])
  np.testing.assert_array_equal(result.fn, table[2])
  np.testing.assert_array_equal(result.fp, table[3])


# ---------------------------------------------------------------------------
# DeepLab2's test images and the numbers its own test asserts.
# ---------------------------------------------------------------------------


def _assert_deeplab2_numbers(summary, pq, sq, rq, tp, fn, fp):
  """The values DeepLab2's own test asserts: PQ/SQ/RQ to 1e-6, the mean
  TP/FN/FP counts to float rounding."""
  assert [summary['PQ'], summary['SQ'], summary['RQ']] == pytest.approx(
      [pq, sq, rq], abs=1e-6)
  assert [summary['TP'], summary['FN'], summary['FP']] == pytest.approx(
      [tp, fn, fp])


def test_team_image_matches_deeplab2_and_naive(reference_dir):
  testdata = reference_dir / 'deeplab2_testdata'
  gt, pred = _load_image_pair(testdata, 'team', 1000)
  metric = panoptic_quality.PanopticQuality(
      num_classes=3, ignore_label=0, label_divisor=1000, offset=256 * 256)
  metric.update(gt, pred)
  result = metric.result()
  # DeepLab2 evaluation/panoptic_quality_test.py, single image.
  _assert_deeplab2_numbers(result.summary(), 0.62156284, 0.64664984,
                           0.9666667, tp=4.0, fn=0.5, fp=0.0)
  _assert_same_statistics(result, _naive_statistics([(gt, pred, None)], 3, 0,
                                                    1000))


def test_three_images_match_deeplab2_and_naive(reference_dir):
  testdata = reference_dir / 'deeplab2_testdata'
  pairs = [_load_image_pair(testdata, name, 256)
           for name in ('bird', 'cat', 'team')]
  metric = panoptic_quality.PanopticQuality(
      num_classes=7, ignore_label=0, label_divisor=256,
      thing_class_ids=(1, 2, 4, 6), offset=256 * 256)
  for gt, pred in pairs:
    metric.update(gt, pred)
  result = metric.result()
  flat = result.to_flat_dict()
  # DeepLab2 evaluation/panoptic_quality_test.py, multiple images.
  _assert_deeplab2_numbers(flat, 0.76855499, 0.7769174, 0.98888892, tp=2.0,
                           fn=1 / 6, fp=0.0)

  table = _naive_statistics([(gt, pred, None) for gt, pred in pairs], 7, 0,
                            256)
  _assert_same_statistics(result, table)
  for subset, ids in (('all', range(1, 7)), ('thing', (1, 2, 4, 6)),
                      ('stuff', (3, 5))):
    expected = _naive_summary(table, ids)
    got = result.summary(subset)
    np.testing.assert_allclose([got['PQ'], got['SQ'], got['RQ']], expected,
                               rtol=1e-12, err_msg=subset)
  assert flat['PQ_thing'] == result.summary('thing')['PQ']
  assert flat['num_classes'] == 6 and flat['num_classes_stuff'] == 2


def test_non_contiguous_ignore_label_matches_deeplab2():
  """The 3x3 example of DeepLab2's test: ignore label 9, crowd-like ids."""
  gt = (np.array([[0, 9, 9], [1, 2, 2], [1, 9, 9]]) * 256 +
        np.array([[0, 2, 2], [1, 0, 0], [1, 0, 0]]))
  pred = (np.array([[0, 0, 9], [1, 1, 1], [1, 9, 9]]) * 256 +
          np.array([[0, 0, 0], [0, 1, 1], [0, 1, 1]]))
  metric = panoptic_quality.PanopticQuality(num_classes=3, ignore_label=9,
                                            label_divisor=256,
                                            offset=256 * 256)
  metric.update(gt, pred)
  summary = metric.result().summary()
  expected = {'PQ': 2 / 9, 'SQ': 1 / 3, 'RQ': 2 / 9, 'TP': 1 / 3,
              'FN': 2 / 3, 'FP': 2 / 3}
  for key, value in expected.items():
    assert summary[key] == pytest.approx(value), key


# ---------------------------------------------------------------------------
# Random maps with void and crowd against the naive implementation.
# ---------------------------------------------------------------------------


def _random_pair(rng, shape=(24, 32), num_classes=6, ignore_label=255,
                 label_divisor=1000):
  """Blocky ground truth; prediction = perturbed, relabelled ground truth."""
  def blocks(num):
    out = np.zeros(shape, np.int64)
    for k in range(num):
      r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
      h, w = rng.integers(2, 12, size=2)
      cls = rng.integers(0, num_classes)
      out[r:r + h, c:c + w] = cls * label_divisor + (k + 1 if cls < 3 else 0)
    return out
  gt = blocks(8)
  void = np.zeros(shape, bool)
  r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
  void[r:r + rng.integers(2, 8), c:c + rng.integers(2, 10)] = True
  gt[void] = ignore_label * label_divisor
  crowd = np.zeros(shape, bool)
  crowd_segment = rng.choice(np.unique(gt[~void]))
  crowd[gt == crowd_segment] = True

  pred = gt.copy()
  noise = rng.random(shape) < 0.15
  pred[noise] = blocks(8)[noise]
  pred = np.where(rng.random(shape) < 0.3, blocks(6), pred)
  # Predicted void, and a prediction that mostly covers the void region.
  pred[rng.random(shape) < 0.05] = ignore_label * label_divisor
  pred[void & (rng.random(shape) < 0.8)] = 2 * label_divisor + 99
  return gt, pred, crowd


@pytest.mark.parametrize('use_crowd', [False, True])
def test_random_maps_match_naive(use_crowd):
  rng = np.random.default_rng(123)
  images = []
  metric = panoptic_quality.PanopticQuality(
      num_classes=6, ignore_label=255, label_divisor=1000,
      thing_class_ids=(0, 1, 2))
  for _ in range(8):
    gt, pred, crowd = _random_pair(rng)
    crowd = crowd if use_crowd else None
    images.append((gt, pred, crowd))
    metric.update(gt, pred, crowd)
  table = _naive_statistics(images, 6, 255, 1000)
  result = metric.result()
  _assert_same_statistics(result, table)
  assert table[1].sum() >= 5 and table[2].sum() >= 5 and table[3].sum() >= 5
  expected = _naive_summary(table, range(6))
  got = result.summary()
  np.testing.assert_allclose([got['PQ'], got['SQ'], got['RQ']], expected,
                             rtol=1e-12)


def test_crowd_excuses_misses_and_mostly_crowd_predictions():
  divisor = 1000
  gt = np.zeros((4, 8), np.int64)
  gt[:, :4] = 11 * divisor + 1  # a car instance
  gt[:, 4:] = 11 * divisor  # a crowd of cars
  crowd = np.zeros_like(gt, bool)
  crowd[:, 4:] = True
  pred = np.full_like(gt, 11 * divisor + 2)  # matches the instance
  pred[:, 4:6] = 11 * divisor + 5  # two cars splitting the crowd in halves
  pred[:, 6:] = 11 * divisor + 6
  pred[0, 5] = 11 * divisor + 7  # a 1-pixel car on the crowd

  without = panoptic_quality.PanopticQuality(19, 255, divisor, range(11, 19))
  without.update(gt, pred)
  stats = without.result()
  # The crowd is an ordinary segment here: the three car predictions on it
  # stay at or below 0.5 IoU, so 1 TP, 1 FN (the crowd) and 3 FP.
  assert (stats.tp[11], stats.fn[11], stats.fp[11]) == (1, 1, 3)

  with_crowd = panoptic_quality.PanopticQuality(19, 255, divisor,
                                                range(11, 19))
  with_crowd.update(gt, pred, crowd)
  stats = with_crowd.result()
  assert (stats.tp[11], stats.fn[11], stats.fp[11]) == (1, 0, 0)
  assert stats.summary()['PQ'] == 1.0


def test_batched_update_equals_per_image_updates():
  rng = np.random.default_rng(0)
  pairs = [_random_pair(rng) for _ in range(3)]
  batched = panoptic_quality.PanopticQuality(6, 255, 1000)
  batched.update(np.stack([p[0] for p in pairs]),
                 np.stack([p[1] for p in pairs]))
  single = panoptic_quality.PanopticQuality(6, 255, 1000)
  for gt, pred, _ in pairs:
    single.update(gt, pred)
  assert batched.result().to_flat_dict() == single.result().to_flat_dict()
  single.reset()
  assert single.result().summary()['num_classes'] == 0


def test_per_class_table_lists_valid_classes():
  rng = np.random.default_rng(1)
  gt, pred, _ = _random_pair(rng)
  metric = panoptic_quality.PanopticQuality(6, 255, 1000, (0, 1, 2))
  metric.update(gt, pred)
  result = metric.result()
  per_class = result.per_class()
  assert set(per_class) == set(np.flatnonzero(result.valid))
  names = [f'class{c}' for c in range(6)]
  text = result.per_class_table(names)
  for c, row in per_class.items():
    assert f'class{c}' in text
    assert row['is_thing'] == (c < 3)
  assert text.splitlines()[-3].split()[0] == 'all'


def test_bad_inputs_raise():
  metric = panoptic_quality.PanopticQuality(3, 0, 256)
  with pytest.raises(ValueError, match='outside'):
    metric.update(np.full((2, 2), 5 * 256), np.zeros((2, 2)))
  with pytest.raises(ValueError, match='same shape'):
    metric.update(np.zeros((2, 2)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match='offset'):
    panoptic_quality.PanopticQuality(3, 0, 256, offset=100).update(
        np.zeros((2, 2)), np.full((2, 2), 2 * 256))
  with pytest.raises(ValueError, match='subset'):
    metric.result().summary('things')

"""The official-PQ option equals the official panoptic script, number for number.

Each case is COCO panoptic ground truth (PNG + segments_info, crowd and void
included) and predictions. The official script (cityscapesscripts'
evalPanopticSemanticLabeling, which is panopticapi's pq_compute) scores the
files: ground truth as written, predictions as `RawPredictionWriter` writes
them with raw_panoptic_format "coco_panoptic". `OfficialPanopticQuality`
scores the label maps our converter makes of the same ground truth (crowd
kept, `treat_crowd_as_ignore=False`) against the prediction maps.
"""

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.data import panoptic_conversion
from deeplab_kmax.evaluation import official_panoptic_quality
from deeplab_kmax.evaluation import panoptic_quality
from deeplab_kmax.evaluation import prediction_writer

official_script = pytest.importorskip(
    'cityscapesscripts.evaluation.evalPanopticSemanticLabeling',
    reason='the official panoptic script comes with cityscapesscripts '
    '(pip install -e ".[test]")')

_INFO = demo_dataset.dataset_info()
_DIV = _INFO.panoptic_label_divisor
_VOID = _INFO.ignore_label * _DIV
_TO_SOURCE = _INFO.contiguous_to_source()
_SOURCE = {_INFO.class_names[c]: s for c, s in _TO_SOURCE.items()}
_CLASS = {name: c for c, name in _INFO.class_names.items()}
_TOLERANCE = 1e-6

# One ground-truth image: (COCO segment-id map, segments_info).
GroundTruth = Tuple[np.ndarray, List[Dict]]


def _segment(segment_ids: np.ndarray, segment_id: int, name: str,
             crowd: bool = False) -> Dict:
  return {'id': segment_id, 'category_id': _SOURCE[name],
          'iscrowd': int(crowd), 'area': int((segment_ids == segment_id).sum())}


def _stem(index: int) -> str:
  return f'{index + 1:012d}'


def _write_ground_truth(folder, images: Sequence[GroundTruth]):
  """COCO panoptic GT files; returns (json path, png folder)."""
  png_folder = os.path.join(folder, 'gt')
  os.makedirs(png_folder)
  annotations = []
  for index, (segment_ids, segments) in enumerate(images):
    Image.fromarray(coco_panoptic.encode_segment_ids(segment_ids)).save(
        os.path.join(png_folder, _stem(index) + '.png'))
    annotations.append({'image_id': index + 1,
                        'file_name': _stem(index) + '.png',
                        'segments_info': segments})
  json_path = os.path.join(folder, 'gt.json')
  with open(json_path, 'w') as f:
    json.dump({'annotations': annotations,
               'categories': coco_panoptic.categories(_INFO)}, f)
  return json_path, png_folder


def _write_predictions(folder, predictions: Sequence[np.ndarray]):
  """Predictions as the evaluator writes them; returns (json, png folder)."""
  out = os.path.join(folder, 'raw_predictions')
  writer = prediction_writer.RawPredictionWriter(
      out, _INFO, raw_panoptic_format='coco_panoptic')
  writer.reset()
  for index, panoptic in enumerate(predictions):
    writer.update({'panoptic_pred': panoptic,
                   'image_name': np.array(_stem(index).encode(), object)})
  writer.result()
  return (os.path.join(out, coco_panoptic.PREDICTIONS_FILE),
          os.path.join(out, 'panoptic'))


def _score_with_official_script(gt_json, gt_folder, pred_json, pred_folder):
  """The script's own per-image code and averaging, in this process.

  (`evaluatePanoptic` is these two calls around a multiprocessing pool.)
  """
  with open(gt_json) as f:
    gt = json.load(f)
  with open(pred_json) as f:
    pred = {a['image_id']: a for a in json.load(f)['annotations']}
  categories = {c['id']: c for c in gt['categories']}
  pairs = [(a, pred[a['image_id']]) for a in gt['annotations']]
  stat = official_script.pq_compute_single_core(0, pairs, gt_folder,
                                                pred_folder, categories)
  return stat, official_script.average_pq(stat, categories)


def _our_labels(images: Sequence[GroundTruth], crowd_as_ignore: bool):
  spec = panoptic_conversion.LabelSpec.from_dataset_info(
      _INFO, treat_crowd_as_ignore=crowd_as_ignore)
  return [panoptic_conversion.build_panoptic_label(ids, segments, spec,
                                                   where='test image')
          for ids, segments in images]


def _assert_equal_to_official(tmp_path, images: Sequence[GroundTruth],
                              predictions: Sequence[np.ndarray]):
  """Scores both ways; returns our result for further checks."""
  gt_json, gt_folder = _write_ground_truth(str(tmp_path), images)
  pred_json, pred_folder = _write_predictions(str(tmp_path), predictions)
  stat, official = _score_with_official_script(gt_json, gt_folder, pred_json,
                                               pred_folder)
  metric = official_panoptic_quality.OfficialPanopticQuality(
      _INFO.num_classes, _INFO.ignore_label, _DIV, _INFO.thing_class_ids)
  for gt, pred in zip(_our_labels(images, crowd_as_ignore=False),
                      predictions):
    metric.update(gt, pred)
  ours = metric.result()
  for c, source in _TO_SOURCE.items():
    counts = stat[source]
    assert (ours.tp[c], ours.fp[c], ours.fn[c]) == (
        counts.tp, counts.fp, counts.fn), _INFO.class_names[c]
    assert ours.iou_sum[c] == pytest.approx(counts.iou, abs=_TOLERANCE)
    expected = official['per_class'][source]
    for key in ('pq', 'sq', 'rq'):
      actual = getattr(ours, key)[c]
      assert actual == pytest.approx(expected[key], abs=_TOLERANCE), (
          _INFO.class_names[c], key)
  for subset, name in (('all', 'All'), ('thing', 'Things'),
                       ('stuff', 'Stuff')):
    summary = ours.summary(subset)
    assert summary['num_classes'] == official[name]['n']
    for key in ('PQ', 'SQ', 'RQ'):
      assert summary[key] == pytest.approx(official[name][key.lower()],
                                           abs=_TOLERANCE), (subset, key)
  return ours, official


# --- Hand-made cases: crowd, void, unmatched predictions over both. ----------


def _crowd_and_void_case() -> Tuple[GroundTruth, np.ndarray]:
  """A 20x20 scene exercising each official rule once.

  Ground truth: grass everywhere, sky on top, a crowd of discs (rows 10-19,
  cols 0-7), one disc (rows 2-7, cols 10-15), one square (rows 12-17, cols
  12-17), void (unlabelled) in rows 0-1, cols 14-19.
  """
  ids = np.full((20, 20), 1, np.int64)              # grass
  ids[:2, :] = 2                                    # sky
  ids[0:2, 14:20] = 0                               # void
  ids[10:20, 0:8] = 3                               # crowd of discs
  ids[2:8, 10:16] = 4                               # disc
  ids[12:18, 12:18] = 5                             # square
  segments = [_segment(ids, 1, 'grass'), _segment(ids, 2, 'sky'),
              _segment(ids, 3, 'disc', crowd=True), _segment(ids, 4, 'disc'),
              _segment(ids, 5, 'square')]
  c = _CLASS
  pred = np.full((20, 20), c['grass'] * _DIV, np.int64)
  pred[:2, :14] = c['sky'] * _DIV
  # Sky spilling onto void: the void part leaves the union (still a TP).
  pred[0:2, 14:17] = c['sky'] * _DIV
  # A disc mostly on void (excused) ...
  pred[0:2, 17:20] = c['disc'] * _DIV + 9
  # ... discs on the crowd: one fully (excused), one half on grass (FP).
  pred[12:16, 1:5] = c['disc'] * _DIV + 1
  pred[17:20, 5:11] = c['disc'] * _DIV + 2
  # A square on the disc crowd: crowd of another class excuses nothing.
  pred[10:12, 0:4] = c['square'] * _DIV + 3
  # The disc matched, its prediction reaching into grass.
  pred[2:9, 10:16] = c['disc'] * _DIV + 4
  # The square predicted as a triangle: FN square, FP triangle.
  pred[12:18, 12:18] = c['triangle'] * _DIV + 1
  return (ids, segments), pred


def _crowd_in_the_union_case() -> Tuple[GroundTruth, np.ndarray]:
  """A disc prediction covering its 16-pixel instance and a crowd of discs.

  Officially the 16 crowd pixels stay in the union; with DeepLab2's records
  (crowd turned to void) they leave it, which decides whether it matches.
  """
  ids = np.full((8, 8), 1, np.int64)                # grass
  ids[0:4, 0:4] = 2                                 # disc, 16 pixels
  ids[0:4, 4:8] = 3                                 # crowd of discs
  segments = [_segment(ids, 1, 'grass'), _segment(ids, 2, 'disc'),
              _segment(ids, 3, 'disc', crowd=True)]
  pred = np.full((8, 8), _CLASS['grass'] * _DIV, np.int64)
  pred[0:4, 0:8] = _CLASS['disc'] * _DIV + 1        # 32 pixels
  return (ids, segments), pred


def test_hand_made_crowd_and_void_rules(tmp_path):
  (gt, pred) = _crowd_and_void_case()
  ours, official = _assert_equal_to_official(tmp_path, [gt], [pred])
  disc, square, triangle = (_CLASS[n] for n in ('disc', 'square', 'triangle'))
  # disc: 1 TP; the half-on-crowd disc is the only FP (on-void and on-crowd
  # ones are excused); the crowd itself is no FN.
  assert (ours.tp[disc], ours.fp[disc], ours.fn[disc]) == (1, 1, 0)
  assert (ours.tp[square], ours.fp[square], ours.fn[square]) == (0, 1, 1)
  assert (ours.tp[triangle], ours.fp[triangle]) == (0, 1)
  assert official['All']['n'] == 5


def test_crowd_stays_in_the_union_unlike_deeplab2(tmp_path):
  (gt, pred) = _crowd_in_the_union_case()
  ours, _ = _assert_equal_to_official(tmp_path, [gt], [pred])
  disc = _CLASS['disc']
  # Officially IoU = 16 / 32 = 0.5, not a match: 1 FN, and the prediction is
  # exactly half on crowd, not more, so 1 FP.
  assert (ours.tp[disc], ours.fn[disc], ours.fp[disc]) == (0, 1, 1)
  # DeepLab2's definition on DeepLab2's records (crowd converted to void):
  # IoU = 16 / (32 - 16) = 1, a perfect match.
  default = panoptic_quality.PanopticQuality(
      _INFO.num_classes, _INFO.ignore_label, _DIV, _INFO.thing_class_ids)
  (crowd_as_void,) = _our_labels([gt], crowd_as_ignore=True)
  default.update(crowd_as_void, pred)
  stats = default.result()
  assert (stats.tp[disc], stats.fn[disc], stats.fp[disc]) == (1, 0, 0)
  assert stats.sq[disc] == 1.0


def test_on_crowd_as_void_records_official_equals_default():
  # The documented limit: once crowd is void, nothing tells them apart.
  (gt, pred) = _crowd_and_void_case()
  (label,) = _our_labels([gt], crowd_as_ignore=True)
  official = official_panoptic_quality.OfficialPanopticQuality(
      _INFO.num_classes, _INFO.ignore_label, _DIV, _INFO.thing_class_ids)
  default = panoptic_quality.PanopticQuality(
      _INFO.num_classes, _INFO.ignore_label, _DIV, _INFO.thing_class_ids)
  official.update(label, pred)
  default.update(label, pred)
  assert official.num_crowd_pixels == 0
  assert official.result().to_flat_dict() == default.result().to_flat_dict()


# --- A demo-like split: rendered scenes, predictions perturbed from GT. ------


def _perturb(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A plausible prediction: shifted boundaries, misses, confusions, extras."""
  things = np.asarray(_INFO.thing_class_ids)
  shift = tuple(int(s) for s in rng.integers(-2, 3, 2))
  pred = np.roll(gt, shift, axis=(0, 1))
  next_instance = 100
  for panoptic_id in np.unique(gt).tolist():
    semantic, instance = divmod(panoptic_id, _DIV)
    mask = pred == panoptic_id
    if semantic == _INFO.ignore_label or not mask.any():
      continue
    is_thing = semantic in things
    if is_thing and instance == 0:  # A crowd: predicted as instances.
      rows = np.flatnonzero(mask.any(axis=1))
      split = rows[len(rows) // 2]
      pred[mask] = semantic * _DIV + next_instance
      pred[mask & (np.arange(gt.shape[0])[:, None] >= split)] += 1
      next_instance += 2
      continue
    draw = rng.random()
    if draw < 0.15:  # Missed.
      pred[mask] = _VOID
    elif draw < 0.3:  # Wrong class of the same kind.
      pool = things if is_thing else np.setdiff1d(
          list(_TO_SOURCE), np.concatenate([things, [semantic]]))
      pool = pool[pool != semantic]
      pred[mask] = int(rng.choice(pool)) * _DIV + (next_instance if is_thing
                                                   else 0)
      next_instance += 1
    elif draw < 0.4 and is_thing:  # Split in two.
      cols = np.flatnonzero(mask.any(axis=0))
      half = mask & (np.arange(gt.shape[1])[None, :] >= cols[len(cols) // 2])
      pred[half] = semantic * _DIV + next_instance
      next_instance += 1
  # Spurious things, often on void or crowd where they may be excused.
  excusable = np.argwhere((gt == _VOID) | ((gt % _DIV == 0) &
                                           np.isin(gt // _DIV, things)))
  for _ in range(int(rng.integers(1, 4))):
    if len(excusable) and rng.random() < 0.7:
      y, x = excusable[rng.integers(len(excusable))]
    else:
      y, x = rng.integers(0, gt.shape[0]), rng.integers(0, gt.shape[1])
    size = int(rng.integers(2, 7))
    pred[y:y + size, x:x + size] = (int(rng.choice(things)) * _DIV +
                                    next_instance)
    next_instance += 1
  return pred


def test_demo_like_split_equals_official_script(tmp_path):
  images, predictions = [], []
  crowd_images = 0
  index = 0
  rng = np.random.default_rng(5)
  # Scenes with a crowd come one in three; take enough of each kind.
  while len(images) < 8:
    rgb_unused, ids, segments = demo_dataset.render_scene((11, 0, index), 80,
                                                          80)
    del rgb_unused
    index += 1
    has_crowd = any(s['iscrowd'] for s in segments)
    if not has_crowd and len(images) - crowd_images >= 4:
      continue
    crowd_images += has_crowd
    images.append((ids, segments))
  for label in _our_labels(images, crowd_as_ignore=False):
    predictions.append(_perturb(label.astype(np.int64), rng))
  assert crowd_images >= 3
  assert any((ids == 0).any() for ids, _ in images)  # Void somewhere.
  ours, official = _assert_equal_to_official(tmp_path, images, predictions)
  # Every kind of outcome occurred, so the equality is not about an easy case.
  assert ours.tp.sum() > 0 and ours.fp.sum() > 0 and ours.fn.sum() > 0
  assert 0.1 < official['All']['pq'] < 0.95


# --- The evaluator reports both definitions. ----------------------------------


def test_evaluator_reports_official_numbers_beside_default(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import kmax_evaluator  # pylint: disable=g-import-not-at-top

  (gt, pred) = _crowd_and_void_case()
  (label,) = _our_labels([gt], crowd_as_ignore=False)

  def model(images, training):
    del images, training
    return {'panoptic_pred': tf.constant(pred[None], tf.int32),
            'semantic_pred': tf.constant(pred[None] // _DIV, tf.int32)}

  dataset = tf.data.Dataset.from_tensors({
      'image': tf.zeros([1, 20, 20, 3]),
      'panoptic_raw': tf.constant(label[None], tf.int32),
      'semantic_raw': tf.constant(label[None] // _DIV, tf.int32)})
  evaluator = kmax_evaluator.KMaXEvaluator(
      model, dataset, _INFO, tf.Variable(7, dtype=tf.int64),
      model_dir=str(tmp_path), use_tf_function=False,
      official_panoptic_quality=True)
  logs = {k: float(v) for k, v in evaluator.evaluate(tf.constant(-1)).items()}

  default = panoptic_quality.PanopticQuality(
      _INFO.num_classes, _INFO.ignore_label, _DIV, _INFO.thing_class_ids)
  default.update(label, pred)
  official = official_panoptic_quality.OfficialPanopticQuality(
      _INFO.num_classes, _INFO.ignore_label, _DIV, _INFO.thing_class_ids)
  official.update(label, pred)
  prefix = official_panoptic_quality.KEY_PREFIX
  for key, value in default.result().to_flat_dict().items():
    assert logs[f'evaluation/pq/{key}'] == pytest.approx(value)
  for key, value in official.result().to_flat_dict().items():
    assert logs[f'evaluation/pq/{prefix}{key}'] == pytest.approx(value)
  # This case scores differently under the two definitions.
  assert logs[f'evaluation/pq/{prefix}PQ'] != logs['evaluation/pq/PQ']
  with open(tmp_path / 'eval_metrics.json') as f:
    report = json.load(f)
  per_class = report[f'{prefix}panoptic_quality_per_class']
  assert per_class['disc']['FP'] == 1 and per_class['disc']['FN'] == 0
  assert report['metrics'][f'evaluation/pq/{prefix}PQ'] == pytest.approx(
      logs[f'evaluation/pq/{prefix}PQ'])


def test_evaluator_leaves_official_numbers_out_by_default(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import kmax_evaluator  # pylint: disable=g-import-not-at-top

  (gt, pred) = _crowd_and_void_case()
  (label,) = _our_labels([gt], crowd_as_ignore=False)
  dataset = tf.data.Dataset.from_tensors({
      'image': tf.zeros([1, 20, 20, 3]),
      'panoptic_raw': tf.constant(label[None], tf.int32)})
  evaluator = kmax_evaluator.KMaXEvaluator(
      lambda images, training: {
          'panoptic_pred': tf.constant(pred[None], tf.int32),
          'semantic_pred': tf.constant(pred[None] // _DIV, tf.int32)},
      dataset, _INFO, tf.Variable(0, dtype=tf.int64),
      model_dir=str(tmp_path), use_tf_function=False)
  logs = evaluator.evaluate(tf.constant(-1))
  assert 'evaluation/pq/PQ' in logs
  assert not [k for k in logs if official_panoptic_quality.KEY_PREFIX in k]

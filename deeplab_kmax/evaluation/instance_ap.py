"""Instance average precision of the thing segments, scored by pycocotools.

kMaX-DeepLab has no separate detection head: its instances are the thing
segments of the (non-overlapping) panoptic prediction. Each one becomes a
COCO "segm" detection, and the ground-truth thing instances of the panoptic
label become COCO annotations, so `pycocotools.cocoeval.COCOeval` computes
the usual AP@[.5:.95], AP50, AP75, AP by area and AR.

Conventions (those of the COCO API and of panoptic labels):

* Ground truth: a thing-class id with instance > 0 is one instance; thing
  pixels with instance 0 are crowd (one iscrowd region per class and image,
  matched without penalty); void and stuff pixels are not instances.
* Predictions: every thing segment of `panoptic_pred` (instance > 0). Its
  score is the class confidence of the mask that produced it times the mean
  mask probability over the segment (Mask2Former's instance score), read
  from the `semantic_scores` and `instance_scores` maps when given; with no
  score maps every detection scores 1.
* Areas are in pixels of the evaluated (raw-size) maps, so COCO's small /
  medium / large split (32^2, 96^2) means what it means for COCO images.

The masks are kept as run-length encodings, so streaming over a dataset
costs little memory; the COCOeval runs once in `result`.
"""

import contextlib
import io
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_lib

from deeplab_kmax import keys

# COCOeval.stats, in order.
STAT_NAMES = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
              'AR1', 'AR10', 'AR100', 'AR_small', 'AR_medium', 'AR_large')


def _encode(mask: np.ndarray) -> Dict[str, Any]:
  return mask_lib.encode(np.asfortranarray(mask.astype(np.uint8)))


def _segments(panoptic: np.ndarray, divisor: int,
              thing_ids: np.ndarray) -> List[tuple]:
  """(class, instance, [H, W] mask) of every thing id in a panoptic map."""
  ids, inverse = np.unique(panoptic.astype(np.int64), return_inverse=True)
  inverse = inverse.reshape(panoptic.shape)
  out = []
  for index, panoptic_id in enumerate(ids.tolist()):
    semantic, instance = divmod(panoptic_id, divisor)
    if semantic in thing_ids:
      out.append((semantic, instance, inverse == index))
  return out


class InstanceAveragePrecision:
  """Streams images; `result()` runs COCOeval (iouType "segm") over them.

  Implements the evaluator's ExtraMetric hook (`name`, `reset`, `update`,
  `result`), plus `report()` with per-class AP for the JSON file.
  """

  name = 'ap'

  def __init__(self,
               thing_class_ids: Sequence[int],
               panoptic_label_divisor: int,
               class_names: Optional[Mapping[int, str]] = None,
               detailed: bool = True,
               max_detections: int = 100):
    """Creates the metric.

    Args:
      thing_class_ids: training ids of the thing classes.
      panoptic_label_divisor: panoptic = semantic * divisor + instance.
      class_names: names for the per-class report.
      detailed: report all twelve COCOeval numbers (else AP, AP50, AP75).
      max_detections: detections per image COCOeval keeps (COCO uses 100).
    """
    if not thing_class_ids:
      raise ValueError('Instance AP needs at least one thing class.')
    self._thing_ids = np.asarray(sorted(set(thing_class_ids)), np.int64)
    self._divisor = int(panoptic_label_divisor)
    self._class_names = dict(class_names or {})
    self._detailed = detailed
    self._max_detections = int(max_detections)
    self._per_class: Dict[str, float] = {}
    self.reset()

  def reset(self) -> None:
    self._images: List[Dict[str, Any]] = []
    self._ground_truth: List[Dict[str, Any]] = []
    self._detections: List[Dict[str, Any]] = []
    self._per_class = {}

  def update(self, example: Mapping[str, np.ndarray]) -> None:
    """Adds one image: [H, W] `panoptic_gt` and `panoptic_pred` (same size),
    optionally [H, W] `semantic_scores` / `instance_scores`."""
    if keys.GT_PANOPTIC not in example:
      return
    gt = np.asarray(example[keys.GT_PANOPTIC])
    pred = np.asarray(example[keys.PANOPTIC_PRED])
    if gt.shape != pred.shape:
      raise ValueError(f'Instance AP: ground truth {gt.shape} and prediction '
                       f'{pred.shape} differ in size.')
    image_id = len(self._images) + 1
    height, width = gt.shape
    self._images.append({'id': image_id, 'height': height, 'width': width})

    for semantic, instance, mask in _segments(gt, self._divisor,
                                              self._thing_ids):
      rle = _encode(mask)
      self._ground_truth.append({
          'id': len(self._ground_truth) + 1,
          'image_id': image_id,
          'category_id': semantic,
          'segmentation': rle,
          'area': float(mask_lib.area(rle)),
          'bbox': mask_lib.toBbox(rle).tolist(),
          'iscrowd': int(instance == 0),
      })

    class_confidence = example.get(keys.SEMANTIC_SCORES)
    mask_probability = example.get(keys.INSTANCE_SCORES)
    for semantic, instance, mask in _segments(pred, self._divisor,
                                              self._thing_ids):
      if instance == 0:
        continue  # Not an instance (a thing class without instance id).
      score = 1.0
      if class_confidence is not None:
        score *= float(np.asarray(class_confidence)[mask].mean())
      if mask_probability is not None:
        score *= float(np.asarray(mask_probability)[mask].mean())
      self._detections.append({
          'image_id': image_id,
          'category_id': semantic,
          'segmentation': _encode(mask),
          'score': score,
      })

  def _evaluate(self) -> Optional[cocoeval.COCOeval]:
    """Runs COCOeval; None when the ground truth has no thing instance."""
    if not any(not a['iscrowd'] for a in self._ground_truth):
      return None
    ground_truth = coco_lib.COCO()
    ground_truth.dataset = {
        'images': self._images,
        'annotations': self._ground_truth,
        'categories': [{'id': int(c)} for c in self._thing_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
      ground_truth.createIndex()
      if self._detections:
        detections = ground_truth.loadRes(self._detections)
      else:  # loadRes cannot take an empty list.
        detections = coco_lib.COCO()
        detections.dataset = {'images': self._images, 'annotations': [],
                              'categories': ground_truth.dataset['categories']}
        detections.createIndex()
    evaluator = cocoeval.COCOeval(ground_truth, detections, iouType='segm')
    evaluator.params.maxDets = [1, 10, self._max_detections]
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    logging.info('Instance AP (COCOeval, segm) over %d images:\n%s',
                 len(self._images), summary.getvalue())
    return evaluator

  def result(self) -> Dict[str, float]:
    """AP / AR as fractions in [0, 1]; {} when there is nothing to score."""
    evaluator = self._evaluate()
    if evaluator is None:
      logging.warning('Instance AP: no ground-truth thing instance; skipped.')
      self._per_class = {}
      return {}
    # precision[iou, recall, class, area "all", maxDets 100]; -1: no data.
    precision = evaluator.eval['precision'][:, :, :, 0, -1]
    self._per_class = {}
    for k, class_id in enumerate(evaluator.params.catIds):
      values = precision[:, :, k]
      values = values[values > -1]
      if values.size:
        name = self._class_names.get(int(class_id), str(class_id))
        self._per_class[name] = float(values.mean())
    names = STAT_NAMES if self._detailed else STAT_NAMES[:3]
    return {name: float(evaluator.stats[i]) for i, name in enumerate(names)}

  def report(self) -> Dict[str, Any]:
    """Per-class AP of the last `result()`, for the JSON report."""
    return {'AP_per_class': dict(self._per_class)}

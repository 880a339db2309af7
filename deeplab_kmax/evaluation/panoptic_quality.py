"""Panoptic quality (Kirillov et al., CVPR 2019), streamed over a dataset.

Maps are encoded as panoptic = semantic * label_divisor + instance; every
distinct id is one segment (it need not be connected). The rules follow the
COCO panoptic API (`pq_compute`) and DeepLab2's evaluator:

* A ground-truth and a predicted segment of the same class match when their
  IoU exceeds 0.5, which makes matches unique. The union leaves out the
  predicted pixels that are void in the ground truth.
* Void is the ground-truth id `ignore_label * label_divisor`. Predicted
  segments of the ignore class are never scored, and ground-truth segments
  of the ignore class (e.g. "crowd" ids ignore*divisor + k) are never missed.
* An unmatched ground-truth segment is a false negative; an unmatched
  prediction is a false positive unless more than half of it lies on void
  (or, when a crowd map is given, on void plus crowd of its own class).
* Per class: SQ = sum of matched IoUs / TP, RQ = TP / (TP + FN/2 + FP/2),
  PQ = SQ * RQ. Dataset numbers average over the classes with TP + FN + FP
  > 0, for all classes, things and stuff separately.

Crowd. DeepLab2 turns COCO crowd regions into void before evaluation, so by
default there is no crowd. Passing `gt_is_crowd` gives COCO API semantics for
data that keeps crowd regions labelled: a ground-truth segment containing
crowd pixels is neither matched nor missed, and a prediction's overlap with
crowd of its class counts like void when deciding whether it is a false
positive (but not in the IoU union). `official_panoptic_quality` builds that
crowd map from the labels and so reproduces the official COCO panoptic
script (evaluator_options.official_panoptic_quality).

Area limits are not part of the metric; they belong to post-processing.
"""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

_SUMMARY_SUBSETS = ('all', 'thing', 'stuff')


@dataclasses.dataclass(frozen=True)
class PanopticQualityResult:
  """Accumulated per-class statistics; arrays are indexed by class id."""
  iou_sum: np.ndarray
  tp: np.ndarray
  fn: np.ndarray
  fp: np.ndarray
  ignore_label: int
  thing_class_ids: Tuple[int, ...]

  @property
  def num_classes(self) -> int:
    return len(self.tp)

  @property
  def sq(self) -> np.ndarray:
    """Segmentation quality per class (0 where there is no TP)."""
    return _safe_divide(self.iou_sum, self.tp)

  @property
  def rq(self) -> np.ndarray:
    """Recognition quality per class, an F1 score."""
    return _safe_divide(self.tp, self.tp + 0.5 * self.fn + 0.5 * self.fp)

  @property
  def pq(self) -> np.ndarray:
    return self.sq * self.rq

  @property
  def valid(self) -> np.ndarray:
    """Classes that occur in the ground truth or the prediction."""
    return (self.tp + self.fn + self.fp) > 0

  def class_ids(self, subset: str = 'all') -> np.ndarray:
    """Class ids in 'all', 'thing' or 'stuff', never the ignore label."""
    ids = np.arange(self.num_classes)
    is_thing = np.isin(ids, self.thing_class_ids)
    keep = {'all': np.ones_like(is_thing), 'thing': is_thing,
            'stuff': ~is_thing}.get(subset)
    if keep is None:
      raise ValueError(f'subset must be one of {_SUMMARY_SUBSETS}, got '
                       f'{subset!r}.')
    return ids[keep & (ids != self.ignore_label)]

  def summary(self, subset: str = 'all') -> Dict[str, float]:
    """Class-averaged PQ, SQ, RQ and TP/FN/FP over the valid classes.

    TP, FN and FP are class means too, as in DeepLab2's evaluation logs;
    their totals are reported as TP_count etc.
    """
    ids = self.class_ids(subset)
    ids = ids[self.valid[ids]]
    def mean(values):
      return float(np.mean(values[ids])) if len(ids) else 0.0
    return {
        'PQ': mean(self.pq), 'SQ': mean(self.sq), 'RQ': mean(self.rq),
        'TP': mean(self.tp), 'FN': mean(self.fn), 'FP': mean(self.fp),
        'TP_count': float(self.tp[ids].sum()),
        'FN_count': float(self.fn[ids].sum()),
        'FP_count': float(self.fp[ids].sum()),
        'num_classes': float(len(ids)),
    }

  def to_flat_dict(self) -> Dict[str, float]:
    """Scalars for logging: PQ, SQ, RQ, TP, ... plus *_thing and *_stuff."""
    flat = self.summary('all')
    for subset in ('thing', 'stuff'):
      part = self.summary(subset)
      for key in ('PQ', 'SQ', 'RQ', 'num_classes'):
        flat[f'{key}_{subset}'] = part[key]
    return flat

  def per_class(self) -> Dict[int, Dict[str, float]]:
    """Per valid class: PQ, SQ, RQ, TP, FN, FP and whether it is a thing."""
    table = {}
    for c in self.class_ids('all'):
      if not self.valid[c]:
        continue
      table[int(c)] = {
          'PQ': float(self.pq[c]), 'SQ': float(self.sq[c]),
          'RQ': float(self.rq[c]), 'TP': float(self.tp[c]),
          'FN': float(self.fn[c]), 'FP': float(self.fp[c]),
          'is_thing': bool(c in self.thing_class_ids),
      }
    return table

  def per_class_table(self,
                      class_names: Optional[Sequence[str]] = None) -> str:
    """A fixed-width text table of the valid classes, then the summaries."""
    lines = [f'{"id":>4} {"name":<20} {"kind":<5} {"PQ":>6} {"SQ":>6} '
             f'{"RQ":>6} {"TP":>6} {"FN":>6} {"FP":>6}']
    for c, row in self.per_class().items():
      name = class_names[c] if class_names is not None else str(c)
      kind = 'thing' if row['is_thing'] else 'stuff'
      lines.append(
          f'{c:>4} {name[:20]:<20} {kind:<5} {100 * row["PQ"]:6.2f} '
          f'{100 * row["SQ"]:6.2f} {100 * row["RQ"]:6.2f} {row["TP"]:6.0f} '
          f'{row["FN"]:6.0f} {row["FP"]:6.0f}')
    for subset in _SUMMARY_SUBSETS:
      s = self.summary(subset)
      lines.append(
          f'{"":>4} {subset:<20} {"":<5} {100 * s["PQ"]:6.2f} '
          f'{100 * s["SQ"]:6.2f} {100 * s["RQ"]:6.2f} {s["TP_count"]:6.0f} '
          f'{s["FN_count"]:6.0f} {s["FP_count"]:6.0f}')
    return '\n'.join(lines)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  out = np.zeros_like(numerator, dtype=np.float64)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def _segments(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Sorted unique ids and their pixel counts."""
  return np.unique(ids, return_counts=True)


class PanopticQuality:
  """Streaming PQ accumulator; call `update` per image, then `result`.

  Usage:
    pq = PanopticQuality(num_classes=19, ignore_label=255,
                         label_divisor=1000, thing_class_ids=range(11, 19))
    for gt, pred in data:
      pq.update(gt, pred)
    print(pq.result().to_flat_dict())
  """

  def __init__(self,
               num_classes: int,
               ignore_label: int,
               label_divisor: int,
               thing_class_ids: Sequence[int] = (),
               offset: Optional[int] = None):
    """Initialises an empty accumulator.

    Args:
      num_classes: class ids are 0..num_classes-1 (the ignore label may be
        among them, as COCO's 0, or outside, as Cityscapes' 255).
      ignore_label: the void class.
      label_divisor: panoptic = semantic * label_divisor + instance.
      thing_class_ids: classes reported under *_thing; all others are stuff.
      offset: pairs are hashed as gt * offset + pred, so every predicted id
        must be below it. Defaults to label_divisor * (largest class id + 1),
        which bounds every valid id.
    """
    if num_classes <= 0 or label_divisor <= 0:
      raise ValueError('num_classes and label_divisor must be positive, got '
                       f'{num_classes} and {label_divisor}.')
    self._num_classes = int(num_classes)
    self._ignore_label = int(ignore_label)
    self._label_divisor = int(label_divisor)
    self._thing_class_ids = tuple(sorted(int(c) for c in thing_class_ids))
    if any(not 0 <= c < num_classes for c in self._thing_class_ids):
      raise ValueError(f'thing_class_ids must lie in [0, {num_classes}), got '
                       f'{self._thing_class_ids}.')
    if offset is None:
      offset = self._label_divisor * (max(num_classes - 1, ignore_label) + 1)
    self._offset = int(offset)
    self.reset()

  def reset(self) -> None:
    self._iou_sum = np.zeros(self._num_classes, np.float64)
    self._tp = np.zeros(self._num_classes, np.float64)
    self._fn = np.zeros(self._num_classes, np.float64)
    self._fp = np.zeros(self._num_classes, np.float64)

  def update(self,
             gt_panoptic: np.ndarray,
             pred_panoptic: np.ndarray,
             gt_is_crowd: Optional[np.ndarray] = None) -> None:
    """Adds one image [H, W] or a batch [B, H, W] (each image on its own)."""
    gt_panoptic = np.asarray(gt_panoptic)
    pred_panoptic = np.asarray(pred_panoptic)
    if gt_panoptic.shape != pred_panoptic.shape:
      raise ValueError('Ground truth and prediction must have the same shape, '
                       f'got {gt_panoptic.shape} and {pred_panoptic.shape}.')
    if gt_is_crowd is not None and np.shape(gt_is_crowd) != gt_panoptic.shape:
      raise ValueError(f'gt_is_crowd must have shape {gt_panoptic.shape}, got '
                       f'{np.shape(gt_is_crowd)}.')
    if gt_panoptic.ndim == 3:
      for i in range(gt_panoptic.shape[0]):
        self.update(gt_panoptic[i], pred_panoptic[i],
                    None if gt_is_crowd is None else gt_is_crowd[i])
      return
    if gt_panoptic.ndim != 2:
      raise ValueError('Expected panoptic maps [H, W] or [B, H, W], got shape '
                       f'{gt_panoptic.shape}.')
    self._accumulate(gt_panoptic.astype(np.int64).ravel(),
                     pred_panoptic.astype(np.int64).ravel(),
                     None if gt_is_crowd is None else
                     np.asarray(gt_is_crowd, bool).ravel())

  def _check_ids(self, ids: np.ndarray, what: str) -> None:
    if ids.size and ids[0] < 0:
      raise ValueError(f'{what} panoptic ids must be non-negative, got '
                       f'{ids[0]}.')
    classes = ids // self._label_divisor
    bad = (classes >= self._num_classes) & (classes != self._ignore_label)
    if np.any(bad):
      raise ValueError(
          f'{what} has classes {np.unique(classes[bad]).tolist()} outside '
          f'[0, {self._num_classes}) that are not the ignore label '
          f'{self._ignore_label}.')

  def _accumulate(self, gt: np.ndarray, pred: np.ndarray,
                  is_crowd: Optional[np.ndarray]) -> None:
    divisor, offset = self._label_divisor, self._offset
    gt_ids, gt_areas = _segments(gt)
    pred_ids, pred_areas = _segments(pred)
    self._check_ids(gt_ids, 'Ground truth')
    self._check_ids(pred_ids, 'Prediction')
    if pred_ids.size and pred_ids[-1] >= offset:
      raise ValueError(f'Predicted id {pred_ids[-1]} is not below offset '
                       f'{offset}; pass a larger offset.')

    # Every (gt segment, pred segment) pair that shares pixels.
    pair_ids, pair_areas = _segments(gt * offset + pred)
    pair_gt, pair_pred = np.divmod(pair_ids, offset)
    gt_index = np.searchsorted(gt_ids, pair_gt)  # into gt_ids
    pred_index = np.searchsorted(pred_ids, pair_pred)  # into pred_ids
    gt_class, pred_class = pair_gt // divisor, pair_pred // divisor

    void_id = self._ignore_label * divisor
    on_void = np.zeros(len(pred_ids), np.int64)  # per pred segment
    np.add.at(on_void, pred_index[pair_gt == void_id],
              pair_areas[pair_gt == void_id])

    gt_is_crowd = np.zeros(len(gt_ids), bool)
    if is_crowd is not None:
      gt_is_crowd[np.searchsorted(gt_ids, np.unique(gt[is_crowd]))] = True
    pair_on_crowd = gt_is_crowd[gt_index] & (gt_class == pred_class)
    on_crowd = np.zeros(len(pred_ids), np.int64)
    np.add.at(on_crowd, pred_index[pair_on_crowd], pair_areas[pair_on_crowd])

    candidate = ((gt_class == pred_class) &
                 (pred_class != self._ignore_label) & ~gt_is_crowd[gt_index])
    union = (gt_areas[gt_index] + pred_areas[pred_index] - pair_areas -
             on_void[pred_index])
    iou = pair_areas / np.maximum(union, 1)
    matched = candidate & (iou > 0.5)
    np.add.at(self._tp, gt_class[matched], 1)
    np.add.at(self._iou_sum, gt_class[matched], iou[matched])

    gt_matched = np.zeros(len(gt_ids), bool)
    gt_matched[gt_index[matched]] = True
    pred_matched = np.zeros(len(pred_ids), bool)
    pred_matched[pred_index[matched]] = True

    gt_classes = gt_ids // divisor
    missed = (~gt_matched & ~gt_is_crowd &
              (gt_classes != self._ignore_label))
    np.add.at(self._fn, gt_classes[missed], 1)

    pred_classes = pred_ids // divisor
    mostly_ignored = (on_void + on_crowd) / pred_areas > 0.5
    spurious = (~pred_matched & ~mostly_ignored &
                (pred_classes != self._ignore_label))
    np.add.at(self._fp, pred_classes[spurious], 1)

  def result(self) -> PanopticQualityResult:
    return PanopticQualityResult(
        iou_sum=self._iou_sum.copy(), tp=self._tp.copy(), fn=self._fn.copy(),
        fp=self._fp.copy(), ignore_label=self._ignore_label,
        thing_class_ids=self._thing_class_ids)

"""Mean intersection-over-union from a streamed confusion matrix.

Pixels whose ground truth is the ignore label are skipped. The mean runs over
the classes whose union is non-empty (the convention of Keras' MeanIoU, which
DeepLab2's evaluator uses), so a class absent from both the ground truth and
the prediction neither helps nor hurts.

A predicted label outside [0, num_classes) (for example a void prediction
with Cityscapes' ignore label 255) counts as a miss for the ground-truth class
and as a false positive for no class.
"""

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SemanticIoUResult:
  """confusion[g, p]: pixels of ground-truth class g predicted as p.

  The last column collects predictions outside the class range.
  """
  confusion: np.ndarray

  @property
  def num_classes(self) -> int:
    return self.confusion.shape[0]

  @property
  def intersection(self) -> np.ndarray:
    return np.diagonal(self.confusion[:, :self.num_classes]).astype(np.float64)

  @property
  def union(self) -> np.ndarray:
    gt_area = self.confusion.sum(axis=1)
    pred_area = self.confusion[:, :self.num_classes].sum(axis=0)
    return (gt_area + pred_area).astype(np.float64) - self.intersection

  @property
  def iou(self) -> np.ndarray:
    """Per-class IoU; 0 for classes with an empty union."""
    union = self.union
    out = np.zeros_like(union)
    np.divide(self.intersection, union, out=out, where=union > 0)
    return out

  @property
  def mean_iou(self) -> float:
    valid = self.union > 0
    return float(self.iou[valid].mean()) if valid.any() else 0.0

  @property
  def pixel_accuracy(self) -> float:
    total = self.confusion.sum()
    return float(self.intersection.sum() / total) if total else 0.0

  def to_flat_dict(self) -> Dict[str, float]:
    return {'mIoU': self.mean_iou, 'pixel_accuracy': self.pixel_accuracy}

  def per_class_table(self,
                      class_names: Optional[Sequence[str]] = None) -> str:
    lines = [f'{"id":>4} {"name":<20} {"IoU":>6}']
    for c in np.flatnonzero(self.union > 0):
      name = class_names[c] if class_names is not None else str(c)
      lines.append(f'{c:>4} {name[:20]:<20} {100 * self.iou[c]:6.2f}')
    lines.append(f'{"":>4} {"mean":<20} {100 * self.mean_iou:6.2f}')
    return '\n'.join(lines)


class SemanticIoU:
  """Streaming mIoU accumulator; `update` with label maps of any shape."""

  def __init__(self, num_classes: int, ignore_label: int):
    if num_classes <= 0:
      raise ValueError(f'num_classes must be positive, got {num_classes}.')
    self._num_classes = int(num_classes)
    self._ignore_label = int(ignore_label)
    self.reset()

  def reset(self) -> None:
    self._confusion = np.zeros((self._num_classes, self._num_classes + 1),
                               np.int64)

  def update(self, gt_semantic: np.ndarray, pred_semantic: np.ndarray) -> None:
    gt = np.asarray(gt_semantic).astype(np.int64).ravel()
    pred = np.asarray(pred_semantic).astype(np.int64).ravel()
    if np.shape(gt_semantic) != np.shape(pred_semantic):
      raise ValueError('Ground truth and prediction must have the same shape, '
                       f'got {np.shape(gt_semantic)} and '
                       f'{np.shape(pred_semantic)}.')
    keep = gt != self._ignore_label
    gt, pred = gt[keep], pred[keep]
    bad = (gt < 0) | (gt >= self._num_classes)
    if np.any(bad):
      raise ValueError(
          f'Ground-truth labels {np.unique(gt[bad]).tolist()} are outside '
          f'[0, {self._num_classes}) and not the ignore label '
          f'{self._ignore_label}.')
    other = self._num_classes
    pred = np.where((pred < 0) | (pred >= self._num_classes), other, pred)
    cells = gt * (self._num_classes + 1) + pred
    self._confusion += np.bincount(
        cells, minlength=self._confusion.size).reshape(self._confusion.shape)

  def result(self) -> SemanticIoUResult:
    return SemanticIoUResult(self._confusion.copy())

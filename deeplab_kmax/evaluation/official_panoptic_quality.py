"""Panoptic quality as the official COCO panoptic script computes it.

Published PQ numbers come from the official script (panopticapi's
`pq_compute`; cityscapesscripts' `evaluatePanoptic` is the same code), run on
COCO panoptic PNG + JSON files. DeepLab2's evaluator, our default, scores the
label maps of its TFRecords instead, and differs in how it sees crowd:

* DeepLab2's converters turn crowd regions into void (`treat_crowd_as_ignore`,
  on by default), so a prediction's overlap with a crowd is subtracted from
  its IoU union like any void overlap. The official script keeps crowd
  regions as segments: they are never matched or missed, a prediction's
  overlap with them stays in the union, and an unmatched prediction is only
  excused (not a false positive) when more than half of it lies on void plus
  the crowd region of its own class.
* On records that keep crowd regions (`--treat_crowd_as_ignore=false`), they
  are thing-class pixels with instance 0, which DeepLab2's evaluator scores
  as ordinary segments (a missed crowd is a false negative).

This module reads the label encoding the way the official script reads the
COCO files the labels were converted from:

  official script (COCO files)          our label map
  VOID: segment id 0 / unlisted         every pixel of the ignore class
  crowd segment of class c (iscrowd)    class c (a thing) with instance 0
  other segment                         any other panoptic id

and scores with the official rules: per image, a ground-truth and a
predicted segment of the same class match when IoU > 0.5, where the union
leaves out the prediction's VOID pixels; unmatched non-crowd ground truth is
a false negative; an unmatched prediction is a false positive unless more
than half of its area is VOID or crowd of its class; classes with
TP + FP + FN = 0 are left out of the averages.

What it cannot reproduce, because the label maps lack the information:

* On records converted with crowd as void, crowd and void are one label; the
  official number is then out of reach and this metric equals the default.
  Convert the evaluation split with `--treat_crowd_as_ignore=false`.
* The converter merges all crowd segments of a class in an image into one
  region; the official script keeps only the last-listed crowd segment of a
  class for excusing predictions. They differ only for images with several
  crowd segments of one class.
* The official script takes ground-truth areas from the JSON; the converter
  checks that they equal the PNG's, which is what is used here.
"""

from typing import Sequence

import numpy as np

from deeplab_kmax.evaluation import panoptic_quality

# Prefix of the official numbers' keys in logs and eval_metrics.json.
KEY_PREFIX = 'official_'


def official_ground_truth(gt_panoptic: np.ndarray, ignore_label: int,
                          label_divisor: int,
                          thing_class_ids: Sequence[int]):
  """Our label map as the official script sees the COCO files behind it.

  Args:
    gt_panoptic: [H, W] or [B, H, W] semantic * label_divisor + instance.
    ignore_label: the void class.
    label_divisor: the panoptic label divisor.
    thing_class_ids: classes whose instance-0 pixels are crowd regions.

  Returns:
    (ground truth with every ignore-class pixel set to the void id,
     [same shape] bool crowd map).
  """
  gt = np.asarray(gt_panoptic).astype(np.int64)
  semantic, instance = np.divmod(gt, label_divisor)
  void = semantic == ignore_label
  gt = np.where(void, ignore_label * label_divisor, gt)
  is_crowd = (np.isin(semantic, np.asarray(thing_class_ids, np.int64)) &
              (instance == 0) & ~void)
  return gt, is_crowd


class OfficialPanopticQuality(panoptic_quality.PanopticQuality):
  """Streaming PQ with the official script's void and crowd rules.

  Same constructor and result type as `PanopticQuality`, whose matching, IoU
  and false-positive rule given a crowd map are the COCO API's; this class
  only decides what is void and crowd, so `update` takes the two maps and
  reads crowd regions from the ground truth.
  """

  @property
  def num_crowd_pixels(self) -> int:
    """Crowd pixels seen since `reset`; 0 hints at crowd-as-void records."""
    return self._num_crowd_pixels

  def reset(self) -> None:
    super().reset()
    self._num_crowd_pixels = 0

  def update(self, gt_panoptic: np.ndarray,  # pylint: disable=arguments-differ
             pred_panoptic: np.ndarray) -> None:
    """Adds one image [H, W] or a batch [B, H, W]."""
    gt, is_crowd = official_ground_truth(
        gt_panoptic, self._ignore_label, self._label_divisor,
        self._thing_class_ids)
    super().update(gt, pred_panoptic, is_crowd)
    self._num_crowd_pixels += int(is_crowd.sum())

"""Writes an evaluation's raw predictions for offline / official scoring.

Enabled by `evaluator_options.save_raw_predictions`; the layout follows
`evaluator_options.raw_panoptic_format`:

  "coco_panoptic"            panoptic/<image>.png (segment id = R + 256 G +
                             256^2 B) and predictions.json in the COCO
                             panoptic results layout, which `panopticapi`'s
                             pq_compute (or `evaluation.PanopticQuality`)
                             re-scores against the dataset's own JSON.
  "two_channel_png"          raw_panoptic/<image>.png, R = class, G = instance
                             (DeepLab2's default; instance ids must be < 256).
  "three_channel_png"        raw_panoptic/<image>.png, R = class, G/B = the
                             instance id's high/low byte.
  "two_channel_numpy_array"  raw_panoptic/<image>.npy, [H, W, 2] int32.

Every format also gets raw_semantic/<image>.png. Class ids are the dataset's
own (e.g. COCO category ids, Cityscapes label ids) when
`convert_raw_to_eval_ids` is set, else training ids.

Files of one evaluation go to a hidden staging folder that replaces the
previous evaluation's output only once complete, so a crash mid-evaluation
never leaves a half-written or mixed set.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from PIL import Image

from deeplab_kmax import keys
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info as dataset_info_lib

FORMATS = ('coco_panoptic', 'two_channel_png', 'three_channel_png',
           'two_channel_numpy_array')


def coco_image_id(name: str) -> Any:
  """COCO ids are integers ('000000000139' -> 139); other names stay."""
  return int(name) if name.isdigit() else name


def _save_png(path: str, array: np.ndarray) -> None:
  if array.max(initial=0) > 255:
    Image.fromarray(array.astype(np.uint16)).save(path)
  else:
    Image.fromarray(array.astype(np.uint8)).save(path)


class RawPredictionWriter:
  """Evaluator hook (the ExtraMetric interface) writing every example."""

  name = 'raw_predictions'

  def __init__(self, output_dir: str, info: dataset_info_lib.DatasetInfo,
               raw_panoptic_format: str = 'two_channel_png',
               convert_to_eval_ids: bool = True):
    if raw_panoptic_format not in FORMATS:
      raise ValueError(
          f'evaluator_options.raw_panoptic_format is {raw_panoptic_format!r};'
          f' expected one of {FORMATS}.')
    self._output_dir = output_dir
    self._info = info
    self._format = raw_panoptic_format
    to_source = info.contiguous_to_source() if convert_to_eval_ids else {}
    size = max(info.num_classes, info.ignore_label + 1)
    self._class_lookup = np.array([to_source.get(c, c) for c in range(size)],
                                  np.int64)
    self._staging: Optional[str] = None
    self._num_images = 0
    self._coco: List[Dict[str, Any]] = []  # COCO panoptic annotations.

  @property
  def staging_dir(self) -> str:
    parent, base = os.path.split(os.path.normpath(self._output_dir))
    return os.path.join(parent, f'.{base}.partial')

  def reset(self) -> None:
    self._num_images = 0
    self._coco = []
    self._staging = self.staging_dir
    shutil.rmtree(self._staging, ignore_errors=True)
    subdirs = ['raw_semantic']
    subdirs.append('panoptic' if self._format == 'coco_panoptic' else
                   'raw_panoptic')
    for subdir in subdirs:
      os.makedirs(os.path.join(self._staging, subdir))

  def _name(self, example: Mapping[str, Any]) -> str:
    name = example.get(keys.IMAGE_NAME)
    if isinstance(name, np.ndarray):
      name = name.item()
    if isinstance(name, bytes):
      name = name.decode('utf-8')
    if not name:
      name = f'{self._num_images:06d}'
    return os.path.basename(str(name))

  def update(self, example: Mapping[str, Any]) -> None:
    if self._staging is None:
      self.reset()
    name = self._name(example)
    panoptic = np.asarray(example[keys.PANOPTIC_PRED]).astype(np.int64)
    divisor = self._info.panoptic_label_divisor
    semantic, instance = np.divmod(panoptic, divisor)
    if keys.SEMANTIC_PRED in example:
      _save_png(os.path.join(self._staging, 'raw_semantic', name + '.png'),
                self._class_lookup[np.asarray(example[keys.SEMANTIC_PRED])])
    if self._format == 'coco_panoptic':
      self._write_coco(name, panoptic, example)
    else:
      self._write_raw(name, semantic, instance)
    self._num_images += 1

  def _write_raw(self, name: str, semantic: np.ndarray,
                 instance: np.ndarray) -> None:
    classes = self._class_lookup[semantic]
    path = os.path.join(self._staging, 'raw_panoptic', name)
    if self._format == 'two_channel_numpy_array':
      np.save(path + '.npy', np.stack([classes, instance], -1).astype(
          np.int32))
      return
    if classes.max(initial=0) > 255:
      raise ValueError(f'{name}: class id {classes.max()} does not fit the '
                       f'8-bit channel of {self._format!r}.')
    if self._format == 'two_channel_png' and instance.max(initial=0) > 255:
      raise ValueError(
          f'{name}: instance id {instance.max()} does not fit the 8-bit '
          'channel of "two_channel_png"; use "three_channel_png" or '
          '"coco_panoptic".')
    if self._format == 'two_channel_png':
      channels = [classes, instance, np.zeros_like(instance)]
    else:
      channels = [classes, instance // 256, instance % 256]
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(
        path + '.png')

  def _write_coco(self, name: str, panoptic: np.ndarray,
                  example: Mapping[str, Any]) -> None:
    scores = example.get(keys.SEMANTIC_SCORES)
    if scores is None:
      scores = np.ones(panoptic.shape, np.float32)
    segment_map, segments = coco_panoptic.panoptic_segments(panoptic, scores,
                                                            self._info)
    Image.fromarray(coco_panoptic.encode_segment_ids(segment_map)).save(
        os.path.join(self._staging, 'panoptic', name + '.png'))
    self._coco.append({
        'image_id': coco_image_id(name),
        'file_name': name + '.png',
        'segments_info': [
            {key: segment[key] for key in ('id', 'category_id', 'iscrowd',
                                           'area', 'bbox', 'score')}
            for segment in segments],
    })

  def result(self) -> Dict[str, float]:
    """Publishes the staged files; reports how many images were written."""
    if self._staging is None:
      return {}
    if self._format == 'coco_panoptic':
      summary = os.path.join(self._staging, coco_panoptic.PREDICTIONS_FILE)
      with open(summary, 'w') as f:
        json.dump({'annotations': self._coco,
                   'categories': coco_panoptic.categories(self._info)}, f)
    old = os.path.join(os.path.dirname(self.staging_dir),
                       f'.{os.path.basename(self._output_dir)}.old')
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(self._output_dir):
      os.rename(self._output_dir, old)
    os.rename(self._staging, self._output_dir)
    shutil.rmtree(old, ignore_errors=True)
    self._staging = None
    return {'num_images': float(self._num_images)}

"""TensorBoard images and result files written by the trainer and evaluator.

Panoptic overlays use the shared `deeplab_kmax.visualization` colours (class
colour per segment, instances jittered, borders drawn).
"""

import json
import os
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from deeplab_kmax import visualization


def panoptic_overlays(images, panoptic, dataset_info) -> np.ndarray:
  """[B, H, W, 3] uint8 overlays of panoptic maps [B, H, W] on images."""
  return visualization.panoptic_overlay(
      np.asarray(images), np.asarray(panoptic),
      dataset_info.panoptic_label_divisor,
      visualization.dataset_colormap(dataset_info), dataset_info.ignore_label)


def write_panoptic_images(name: str, images, panoptic, step: int,
                          dataset_info, max_outputs: int = 3) -> None:
  """Writes overlays to the default summary writer (a no-op without one)."""
  overlay = panoptic_overlays(np.asarray(images)[:max_outputs],
                              np.asarray(panoptic)[:max_outputs], dataset_info)
  tf.summary.image(name, overlay, step=step, max_outputs=max_outputs)


def write_json_atomically(path: str, content: Mapping[str, Any]) -> None:
  """Writes JSON through a temporary file and a rename, so readers never see
  a half-written file (also on gs:// through tf.io.gfile)."""
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  temporary = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(temporary, 'w') as f:
    f.write(json.dumps(_plain(content), indent=2, sort_keys=True))
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _plain(value):
  """NumPy / TF scalars and arrays -> JSON-serialisable Python values."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (tf.Tensor, tf.Variable)):
    value = value.numpy()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None if np.isnan(value) else value
  return value

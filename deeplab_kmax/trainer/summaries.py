"""TensorBoard images, result files and the evaluation summary table.

Panoptic overlays use the shared `deeplab_kmax.visualization` colours (class
colour per segment, instances jittered, borders drawn).
"""

import json
import os
from typing import Any, Mapping, Optional

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


# Rows of the compact evaluation table: (label, suffix of the PQ keys).
_PQ_ROWS = (('all', ''), ('things', '_thing'), ('stuff', '_stuff'))
_PQ_COLUMNS = ('PQ', 'SQ', 'RQ')
# Scalars printed under the PQ rows, when present: (label, key).
_EXTRA_COLUMNS = (('mIoU', 'mIoU'), ('AP', 'AP'), ('AP50', 'AP50'),
                  ('AP75', 'AP75'))


def evaluation_table(panoptic: Mapping[str, float],
                     semantic: Mapping[str, float],
                     instance: Mapping[str, float],
                     step: Optional[int] = None,
                     num_examples: Optional[int] = None) -> str:
  """The end-of-evaluation summary, in percent:

    evaluation at step 1500 over 64 images
               PQ     SQ     RQ
    all     57.20  86.80  62.90
    things  20.60  75.10  27.00
    stuff   93.90  98.40  95.30
    mIoU 59.00 | AP 6.80 | AP50 15.20 | AP75 5.10

  Args:
    panoptic: `PanopticQualityResult.to_flat_dict()` (fractions).
    semantic: `SemanticIoUResult.to_flat_dict()`; may be empty.
    instance: the instance AP metric's result; may be empty.
    step: training step of the weights, for the title.
    num_examples: evaluated images, for the title.
  """
  title = 'evaluation'
  if step is not None:
    title += f' at step {step}'
  if num_examples is not None:
    title += f' over {num_examples} images'
  lines = [title, f'{"":<6}' + ''.join(f'{c:>7}' for c in _PQ_COLUMNS)]
  for label, suffix in _PQ_ROWS:
    if f'PQ{suffix}' not in panoptic:
      continue
    lines.append(f'{label:<6}' + ''.join(
        f'{100 * float(panoptic[column + suffix]):7.2f}'
        for column in _PQ_COLUMNS))
  scalars = dict(semantic)
  scalars.update(instance)
  extra = [f'{label} {100 * float(scalars[key]):.2f}'
           for label, key in _EXTRA_COLUMNS if key in scalars]
  if extra:
    lines.append(' | '.join(extra))
  return '\n'.join(lines)


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

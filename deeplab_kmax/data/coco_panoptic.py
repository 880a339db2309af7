"""The COCO panoptic format: segment-id PNGs and their segment records.

A COCO panoptic annotation (or prediction) is a PNG per image whose colour
encodes a segment id, id = R + 256 G + 256^2 B (0 = void), plus a JSON list
of segments (`segments_info`: id, category_id, iscrowd, area, bbox, ...)
and the dataset's `categories`. The converters read it (ground truth), the
predict CLI and the evaluator's prediction writer write it; both sides use
this module so the encoding is spelled once.
"""

from typing import Any, Dict, List, Tuple

import numpy as np

from deeplab_kmax.data import dataset_info as dataset_info_lib

# The results file of a folder of predictions (COCO panoptic results layout).
PREDICTIONS_FILE = 'predictions.json'


def encode_segment_ids(segment_ids: np.ndarray) -> np.ndarray:
  """[H, W] ids -> [H, W, 3] uint8 with id = R + 256 G + 256^2 B."""
  ids = np.asarray(segment_ids).astype(np.int64)
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
    raise ValueError('Segment ids must be in [0, 2^24) for a panoptic PNG.')
  return np.stack([ids % 256, ids // 256 % 256, ids // 256**2],
                  axis=-1).astype(np.uint8)


def decode_segment_ids(rgb: np.ndarray) -> np.ndarray:
  """[H, W, 3] PNG colours -> [H, W] int64 segment ids (inverse of encode)."""
  rgb = np.asarray(rgb).astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def panoptic_segments(panoptic: np.ndarray, semantic_scores: np.ndarray,
                      info: dataset_info_lib.DatasetInfo
                      ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
  """Numbers the segments of a panoptic map and describes each.

  Args:
    panoptic: [H, W] semantic * label_divisor + instance.
    semantic_scores: [H, W] class confidence of each pixel's segment.
    info: the dataset descriptor.

  Returns:
    ([H, W] int32 segment ids, 0 = void, 1.. in panoptic-id order;
     the segments_info list).
  """
  panoptic = np.asarray(panoptic).astype(np.int64)
  divisor = info.panoptic_label_divisor
  to_source = info.contiguous_to_source()
  things = set(info.thing_class_ids)
  ids, inverse = np.unique(panoptic, return_inverse=True)
  inverse = inverse.reshape(panoptic.shape)
  segment_map = np.zeros(panoptic.shape, np.int32)
  segments = []
  scores = np.asarray(semantic_scores, np.float64)
  for index, panoptic_id in enumerate(ids.tolist()):
    semantic, instance = divmod(int(panoptic_id), divisor)
    if semantic == info.ignore_label:
      continue
    mask = inverse == index
    segment_id = len(segments) + 1
    segment_map[mask] = segment_id
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    segments.append({
        'id': segment_id,
        'category_id': int(to_source.get(semantic, semantic)),
        'category_name': info.class_names.get(semantic, str(semantic)),
        'semantic_id': semantic,
        'instance_id': instance,
        'panoptic_id': int(panoptic_id),
        'isthing': semantic in things,
        'iscrowd': 0,
        'score': round(float(scores[mask].mean()), 6),
        'area': int(mask.sum()),
        'bbox': [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                 int(rows[-1] - rows[0] + 1)],
    })
  return segment_map, segments


def categories(info: dataset_info_lib.DatasetInfo) -> List[Dict[str, Any]]:
  """COCO-style category list of the dataset (void left out)."""
  to_source = info.contiguous_to_source()
  return [{'id': int(to_source.get(i, i)), 'name': info.class_names[i],
           'isthing': int(i in info.thing_class_ids),
           'color': list(info.colormap.get(i, (0, 0, 0)))}
          for i in sorted(info.class_names) if i != info.ignore_label]

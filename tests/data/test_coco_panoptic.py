"""Tests for the COCO panoptic PNG encoding and segment records."""

import numpy as np
import pytest

from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info

COCO = dataset_info.COCO_PANOPTIC


def test_segment_id_png_encoding_round_trips():
  ids = np.array([[0, 1, 255], [256, 65535, 65536 * 3 + 7]], np.int64)
  rgb = coco_panoptic.encode_segment_ids(ids)
  np.testing.assert_array_equal(rgb[1, 2], (7, 0, 3))
  np.testing.assert_array_equal(coco_panoptic.decode_segment_ids(rgb), ids)
  with pytest.raises(ValueError, match='2\\^24'):
    coco_panoptic.encode_segment_ids(np.array([[256**3]]))


def test_panoptic_segments_describe_each_segment():
  panoptic = np.zeros((4, 6), np.int32)  # void
  panoptic[:, 3:] = 81 * 256  # banner (stuff), COCO category 92
  panoptic[1:3, 0:2] = 1 * 256 + 4  # person instance 4
  scores = np.where(panoptic == 81 * 256, 0.5, 0.0).astype(np.float32)
  scores[1:3, 0:2] = [[0.9, 0.7], [0.9, 0.7]]
  segment_map, segments = coco_panoptic.panoptic_segments(panoptic, scores, COCO)
  assert [s['id'] for s in segments] == [1, 2]
  person, banner = segments
  assert person == {
      'id': 1, 'category_id': 1, 'category_name': 'person', 'semantic_id': 1,
      'instance_id': 4, 'panoptic_id': 260, 'isthing': True, 'iscrowd': 0,
      'score': pytest.approx(0.8), 'area': 4, 'bbox': [0, 1, 2, 2]}
  assert banner['category_id'] == 92 and not banner['isthing']
  assert banner['bbox'] == [3, 0, 3, 4] and banner['area'] == 12
  np.testing.assert_array_equal(segment_map == 0, panoptic == 0)
  np.testing.assert_array_equal(segment_map == 1, panoptic == 260)

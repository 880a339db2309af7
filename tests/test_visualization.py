"""Tests for the panoptic visualisation helpers."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import visualization as vis
from deeplab_kmax.data import dataset_info

COCO = dataset_info.COCO_PANOPTIC
DIVISOR = COCO.panoptic_label_divisor


def _panoptic():
  """[6, 8]: person instances 1 and 2, sky-ish stuff (81), void corner."""
  panoptic = np.full((6, 8), 81 * DIVISOR, np.int32)
  panoptic[:3, :4] = 1 * DIVISOR + 1
  panoptic[3:, :4] = 1 * DIVISOR + 2
  panoptic[:2, 6:] = 0
  return panoptic


def test_dataset_colormap_uses_the_dataset_colours():
  colormap = vis.dataset_colormap(COCO)
  assert colormap.shape == (134, 3) and colormap.dtype == np.uint8
  assert tuple(colormap[1]) == (220, 20, 60)  # person
  assert tuple(colormap[0]) == (0, 0, 0)  # void
  cityscapes = vis.dataset_colormap(dataset_info.CITYSCAPES_PANOPTIC)
  assert cityscapes.shape == (256, 3)  # Indexable by the ignore label 255.
  assert tuple(cityscapes[0]) == dataset_info.CITYSCAPES_PANOPTIC.colormap[0]


def test_instance_colours_are_deterministic_distinct_and_close():
  base = (120, 120, 120)
  colors = [vis.instance_color(base, i, max_shift=40) for i in range(1, 51)]
  assert len(set(colors)) == 50
  assert all(max(abs(c - b) for c, b in zip(color, base)) <= 40
             for color in colors)
  assert vis.instance_color(base, 0) == base
  assert vis.instance_color(base, 7) == vis.instance_color(base, 7)
  assert vis.instance_color((250, 5, 128), 3) == tuple(
      np.clip(np.array((250, 5, 128)) + (
          np.array(vis.instance_color((128, 128, 128), 3)) - 128), 0, 255))


def test_colorize_panoptic():
  panoptic = _panoptic()
  colors = vis.colorize_panoptic(panoptic, DIVISOR, vis.dataset_colormap(COCO),
                                 COCO.ignore_label)
  assert colors.shape == (6, 8, 3) and colors.dtype == np.uint8
  np.testing.assert_array_equal(colors[0, 7], (0, 0, 0))  # void
  np.testing.assert_array_equal(colors[5, 7], COCO.colormap[81])  # stuff
  first, second = tuple(colors[0, 0]), tuple(colors[5, 0])
  assert first != second
  assert first == vis.instance_color(COCO.colormap[1], 1)
  unknown = vis.colorize_panoptic(np.array([[999 * DIVISOR]]), DIVISOR,
                                  vis.dataset_colormap(COCO), 0)
  np.testing.assert_array_equal(unknown[0, 0], (0, 0, 0))


def test_segment_boundaries():
  panoptic = np.zeros((5, 6), np.int32)
  panoptic[:, 3:] = 1
  edges = vis.segment_boundaries(panoptic)
  expected = np.zeros((5, 6), bool)
  expected[:, 2:4] = True
  np.testing.assert_array_equal(edges, expected)
  thick = vis.segment_boundaries(panoptic, thickness=2)
  expected[:, 1:5] = True
  np.testing.assert_array_equal(thick, expected)
  batched = vis.segment_boundaries(np.stack([np.zeros_like(panoptic),
                                             panoptic]))
  assert not batched[0].any()
  np.testing.assert_array_equal(batched[1], edges)
  assert not vis.segment_boundaries(np.zeros((3, 3))).any()


def test_overlay_blends_segments_and_leaves_void_alone():
  image = np.full((6, 8, 3), 100, np.uint8)
  panoptic = _panoptic()
  colormap = vis.dataset_colormap(COCO)
  out = vis.panoptic_overlay(image, panoptic, DIVISOR, colormap, 0,
                             alpha=0.5, boundary_color=None)
  np.testing.assert_array_equal(out[0, 7], (100, 100, 100))
  expected = np.round(0.5 * 100 + 0.5 * np.array(COCO.colormap[81]))
  np.testing.assert_array_equal(out[5, 7], expected)
  with_edges = vis.panoptic_overlay(image, panoptic, DIVISOR, colormap, 0)
  np.testing.assert_array_equal(with_edges[2, 0], vis.BOUNDARY_COLOR)
  with pytest.raises(ValueError, match='agree'):
    vis.panoptic_overlay(image[:5], panoptic, DIVISOR, colormap, 0)
  with pytest.raises(ValueError, match='RGB'):
    vis.panoptic_overlay(image[..., 0], panoptic, DIVISOR, colormap, 0)


def test_label_anchor_lies_inside_the_segment():
  ring = np.ones((21, 21), bool)
  ring[5:16, 5:16] = False  # The centroid is outside the ring.
  row, col = vis.label_anchor(ring)
  assert ring[row, col]
  with pytest.raises(ValueError, match='empty'):
    vis.label_anchor(np.zeros((3, 3), bool))


def test_segment_names_are_drawn_on_large_segments_only():
  image = np.full((120, 160, 3), 90, np.uint8)
  panoptic = np.full((120, 160), 81 * DIVISOR, np.int32)
  panoptic[:60, :80] = DIVISOR + 1
  panoptic[118:, 158:] = DIVISOR + 2  # 4 pixels: too small for a label.
  named = vis.draw_segment_names(image, panoptic, DIVISOR, COCO.class_names,
                                 0, scores={DIVISOR + 1: 0.9})
  changed = np.any(named != image, axis=-1)
  row, col = vis.label_anchor(panoptic == DIVISOR + 1)
  assert changed[row - 3:row + 4, col - 10:col + 10].any()
  assert not changed[110:, 150:].any()
  assert changed.mean() < 0.3


def test_visualize_panoptic_end_to_end():
  image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
  panoptic = np.full((60, 80), 81 * DIVISOR, np.int32)
  panoptic[10:50, 10:40] = DIVISOR + 1
  picture = vis.visualize_panoptic(image, panoptic, COCO)
  assert picture.shape == image.shape and picture.dtype == np.uint8
  plain = vis.visualize_panoptic(image, panoptic, COCO, draw_names=False)
  assert np.any(picture != plain)
  legend = vis.segment_color_legend(panoptic, COCO)
  assert legend[81 * DIVISOR] == COCO.colormap[81]


def test_tf_overlay_matches_numpy_inside_tf_function(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 6, 8, 3)).astype(np.float32)
  panoptic = np.stack([_panoptic(), _panoptic()[::-1]])
  colormap = vis.dataset_colormap(COCO)

  @tf.function
  def summary_images(images, panoptic):
    return vis.tf_panoptic_overlay(images, panoptic, DIVISOR, colormap, 0)

  result = summary_images(tf.constant(images), tf.constant(panoptic))
  assert result.dtype == tf.uint8 and result.shape == (2, 6, 8, 3)
  np.testing.assert_array_equal(
      result.numpy(),
      vis.panoptic_overlay(images, panoptic, DIVISOR, colormap, 0))
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    assert tf.summary.image('panoptic', result, step=0)
  writer.flush()
  assert list(tmp_path.iterdir())

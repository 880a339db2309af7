"""The label space: one derivation of stuff ids, class-head order and width."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax import post_processing
from deeplab_kmax.data import dataset_info
from deeplab_kmax.data import label_space
from deeplab_kmax.losses import kmax_loss


def test_benchmarks():
  coco = dataset_info.COCO_PANOPTIC.label_space
  assert coco.void_is_a_class and coco.num_thing_stuff_classes == 133
  assert coco.class_head_outputs == 134
  assert coco.semantic_ids == tuple(range(1, 134))
  city = dataset_info.CITYSCAPES_PANOPTIC.label_space
  assert not city.void_is_a_class and city.class_head_outputs == 20
  assert city.semantic_ids == tuple(range(11, 19)) + tuple(range(11))
  assert city.panoptic_ignore_label == 255000
  ade = dataset_info.ADE20K_PANOPTIC.label_space
  assert ade.class_head_outputs == 151 and len(ade.stuff_class_ids) == 50


def test_class_index_table_inverts_semantic_ids():
  space = dataset_info.CITYSCAPES_PANOPTIC.label_space
  table = space.class_index_table()
  np.testing.assert_array_equal(table[list(space.semantic_ids)],
                                np.arange(19))
  coco = dataset_info.COCO_PANOPTIC.label_space.class_index_table()
  assert coco[0] == -1 and coco[1] == 0 and coco[133] == 132


def test_void_inside_as_last_id():
  # ids 0..18 are classes, 19 is void and counted in num_classes = 20.
  space = label_space.LabelSpace(20, 19, 1000, range(11, 19))
  assert space.void_is_a_class
  assert space.stuff_class_ids == tuple(range(11))
  assert space.class_head_outputs == 20


def _descriptor_with_void_after_the_classes(tmp_path):
  path = tmp_path / 'void_last.json'
  path.write_text(json.dumps({
      'name': 'void_last', 'ignore_label': 3, 'panoptic_label_divisor': 100,
      'classes': [{'id': 0, 'name': 'road'},
                  {'id': 1, 'name': 'car', 'isthing': True},
                  {'id': 2, 'name': 'sky'}]}))
  return dataset_info.load(path)


def test_ignore_label_equal_to_num_classes_is_consistent(tmp_path):
  """ignore_label == num_classes: void lies outside the ids, so the class
  head, the loss and post-processing all count num_classes + void."""
  info = _descriptor_with_void_after_the_classes(tmp_path)
  space = info.label_space
  assert (info.num_classes, info.ignore_label) == (3, 3)
  assert not space.void_is_a_class
  assert space.semantic_ids == (1, 0, 2)
  assert space.class_head_outputs == 4
  assert info.num_thing_stuff_classes == 3
  assert info.stuff_class_ids == (0, 2)

  loss = kmax_loss.KMaXLoss(space)
  assert loss.stuff_class_ids == [0, 2]
  # Class logits of the head's width are accepted by loss and merge alike.
  rng = np.random.default_rng(0)
  mask_logits = rng.standard_normal((1, 5, 5, 6)).astype(np.float32)
  class_logits = 4 * rng.standard_normal((1, 6, 4)).astype(np.float32)
  y_pred = {
      keys.PIXEL_SPACE_MASK_LOGITS: tf.constant(mask_logits),
      keys.TRANSFORMER_CLASS_LOGITS: tf.constant(class_logits),
      keys.PIXEL_SPACE_NORMALIZED_FEATURE: tf.math.l2_normalize(
          tf.constant(rng.standard_normal((1, 5, 5, 8)), tf.float32), -1),
      keys.SEMANTIC_LOGITS: tf.constant(
          rng.standard_normal((1, 5, 5, 3)), tf.float32),
  }
  semantic = np.full((1, 17, 17), 3, np.int32)  # Void band, then classes.
  semantic[:, 4:9] = 0
  semantic[:, 9:] = 2
  semantic[:, 10:15, 2:8] = 1
  thing_id = np.where(semantic == 1, 0, -1).astype(np.int32)
  y_true = {
      keys.GT_SEMANTIC: tf.constant(semantic),
      keys.GT_THING_ID_MASK: tf.constant(thing_id),
      keys.GT_THING_ID_CLASS: tf.constant([[1, -1, -1]], tf.int32),
      keys.SEMANTIC_LOSS_WEIGHT: tf.ones((1, 17, 17)),
  }
  targets = loss.mask_targets(y_true, y_pred)
  # Rows: 3 thing ids, then the stuff classes 0 and 2; void is no row.
  np.testing.assert_array_equal(targets.mask_class[0], [1, -1, -1, 0, 2])
  np.testing.assert_array_equal(targets.mask_class_index[0],
                                [0, -1, -1, 1, 2])
  losses = loss(y_true, y_pred)
  assert np.all(np.isfinite(losses[keys.TOTAL_LOSS].numpy()))

  layer = post_processing.MaskWisePostProcessor(space, output_size=(17, 17))
  maps = layer(mask_logits, class_logits, with_class_index=True)
  semantic_pred = maps[keys.SEMANTIC_PRED].numpy()
  index = maps[keys.SEMANTIC_CLASS_INDEX].numpy()
  np.testing.assert_array_equal(
      semantic_pred, np.asarray(space.semantic_ids)[index])
  assert set(np.unique(maps[keys.PANOPTIC_PRED].numpy()) // 100) <= {
      0, 1, 2, 3}
  with pytest.raises(ValueError, match='non-void classes'):
    layer(mask_logits, class_logits[..., :3])


def test_bad_label_spaces_name_the_descriptor_field():
  with pytest.raises(ValueError, match='panoptic_label_divisor'):
    label_space.LabelSpace(3, 0, 0, ())
  with pytest.raises(ValueError, match=r'thing class 3 .* \[0, 3\)'):
    label_space.LabelSpace(3, 0, 256, (3,))
  with pytest.raises(ValueError, match='thing class 0'):
    label_space.LabelSpace(3, 0, 256, (0,))

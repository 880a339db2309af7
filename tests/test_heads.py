"""MaX-DeepLab prediction head: checkpoint keys, golden numerics, void bias."""

import math

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import heads
from deeplab_kmax.data import dataset_info
from deeplab_kmax.data import label_space
from deeplab_kmax.testing import reference

HEAD_PREFIXES = ('pixel_space_head/', 'transformer_mask_head/',
                 'transformer_class_head/', 'pixel_space_feature_batch_norm/',
                 'pixel_space_mask_batch_norm/', 'semantic_decoder/',
                 'semantic_head_without_last_layer/', 'semantic_last_layer/')


def _random_inputs(panoptic_hw, panoptic_channels, num_slots, batch=1, seed=0,
                   semantic_hw=(5, 5)):
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return tf.constant(rng.standard_normal((batch,) + shape), tf.float32)

  h, w = semantic_hw
  return {
      'feature_panoptic': normal(*panoptic_hw, panoptic_channels),
      'transformer_class_feature': normal(num_slots, 256),
      'transformer_mask_feature': normal(num_slots, 256),
      'feature_semantic': normal(h, w, 2048),
      'res3': normal(4 * h - 3, 4 * w - 3, 512),
      'res2': normal(8 * h - 7, 8 * w - 7, 256),
  }


@pytest.fixture(scope='module')
def golden(reference_dir):
  folder = reference_dir / 'golden'
  endpoints = np.load(folder / 'coco_kmax_r50_crop129_endpoints.npz')
  forward = np.load(folder / 'coco_kmax_r50_crop129_forward.npz')
  return ({k: endpoints[k] for k in endpoints.files},
          {k: forward[k] for k in forward.files})


@pytest.fixture(scope='module')
def golden_features(golden):
  """The head's inputs as DeepLab2 builds them from the golden endpoints."""
  endpoints, _ = golden
  stage = {i: tf.constant(endpoints[f'encoder/stage{i}']) for i in range(1, 6)}
  return {
      'feature_panoptic': tf.constant(
          endpoints['pixel_decoder/decoder_output']),
      'feature_semantic': stage[5],
      'res3': tf.nn.relu(stage[3]),
      'res2': tf.nn.relu(stage[2]),
      'transformer_class_feature': tf.constant(
          endpoints['transformer_decoder/transformer_class_feature']),
      'transformer_mask_feature': tf.constant(
          endpoints['transformer_decoder/transformer_mask_feature']),
  }


@pytest.fixture(scope='module')
def coco_head(golden_features):
  head = heads.MaXDeepLabHead(num_classes=134, semantic_num_classes=134,
                              use_semantic_decoder=True)
  head(golden_features)
  reference.fill_with_reference_rule(head.checkpoint_items)
  return head


def _manifest_part(reference_dir, name):
  manifest = reference.read_manifest(reference_dir / 'manifests' / name)
  return {k: v for k, v in manifest.items() if k.startswith(HEAD_PREFIXES)}


def test_coco_checkpoint_keys_match_manifest(coco_head, reference_dir):
  assert set(coco_head.checkpoint_items) == {p[:-1] for p in HEAD_PREFIXES}
  assert reference.checkpoint_shapes(coco_head.checkpoint_items) == (
      _manifest_part(reference_dir, 'coco_kmax_meta_r50_os32.tsv'))


def test_cityscapes_checkpoint_keys_match_manifest(reference_dir):
  # Cityscapes: stride-2 decoder output (128 channels), 256 slots, 19
  # semantic classes + void, and the semantic head directly on stage5.
  num_classes = dataset_info.CITYSCAPES_PANOPTIC.label_space.class_head_outputs
  head = heads.MaXDeepLabHead(num_classes=num_classes, semantic_num_classes=19,
                              use_semantic_decoder=False)
  outputs = head(_random_inputs((9, 9), 128, 256))
  assert 'semantic_decoder' not in head.checkpoint_items
  assert reference.checkpoint_shapes(head.checkpoint_items) == (
      _manifest_part(reference_dir, 'cityscapes_kmax_meta_r50_os32.tsv'))
  assert outputs['semantic_logits'].shape == (1, 5, 5, 19)
  assert outputs['transformer_class_logits'].shape == (1, 256, 20)
  assert outputs['pixel_space_mask_logits'].shape == (1, 9, 9, 256)


@pytest.mark.parametrize('name', ['pixel_space_mask_logits',
                                  'transformer_class_logits',
                                  'pixel_space_normalized_feature',
                                  'semantic_logits'])
def test_outputs_match_golden(coco_head, golden, golden_features, name):
  _, forward = golden
  outputs = coco_head(golden_features, training=False)
  reference.assert_close_to_golden(outputs[name], forward[name], name)


def test_semantic_decoder_matches_golden(coco_head, golden, golden_features):
  endpoints, _ = golden
  reference.assert_close_to_golden(
      coco_head.semantic_decoder(golden_features),
      endpoints['predictor/semantic_decoder/output'],
      'semantic decoder output')


def test_encoder_stage_keys_are_relu_d_for_low_level(coco_head, golden,
                                                     golden_features):
  endpoints, _ = golden
  with_stages = {k: v for k, v in golden_features.items()
                 if k not in ('res2', 'res3')}
  with_stages.update({f'stage{i}': tf.constant(endpoints[f'encoder/stage{i}'])
                      for i in (2, 3)})
  # relu(stage) equals the golden res features exactly, so the two calls see
  # the same inputs; they agree to float32 rounding (1e-6 of absmax), while
  # unrectified stages would change the logits by O(absmax).
  expected = coco_head.semantic_logits(golden_features).numpy()
  np.testing.assert_allclose(coco_head.semantic_logits(with_stages), expected,
                             rtol=0, atol=1e-6 * np.abs(expected).max())


def test_void_bias_constant():
  assert heads.void_logit_bias(134) == pytest.approx(math.log(133 * 9))
  assert heads.void_logit_bias(20) == pytest.approx(math.log(19 * 9))
  def head_outputs(num_classes, ignore_label):
    return label_space.LabelSpace(num_classes, ignore_label, 1000,
                                  ()).class_head_outputs

  assert head_outputs(134, ignore_label=0) == 134
  assert head_outputs(19, ignore_label=255) == 20
  assert head_outputs(150, ignore_label=0) == 150


def test_void_bias_only_on_last_class(coco_head, golden_features):
  feature = golden_features['transformer_class_feature']
  raw = coco_head._transformer_class_head(feature).numpy()
  logits = coco_head.transformer_class_logits(feature).numpy()
  # The bias is added to the void logit only; the others are copies: exact.
  np.testing.assert_array_equal(logits[..., :-1], raw[..., :-1])
  np.testing.assert_allclose(logits[..., -1] - raw[..., -1],
                             math.log(133 * 9), rtol=0, atol=1e-3)


def test_pixel_embeddings_have_unit_norm(coco_head, golden_features):
  feature = coco_head.pixel_space_normalized_feature(
      golden_features['feature_panoptic'])
  np.testing.assert_allclose(np.linalg.norm(feature, axis=-1), 1.0, atol=1e-5)


def test_auxiliary_predictor_form_and_passthrough():
  head = heads.MaXDeepLabHead(num_classes=7, semantic_num_classes=None,
                              pixel_space_head_channels=16,
                              mask_embedding_channels=8)
  features = _random_inputs((6, 10), 32, 4, batch=2)
  marker = tf.constant([3.0])
  features['auxiliary_outputs_pred'] = ({'x': marker},)
  outputs = head(features)
  assert set(head.checkpoint_items) == {
      'pixel_space_head', 'transformer_mask_head', 'transformer_class_head',
      'pixel_space_feature_batch_norm', 'pixel_space_mask_batch_norm'}
  assert 'semantic_logits' not in outputs
  assert len(outputs['auxiliary_outputs_pred']) == 1
  assert outputs['auxiliary_outputs_pred'][0]['x'] is marker
  assert outputs['pixel_space_mask_logits'].shape == (2, 6, 10, 4)
  with pytest.raises(ValueError, match='semantic head'):
    head.semantic_logits(features)


def test_dynamic_shapes_under_tf_function(coco_head):
  spec = {
      'feature_panoptic': tf.TensorSpec([None, None, None, 256]),
      'transformer_class_feature': tf.TensorSpec([None, 128, 256]),
      'transformer_mask_feature': tf.TensorSpec([None, 128, 256]),
      'feature_semantic': tf.TensorSpec([None, None, None, 2048]),
      'res3': tf.TensorSpec([None, None, None, 512]),
      'res2': tf.TensorSpec([None, None, None, 256]),
  }
  fn = tf.function(lambda f: coco_head(f, training=False),
                   input_signature=[spec])
  # A 129x257 crop: stride 32 is 5x9, stride 8 17x33, stride 4 33x65.
  features = _random_inputs((33, 65), 256, 128, batch=2, semantic_hw=(5, 9))
  outputs = fn(features)
  assert outputs['semantic_logits'].shape == (2, 33, 65, 134)
  assert outputs['pixel_space_mask_logits'].shape == (2, 33, 65, 128)
  eager = coco_head(features, training=False)
  for name in ('semantic_logits', 'pixel_space_mask_logits'):
    np.testing.assert_allclose(outputs[name], eager[name], rtol=1e-4,
                               atol=1e-4 * np.abs(eager[name]).max())


def test_missing_inputs_raise(coco_head, golden_features):
  features = dict(golden_features)
  del features['transformer_mask_feature']
  with pytest.raises(KeyError, match='transformer_mask_feature'):
    coco_head(features)
  features = dict(golden_features)
  del features['res2']
  with pytest.raises(KeyError, match='res2'):
    coco_head(features)

"""The assembled kMaX-DeepLab against the DeepLab2 contract.

Checkpoint layout for every published config, the coco r50 forward golden
end to end, training-mode outputs, and initial-checkpoint restores.
"""

import csv
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import checkpoint_io
from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax import model as model_lib
from deeplab_kmax import model_summary
from deeplab_kmax.testing import reference

REPO = pathlib.Path(__file__).resolve().parents[1]

# Manifest name -> shipped config (equal to DeepLab2's, see tests/config).
MANIFEST_CONFIGS = {
    'coco_kmax_meta_r50_os32': 'configs/coco/kmax_meta_r50.textproto',
    'coco_kmax_meta_axial_r50_os32': 'configs/coco/kmax_meta_axial_r50.textproto',
    'coco_kmax_meta_convnext_tiny_os32':
        'configs/coco/kmax_meta_convnext_tiny.textproto',
    'coco_kmax_meta_convnext_small_os32':
        'configs/coco/kmax_meta_convnext_small.textproto',
    'coco_kmax_meta_convnext_base_os32':
        'configs/coco/kmax_meta_convnext_base.textproto',
    'coco_kmax_meta_convnext_large_os32':
        'configs/coco/kmax_meta_convnext_large.textproto',
    'cityscapes_kmax_meta_r50_os32': 'configs/cityscapes/kmax_meta_r50.textproto',
    'ade20k_kmax_meta_r50_os32': 'configs/ade20k/kmax_meta_r50.textproto',
}


def _load(relative_path):
  return config_lib.load_config(str(REPO / relative_path))


def _summary_rows(reference_dir):
  with open(reference_dir / 'manifests' / 'summary.tsv') as f:
    return {row['manifest']: row for row in csv.DictReader(f, delimiter='\t')}


@pytest.mark.slow
@pytest.mark.parametrize('manifest', sorted(MANIFEST_CONFIGS))
def test_checkpoint_layout_and_parameter_counts(manifest, reference_dir):
  """Keys and shapes equal DeepLab2's manifest; counts equal summary.tsv."""
  tf_keras.backend.clear_session()
  model = model_lib.build_model(_load(MANIFEST_CONFIGS[manifest]),
                                crop_size=(129, 129))
  expected = reference.read_manifest(
      reference_dir / 'manifests' / f'{manifest}.tsv')
  actual = reference.checkpoint_shapes(model.checkpoint_items)
  assert sorted(set(expected) - set(actual)) == []
  assert sorted(set(actual) - set(expected)) == []
  assert {k: v for k, v in actual.items() if expected[k] != v} == {}

  row = _summary_rows(reference_dir)[f'{manifest}.tsv']
  counts = model_summary.parameter_counts(model)
  assert counts.checkpoint_keys == int(row['n_checkpoint_keys'])
  assert counts.trainable_variables == int(row['n_trainable_variables'])
  assert counts.trainable_parameters == int(row['trainable_params'])
  assert counts.total_parameters == int(row['total_params'])
  assert sorted(model.checkpoint_items) == sorted(
      row['top_level_keys'].split(','))


@pytest.fixture(scope='module')
def coco_r50(reference_dir):
  """coco r50 at crop 129, filled by the reference weight rule."""
  model = model_lib.build_model(_load(MANIFEST_CONFIGS['coco_kmax_meta_r50_os32']),
                                crop_size=(129, 129))
  reference.fill_with_reference_rule(model.checkpoint_items)
  return model


@pytest.mark.slow
def test_forward_golden_end_to_end(coco_r50, reference_dir):
  golden = np.load(reference_dir / 'golden' / 'coco_kmax_r50_crop129_forward.npz')
  np.testing.assert_array_equal(golden['input'], reference.reference_input(0))
  outputs = coco_r50(golden['input'], training=False)
  # Pixel path: tight.
  for key in ('semantic_logits', 'pixel_space_normalized_feature'):
    np.testing.assert_allclose(outputs[key], golden[key], rtol=0, atol=1e-5)
  # Transformer path end to end: the reference shows eager and graph DeepLab2
  # differ by ~3e-3 of absmax here (one near-tie pixel flips), so ~1e-2.
  for key in ('transformer_class_logits', 'pixel_space_mask_logits'):
    scale = np.abs(golden[key]).max()
    assert np.abs(outputs[key] - golden[key]).max() <= 1e-2 * scale, key
  for key in ('panoptic_pred', 'instance_pred', 'semantic_pred'):
    np.testing.assert_array_equal(outputs[key], golden[key])
  for key in ('instance_scores', 'semantic_scores'):
    np.testing.assert_allclose(outputs[key], golden[key], atol=1e-3)


@pytest.mark.slow
def test_k_means_assignments_end_to_end(coco_r50, reference_dir):
  """Every block's argmax-over-clusters assignment matches DeepLab2's."""
  endpoints = np.load(
      reference_dir / 'golden' / 'coco_kmax_r50_crop129_endpoints.npz')
  outputs = coco_r50.predict_raw(reference.reference_input(0), training=False)
  auxiliary = outputs[keys.AUXILIARY_OUTPUTS]
  assert len(auxiliary) == 6
  for i, prediction in enumerate(auxiliary):
    expected = endpoints[f'transformer_decoder/aux{i}/pixel_space_mask_logits']
    actual = prediction['pixel_space_mask_logits'].numpy()
    assert actual.shape == expected.shape
    agree = np.argmax(actual, -1) == np.argmax(expected, -1)
    # Block 5 has 17 pixels within 1e-3 of a tie (README); allow those.
    assert (~agree).sum() <= (17 if i == 5 else 0), i


@pytest.mark.slow
def test_training_outputs_include_deep_supervision(coco_r50):
  images = tf.random.uniform([2, 65, 97, 3], 0, 255)
  outputs = coco_r50(images, training=True)
  mask_logits = outputs['pixel_space_mask_logits']
  assert mask_logits.shape == (2, 17, 25, 128)
  assert outputs['transformer_class_logits'].shape == (2, 128, 134)
  assert outputs['semantic_logits'].shape == (2, 17, 25, 134)
  assert 'panoptic_pred' not in outputs
  auxiliary = outputs[keys.AUXILIARY_OUTPUTS]
  assert len(auxiliary) == 6
  for prediction in auxiliary:
    # Resized to the final stride for the loss.
    assert prediction['pixel_space_mask_logits'].shape == mask_logits.shape
    assert prediction['pixel_space_normalized_feature'].shape == (2, 17, 25, 128)
    assert prediction['transformer_class_logits'].shape == (2, 128, 134)


@pytest.mark.slow
def test_inference_at_non_square_size_in_tf_function(coco_r50):
  forward = tf.function(
      lambda x: coco_r50(x, training=False),
      input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  outputs = forward(tf.random.uniform([1, 65, 129, 3], 0, 255))
  for key in ('panoptic_pred', 'semantic_pred', 'instance_pred',
              'instance_scores', 'semantic_scores'):
    assert outputs[key].shape == (1, 65, 129), key


@pytest.mark.slow
def test_initial_checkpoint_restores_and_reports(coco_r50, tmp_path):
  """A full checkpoint restores everything; class layers can be skipped."""
  path = tf.train.Checkpoint(**coco_r50.checkpoint_items).write(
      str(tmp_path / 'full'))
  fresh = model_lib.build_model(
      _load(MANIFEST_CONFIGS['coco_kmax_meta_r50_os32']), crop_size=(65, 65))
  report = fresh.restore_initial_checkpoint(
      path, restore_semantic_last_layer=False, restore_class_last_layer=False)
  assert report.missing == [] and report.unused == []
  # Semantic last layer (2) + final and six auxiliary class heads (7 x 2).
  assert len(report.skipped) == 2 + 14
  assert all('class_head' in k or k.startswith('semantic_last_layer')
             for k in report.skipped)
  source = checkpoint_io.variables_by_key(coco_r50.checkpoint_items)
  target = checkpoint_io.variables_by_key(fresh.checkpoint_items)
  for key in report.restored:
    np.testing.assert_array_equal(source[key].numpy(), target[key].numpy())
  for key in report.skipped:
    assert not np.array_equal(source[key].numpy(), target[key].numpy())


@pytest.mark.slow
def test_backbone_only_checkpoint(coco_r50, tmp_path):
  """Only the encoder is in the checkpoint: it is restored, the rest reported."""
  path = tf.train.Checkpoint(encoder=coco_r50.checkpoint_items['encoder']).write(
      str(tmp_path / 'backbone'))
  fresh = model_lib.build_model(
      _load(MANIFEST_CONFIGS['coco_kmax_meta_r50_os32']), crop_size=(65, 65))
  report = fresh.restore_initial_checkpoint(path)
  assert report.restored and all(k.startswith('encoder/') for k in report.restored)
  missing = report.missing_by_item()
  assert 'encoder' not in missing
  assert set(missing) == set(fresh.checkpoint_items) - {'encoder'}
  assert 'not restored: pixel_decoder' in report.summary()


def test_restore_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match='no_such_ckpt'):
    checkpoint_io.resolve_checkpoint_path(str(tmp_path / 'no_such_ckpt'))
  with pytest.raises(FileNotFoundError, match='No checkpoint found'):
    checkpoint_io.resolve_checkpoint_path(str(tmp_path))


def test_restore_shape_mismatch_names_the_key(tmp_path):
  source = tf_keras.layers.Dense(3)
  source.build([None, 4])
  path = tf.train.Checkpoint(head=source).write(str(tmp_path / 'ckpt'))
  target = tf_keras.layers.Dense(5)
  target.build([None, 4])
  with pytest.raises(ValueError, match='head/kernel.*\\(4, 3\\).*\\(4, 5\\)'):
    checkpoint_io.restore({'head': target}, path)


def test_unknown_backbone_is_rejected():
  config = config_lib.parse_config(
      'model_options { backbone { name: "kmax_vgg16" } }')
  with pytest.raises(ValueError, match='kmax_vgg16'):
    model_lib.build_pixel_encoder(config.model_options.backbone,
                                  tf_keras.layers.BatchNormalization)


def test_semantic_head_width_must_match_the_dataset():
  """The class head's width comes from the dataset's label space, so a
  config whose semantic head is sized for another dataset is rejected."""
  from deeplab_kmax.data import dataset_info  # pylint: disable=g-import-not-at-top
  config = _load(MANIFEST_CONFIGS['coco_kmax_meta_r50_os32'])
  with pytest.raises(ValueError, match=(
      r'auxiliary_semantic_head.output_channels is 134 but dataset '
      r"'cityscapes_panoptic' has num_classes=19")):
    model_lib.build_model(config,
                          dataset_info=dataset_info.CITYSCAPES_PANOPTIC)


def test_demo_config_builds_a_narrow_kmax(monkeypatch, tmp_path):
  """The CPU demo is the same architecture, scaled by the config extensions."""
  from deeplab_kmax.data import demo_dataset  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('DEMO_DIR', str(tmp_path))
  config = config_lib.expand_environment_variables(
      _load('configs/demo/kmax_demo.textproto'), 'train', strict=False)
  config_lib.validate(config)
  tf_keras.backend.clear_session()
  model = model_lib.build_model(config, dataset_info=demo_dataset.dataset_info(),
                                crop_size=(65, 65))
  counts = model_summary.parameter_counts(model)
  assert 3e6 < counts.trainable_parameters < 6e6
  assert model.transformer_decoder.cluster_centers.shape == (1, 32, 64)
  assert model.auxiliary_output_number == 6
  outputs = model(tf.random.uniform([1, 65, 65, 3], 0, 255), training=False)
  assert outputs['panoptic_pred'].shape == (1, 65, 65)
  assert outputs['transformer_class_logits'].shape == (1, 32, 7)

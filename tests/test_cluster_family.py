"""The clustering family end to end: configs, validation, model contract,
checkpoint compatibility with kMaX, training, evaluation and export.

Variants (docs/clustering_family.md): kMaX's `cluster_argmax` (the default,
covered by the golden tests), `cluster_softmax`, `spatial_softmax`, the CMT
decoder and the ClusterFormer decoder.
"""

import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import checkpoint_io
from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax import model as model_lib
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.layers import cluster_options
from deeplab_kmax.testing import reference

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / 'configs' / 'demo' / 'kmax_demo.textproto'
PREFIX = 'model_options.max_deeplab'
# Variant -> the clustering-family fields its configs set.
VARIANTS = cluster_options.VARIANTS
# Variables a variant adds to kMaX's (name fragments of checkpoint keys).
NEW_VARIABLES = {
    'cluster_softmax': (),
    'spatial_softmax': ('_cross_query_conv_bn', '_pixel_key_conv_bn'),
    'cmt': ('_cross_query_conv_bn', '_pixel_key_conv_bn',
            '_pixel_coordinate_conv', '_cross_attention_'),
    'clusterformer': ('_cluster_projection', 'dispatch_'),
}
CROP = 65


def _demo_config(monkeypatch, tmp_path, name='kmax_demo.textproto'):
  monkeypatch.setenv('DEMO_DIR', str(tmp_path))
  return config_lib.expand_environment_variables(
      config_lib.load_config(REPO / 'configs' / 'demo' / name), 'train',
      strict=False)


def _with_overrides(config, fields):
  return config_lib.override(
      config, {f'{PREFIX}.{key}': value for key, value in fields.items()})


def _clustering_fields(config) -> dict:
  options = config.model_options.max_deeplab
  return {field.name: value for field, value in options.ListFields()
          if field.name in ('pixel_cluster_interaction', 'cluster_decoder',
                            'clusterformer_iterations')}


# --- configs and validation (fast) -------------------------------------------


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_variant_configs_parse_validate_and_differ_only_in_the_family(
    variant, monkeypatch, tmp_path):
  base = _demo_config(monkeypatch, tmp_path)
  demo = _demo_config(monkeypatch, tmp_path, f'kmax_demo_{variant}.textproto')
  config_lib.validate(demo)
  assert _clustering_fields(demo) == VARIANTS[variant]
  assert demo.experiment_name == f'kmax_demo_{variant}'
  demo.experiment_name = base.experiment_name
  assert demo == _with_overrides(base, VARIANTS[variant])

  path = REPO / 'configs' / 'coco' / 'clustering' / (
      f'kmax_meta_r50_{variant}.textproto')
  coco = config_lib.validate(config_lib.load_config(path), source=str(path))
  assert _clustering_fields(coco) == VARIANTS[variant]
  assert f'--config_file=configs/coco/clustering/{path.name}' in (
      path.read_text())
  published = config_lib.load_config(
      REPO / 'configs' / 'coco' / 'kmax_meta_r50.textproto')
  coco.experiment_name = published.experiment_name
  assert coco == _with_overrides(published, VARIANTS[variant])


def test_command_line_override_selects_a_variant(monkeypatch, tmp_path):
  base = _demo_config(monkeypatch, tmp_path)
  config = config_lib.override(base, config_lib.parse_override_flags(
      [f'{PREFIX}.cluster_decoder=clusterformer',
       f'{PREFIX}.clusterformer_iterations=2']))
  config_lib.validate(config)
  assert config.model_options.max_deeplab.cluster_decoder == 'clusterformer'
  assert config.model_options.max_deeplab.clusterformer_iterations == 2


def test_defaults_are_kmax():
  options = config_lib.parse_config('').model_options.max_deeplab
  assert options.pixel_cluster_interaction == 'cluster_argmax'
  assert options.cluster_decoder == 'kmax'
  assert options.clusterformer_iterations == 3


@pytest.mark.parametrize('fields,message', [
    ({'pixel_cluster_interaction': 'argmax'},
     r"max_deeplab\.pixel_cluster_interaction is 'argmax'; expected one of "
     r"'cluster_argmax', 'cluster_softmax', 'spatial_softmax'"),
    ({'cluster_decoder': 'maskformer'},
     r"max_deeplab\.cluster_decoder is 'maskformer'; expected one of "
     r"'kmax', 'cmt', 'clusterformer'"),
    ({'cluster_decoder': 'cmt', 'pixel_cluster_interaction':
      'spatial_softmax'},
     r"pixel_cluster_interaction is 'spatial_softmax' but cluster_decoder "
     r'"cmt" adds its own cross-attention'),
    ({'cluster_decoder': 'clusterformer', 'pixel_cluster_interaction':
      'cluster_softmax'},
     r'"clusterformer" clusters with its own softmax'),
    ({'cluster_decoder': 'clusterformer', 'clusterformer_iterations': -1},
     r'clusterformer_iterations is -1; expected a value >= 0'),
    ({'clusterformer_iterations': 2},
     r"clusterformer_iterations is set but cluster_decoder is 'kmax'"),
])
def test_bad_values_are_rejected_naming_field_and_choices(
    fields, message, monkeypatch, tmp_path):
  config = _with_overrides(_demo_config(monkeypatch, tmp_path), fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, source='variant.textproto')


# --- models (slow) -----------------------------------------------------------


def _build(config, crop=CROP):
  tf_keras.backend.clear_session()
  return model_lib.build_model(config, dataset_info=demo_dataset.dataset_info(),
                               crop_size=(crop, crop))


def _shapes(outputs):
  shapes = {}
  for key, value in outputs.items():
    if key == keys.AUXILIARY_OUTPUTS:
      shapes[key] = tuple({k: tuple(v.shape) for k, v in sorted(d.items())}
                          for d in value)
    else:
      shapes[key] = tuple(value.shape)
  return shapes


@pytest.fixture(scope='module')
def kmax_reference(tmp_path_factory):
  """The default demo model: its output shapes and a kMaX checkpoint."""
  monkeypatch = pytest.MonkeyPatch()
  tmp_path = tmp_path_factory.mktemp('kmax')
  config = _demo_config(monkeypatch, tmp_path)
  monkeypatch.undo()
  model = _build(config)
  images = tf.random.uniform([2, CROP, CROP, 3], 0, 255, seed=1)
  shapes = (_shapes(model(images, training=False)),
            _shapes(model(images, training=True)))
  path = tf.train.Checkpoint(**model.checkpoint_items).write(
      str(tmp_path / 'kmax_ckpt'))
  variables = {k: v.numpy() for k, v in checkpoint_io.variables_by_key(
      model.checkpoint_items).items()}
  return shapes, path, variables


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_variant_keeps_output_contract_and_trains(variant, kmax_reference,
                                                  monkeypatch, tmp_path):
  (inference_shapes, training_shapes), _, _ = kmax_reference
  model = _build(_demo_config(monkeypatch, tmp_path,
                              f'kmax_demo_{variant}.textproto'))
  images = tf.random.uniform([2, CROP, CROP, 3], 0, 255, seed=1)
  assert _shapes(model(images, training=False)) == inference_shapes
  with tf.GradientTape() as tape:
    outputs = model(images, training=True)
    auxiliary = outputs[keys.AUXILIARY_OUTPUTS]
    loss = tf.reduce_sum(outputs[keys.PIXEL_SPACE_MASK_LOGITS] ** 2) + sum(
        tf.reduce_sum(a[keys.PIXEL_SPACE_MASK_LOGITS] ** 2)
        for a in auxiliary)
  assert _shapes(outputs) == training_shapes
  decoder = model.transformer_decoder
  grads = tape.gradient(loss, decoder.trainable_variables)
  unreached = [v.name for v, g in zip(decoder.trainable_variables, grads)
               if g is None and 'class' not in v.name]
  # Only the final block's centre update feeds nothing but the final heads
  # through the class path; every other decoder variable gets a gradient.
  assert len(unreached) < 0.2 * len(grads), unreached


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_kmax_checkpoint_restores_the_shared_parts(variant, kmax_reference,
                                                   monkeypatch, tmp_path):
  _, path, kmax_variables = kmax_reference
  model = _build(_demo_config(monkeypatch, tmp_path,
                              f'kmax_demo_{variant}.textproto'))
  report = model.restore_initial_checkpoint(path)
  assert report.unused == []
  new = NEW_VARIABLES[variant]
  assert all(any(f in key for f in new) for key in report.missing), (
      report.missing)
  assert bool(report.missing) == bool(new)
  assert set(report.restored) == set(kmax_variables)
  restored = checkpoint_io.variables_by_key(model.checkpoint_items)
  for key in report.restored:
    np.testing.assert_array_equal(restored[key].numpy(), kmax_variables[key])
  if new:
    assert 'not restored: transformer_decoder' in report.summary()


# --- training, evaluation and export (slow) ---------------------------------


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
  """4 train + 2 val demo images."""
  return demo_dataset.build(str(tmp_path_factory.mktemp('demo_data')),
                            num_train=4, num_val=2, seed=0, num_shards=1)


def _small_run_overrides(data) -> dict:
  overrides = {
      'trainer_options.solver_options.training_number_of_steps': 2,
      'trainer_options.solver_options.warmup_steps': 1,
      'trainer_options.save_checkpoints_steps': 2,
      # No image summary inside this short run (it costs a forward pass).
      'trainer_options.save_summaries_steps': 1000,
      'trainer_options.steps_per_loop': 2,
      'train_dataset_options.batch_size': 2,
      # Two images: eager evaluation is cheaper than tracing it.
      'evaluator_options.use_tf_function': False,
  }
  for split, pattern in (('train', data['train_pattern']),
                         ('eval', data['val_pattern'])):
    overrides.update({
        f'{split}_dataset_options.file_pattern': [pattern],
        f'{split}_dataset_options.dataset_descriptor': data['descriptor'],
        f'{split}_dataset_options.crop_size': [CROP, CROP],
        f'{split}_dataset_options.min_resize_value': [CROP],
        f'{split}_dataset_options.max_resize_value': [CROP],
    })
  return overrides


def _variant_config(variant, data, monkeypatch):
  """From the variant's config file, or (ClusterFormer) from the base config
  with the command-line override, as `--config_override` applies it."""
  monkeypatch.setenv('DEMO_DIR', str(pathlib.Path(data['descriptor']).parent))
  if variant == 'clusterformer':
    config = config_lib.override(
        config_lib.load_config(DEMO_CONFIG), config_lib.parse_override_flags(
            [f'{PREFIX}.cluster_decoder=clusterformer']))
  else:
    config = config_lib.load_config(
        REPO / 'configs' / 'demo' / f'kmax_demo_{variant}.textproto')
  return config_lib.override(config, _small_run_overrides(data))


# Variants run through the whole trainer (2-4 min each on the 2-core CI
# machine). One per code path the trainer can meet: the kMaX block with an
# interaction that adds layers (spatial_softmax; cluster_softmax only
# swaps the argmax for a softmax inside it) and a decoder of its own
# (clusterformer; CMT's decoder is traced in graph mode by its SavedModel
# test). Every variant's gradients, output contract and checkpoint keys
# are checked above and below.
END_TO_END = ('clusterformer', 'spatial_softmax')


@pytest.mark.slow
@pytest.mark.parametrize('variant', END_TO_END)
def test_variant_trains_and_evaluates(variant, demo_data, monkeypatch,
                                      tmp_path):
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top
  tf_keras.backend.clear_session()
  config = _variant_config(variant, demo_data, monkeypatch)
  fields = _clustering_fields(config)
  assert all(fields[key] == value for key, value in VARIANTS[variant].items()
             if key in fields)
  assert fields  # the variant is selected
  model_dir = str(tmp_path / 'run')
  result = train_lib.run_experiment(
      'train_and_eval', config, model_dir,
      strategy=tf.distribute.OneDeviceStrategy('CPU:0'))
  for key in ('evaluation/pq/PQ', 'evaluation/pq/PQ_thing',
              'evaluation/pq/PQ_stuff', 'evaluation/iou/mIoU'):
    assert 0.0 <= result[key] <= 1.0, key
  reader = tf.train.load_checkpoint(model_dir)
  assert reader.get_tensor('global_step/.ATTRIBUTES/VARIABLE_VALUE') == 2
  keys = reader.get_variable_to_shape_map()
  for fragment in NEW_VARIABLES[variant]:
    assert any(fragment in key for key in keys), fragment


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['cmt', 'clusterformer'])
def test_variant_exports_a_saved_model(variant, demo_data, monkeypatch,
                                       tmp_path):
  """The non-default decoders (new layers, new ops) export and serve the
  same maps as the Keras model."""
  from deeplab_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import serving  # pylint: disable=g-import-not-at-top
  from tests.export import helpers  # pylint: disable=g-import-not-at-top
  config = _variant_config(variant, demo_data, monkeypatch)
  config = config_lib.expand_environment_variables(config, 'eval',
                                                   strict=False)
  model = _build(config)
  reference.fill_with_reference_rule(model.checkpoint_items)
  module = serving.build_serving_module(model, config,
                                        info=demo_dataset.dataset_info())
  path = saved_model.write_saved_model(module, str(tmp_path / 'sm' / '1'))
  image = np.random.default_rng(0).integers(0, 255, (50, 60, 3), np.uint8)
  _, serve, _ = saved_model.load(path, keys.SIGNATURE_IMAGE)
  served = serve(**{keys.INPUT_IMAGE: tf.constant(image)})
  expected = helpers.keras_reference(model, config, image)
  for key in serving.NEAREST_OUTPUTS:
    assert served[key].shape == (50, 60), key
    if expected[key].dtype.kind == 'f':  # scores: graph vs eager rounding
      agree = np.mean(np.isclose(served[key].numpy(), expected[key],
                                 rtol=1e-4, atol=1e-4))
    else:  # label maps
      agree = np.mean(served[key].numpy() == expected[key])
    assert agree > 0.99, (key, agree)


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_coco_variant_builds_with_deeplab2_keys_plus_new_ones(variant,
                                                              reference_dir):
  """The COCO-sized variant (crop 129) holds every key of DeepLab2's COCO
  kMaX-R50 checkpoint with its shape, plus only the variant's additions."""
  path = REPO / 'configs' / 'coco' / 'clustering' / (
      f'kmax_meta_r50_{variant}.textproto')
  tf_keras.backend.clear_session()
  model = model_lib.build_model(config_lib.load_config(path),
                                crop_size=(129, 129))
  expected = reference.read_manifest(
      reference_dir / 'manifests' / 'coco_kmax_meta_r50_os32.tsv')
  actual = reference.checkpoint_shapes(model.checkpoint_items)
  assert sorted(set(expected) - set(actual)) == []
  assert {k: v for k, v in expected.items() if actual[k] != v} == {}
  added = sorted(set(actual) - set(expected))
  assert all(any(f in key for f in NEW_VARIABLES[variant]) for key in added)
  assert bool(added) == bool(NEW_VARIABLES[variant])
  outputs = model(tf.zeros([1, 129, 129, 3]), training=False)
  assert outputs['panoptic_pred'].shape == (1, 129, 129)

"""Serving in bfloat16 / with XLA: same outputs (keys, dtypes, maps)."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.export import model_loading
from deeplab_kmax.export import saved_model
from tests.trainer import demo_step

_CROP = 33
# Low thresholds, so the random-weight model's maps hold many segments and
# the comparison is not between two all-void maps.
_PERMISSIVE = {'pixel_confidence_threshold': 0.0}
_PERMISSIVE_MASKWISE = {'transformer_class_confidence_threshold_thing': 0.0,
                        'transformer_class_confidence_threshold_stuff': 0.0,
                        'overlapping_threshold': 0.0}


@pytest.fixture(name='exported', scope='module')
def fixture_exported(tmp_path_factory):
  """(config, float32 checkpoint, a test image)."""
  folder = tmp_path_factory.mktemp('precision_export')
  config = demo_step.demo_config()
  descriptor = folder / demo_dataset.DESCRIPTOR_FILE
  demo_dataset.dataset_info().save(str(descriptor))
  options = config.eval_dataset_options
  options.dataset_descriptor = str(descriptor)
  del options.crop_size[:]
  options.crop_size.extend([_CROP, _CROP])
  options.min_resize_value[:] = [_CROP]
  options.max_resize_value[:] = [_CROP]
  for name, value in _PERMISSIVE.items():
    setattr(config.evaluator_options, name, value)
  for name, value in _PERMISSIVE_MASKWISE.items():
    setattr(config.evaluator_options.maskwise_postprocessing, name, value)
  config.evaluator_options.thing_area_limit = 0
  config.evaluator_options.stuff_area_limit = 0
  model = demo_step.build_model(config, _CROP)
  checkpoint = tf.train.Checkpoint(**model.checkpoint_items).write(
      str(folder / 'ckpt'))
  image = demo_dataset.render_scene((3, 0, 0), _CROP, _CROP)[0]
  return config, checkpoint, image, folder


def _module(exported, **options):
  config, checkpoint, _, _ = exported
  return model_loading.build_serving_module_from_checkpoint(
      config, checkpoint, **options)


def _segments(panoptic: np.ndarray) -> int:
  return len(np.unique(panoptic))


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    'The untrained fixture model gives a one-segment float32 map on the '
    'redesigned demo scenes, so there is nothing to compare (2026-12-01); '
    'needs a fixture with filled weights. Issue 13 open.'))
def test_bfloat16_saved_model_matches_float32(exported):
  _, _, image, folder = exported
  reference = {k: v.numpy() for k, v in
               _module(exported).serve_image(tf.constant(image)).items()}
  path = saved_model.write_saved_model(
      _module(exported, precision='bfloat16'), str(folder / 'bf16'))
  _, serve, metadata = saved_model.load(path, keys.SIGNATURE_IMAGE)
  assert metadata['precision'] == 'bfloat16'
  outputs = {k: v.numpy() for k, v in
             serve(**{keys.INPUT_IMAGE: tf.constant(image)}).items()}
  assert sorted(outputs) == sorted(reference)
  for key, value in reference.items():
    assert outputs[key].dtype == value.dtype, key
    assert outputs[key].shape == value.shape, key
  panoptic = reference[keys.PANOPTIC_PRED]
  assert _segments(panoptic) >= 3  # A map worth comparing.
  agreement = float(np.mean(outputs[keys.PANOPTIC_PRED] == panoptic))
  print(f'bfloat16 vs float32 panoptic agreement: {agreement:.4f}')
  assert agreement >= 0.9


@pytest.mark.slow
def test_jit_compiled_serving_matches(exported):
  _, _, image, _ = exported
  plain = _module(exported).serve_image(tf.constant(image))
  compiled = _module(exported, jit_compile=True).serve_image(
      tf.constant(image))
  assert sorted(compiled) == sorted(plain)
  for key, value in plain.items():
    assert compiled[key].dtype == value.dtype, key
    if value.dtype.is_floating:
      np.testing.assert_allclose(compiled[key].numpy(), value.numpy(),
                                 atol=1e-4, err_msg=key)
  agreement = float(np.mean(compiled[keys.PANOPTIC_PRED].numpy() ==
                            plain[keys.PANOPTIC_PRED].numpy()))
  assert agreement >= 0.99, agreement


def test_unknown_serving_precision_is_rejected():
  with pytest.raises(ValueError, match="precision is 'int8'; expected one "
                     "of 'float32', 'bfloat16', 'float16'"):
    model_loading.build_serving_module_from_checkpoint(None, None,
                                                       precision='int8')

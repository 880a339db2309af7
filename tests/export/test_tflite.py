"""TFLite export: the demo model with its mask-wise merge, in tf.lite.

The demo config's model gets deterministic weights (`helpers.set_test_weights`:
identity batch norms and a sharpened class head, so that every demo image
has several confident segments). Each conversion takes about a minute on
two cores, so the converted models are shared by the module's tests.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax import model as model_lib
from deeplab_kmax import predict
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.export import serving
from deeplab_kmax.export import tflite_export
from tests.export import helpers

CONFIG = 'demo/kmax_demo'
# No area limits, so that the small segments of these weights stay (the
# demo images then have 4 to 9 segments each).
OVERRIDES = ('evaluator_options.thing_area_limit=0',
             'evaluator_options.stuff_area_limit=0')
ID_MAPS = (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED, keys.INSTANCE_PRED)
# Three validation scenes of the demo dataset.
IMAGES = tuple(demo_dataset.render_scene((0, 500_000, i))[0]
               for i in range(3))
# Panoptic pixels a quantized model must agree on with the float model:
# (least per image, mean over the images). float16 weights keep the maps;
# int8 weights with int8-quantized activations do not, on these weights:
# the keyed random weights give wide, untrained activation ranges, and the
# k-means argmax assignments flip wherever two centres are close, so whole
# segments change (measured 74%, 96% and 94% of the pixels). The bound
# below guards against gross conversion errors only; docs/tflite.md says
# that a trained checkpoint is needed to judge dynamic-range accuracy.
MIN_AGREEMENT = {'float16': (0.99, 0.99), 'dynamic_range': (0.6, 0.8)}


@functools.lru_cache(maxsize=None)
def _demo():
  config = config_lib.override(config_lib.load_config(CONFIG),
                              config_lib.parse_override_flags(OVERRIDES))
  info = demo_dataset.dataset_info()
  model = model_lib.build_model(config, dataset_info=info)
  helpers.set_test_weights(model)
  module = serving.build_serving_module(model, config, info=info)
  return config, model, module


@functools.lru_cache(maxsize=None)
def _exported(quantization: str, directory: str):
  _, _, module = _demo()
  path = f'{directory}/demo_{quantization}.tflite'
  conversion = tflite_export.export(module, path, quantization=quantization)
  return path, conversion


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tflite'))


def _padded(image):
  _, _, module = _demo()
  spec = serving.EvalPreprocessing.from_json_dict(
      module.metadata['preprocessing'])
  return spec(tf.constant(image[None]))[0].numpy()


def _keras_maps(padded):
  _, model, _ = _demo()
  outputs = model(tf.constant(padded), training=False)
  return {key: outputs[key].numpy() for key in serving.NEAREST_OUTPUTS}


def _num_segments(panoptic, info) -> int:
  ids = np.unique(panoptic)
  return int(np.sum(ids // info.panoptic_label_divisor != info.ignore_label))


@pytest.mark.slow
def test_float32_model_gives_the_keras_maps(workdir):
  path, conversion = _exported('none', workdir)
  # The whole graph, merge included, runs on TFLite builtins.
  assert conversion.select_tf_ops == ()
  assert {'WHILE', 'TOPK_V2', 'RESIZE_BILINEAR', 'CONV_2D'} <= set(
      conversion.ops)
  runner = tflite_export.TFLitePanopticPredictor(path)
  assert runner.crop_size == (129, 129)
  info = demo_dataset.dataset_info()
  for index, image in enumerate(IMAGES):
    padded = _padded(image)
    ours = runner.run_crop(padded)
    expected = _keras_maps(padded)
    assert _num_segments(expected[keys.PANOPTIC_PRED][0], info) >= 4
    for key in ID_MAPS:
      np.testing.assert_array_equal(ours[key], expected[key],
                                    err_msg=f'{key}, image {index}')
    for key in (keys.INSTANCE_SCORES, keys.SEMANTIC_SCORES):
      # Float rounding of the deep network: measured up to 2.1e-4.
      np.testing.assert_allclose(ours[key], expected[key], atol=1e-3,
                                 err_msg=f'{key}, image {index}')
    assert ours[keys.SEMANTIC_PROBS].shape == (1, 129, 129)


@pytest.mark.slow
def test_predict_cli_backend_matches_the_keras_eval_recipe(workdir):
  path, _ = _exported('none', workdir)
  config, model, _ = _demo()
  predictor = predict.tflite_predictor(path)
  assert predictor.info.name == demo_dataset.NAME
  assert 'TFLite' in predictor.description
  image = IMAGES[0][:100, :120]  # Another size than the crop.
  maps = predictor(image)
  expected = helpers.keras_reference(model, config, image)
  for key in ID_MAPS:
    assert maps[key].shape == image.shape[:2]
    np.testing.assert_array_equal(maps[key], expected[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize('quantization', ['float16', 'dynamic_range'])
def test_quantized_models_keep_the_panoptic_map(workdir, quantization):
  """Against the Keras maps, which the float32 TFLite model reproduces
  exactly (test above)."""
  path, conversion = _exported(quantization, workdir)
  assert conversion.select_tf_ops == ()
  runner = tflite_export.TFLitePanopticPredictor(path)
  assert runner.metadata['tflite']['quantization'] == quantization
  agreements = []
  for image in IMAGES:
    padded = _padded(image)
    ours = runner.run_crop(padded)[keys.PANOPTIC_PRED]
    expected = _keras_maps(padded)[keys.PANOPTIC_PRED]
    agreements.append(float(np.mean(ours == expected)))
  least, mean = MIN_AGREEMENT[quantization]
  assert min(agreements) >= least and np.mean(agreements) >= mean, (
      quantization, agreements)
  # The float32 model is cached from the first test when the module runs.
  _, float_conversion = _exported('none', workdir)
  assert len(conversion.model) < 0.6 * len(float_conversion.model)


def test_size_flag_and_preprocessing_for_size():
  assert tflite_export.parse_size('513x257') == (513, 257)
  assert tflite_export.parse_size('129') == (129, 129)
  with pytest.raises(ValueError, match='HxW'):
    tflite_export.parse_size('513x')
  spec = serving.EvalPreprocessing((129, 129), min_resize_value=(129, 129))
  assert tflite_export.preprocessing_for_size(spec, None) is spec
  smaller = tflite_export.preprocessing_for_size(spec, (65, 97))
  assert smaller.crop_size == (65, 97)
  assert smaller.min_resize_value == (65, 97)
  assert smaller.max_resize_value == (65, 97)
  with pytest.raises(ValueError, match='32'):
    tflite_export.preprocessing_for_size(spec, (64, 64))


def test_metadata_round_trip_and_bad_files(tmp_path):
  # A minimal valid TFLite model: one ADD, converted from a tf.function.
  @tf.function(input_signature=[tf.TensorSpec([2], tf.float32)])
  def add_one(x):
    return x + 1.0

  model = tf.lite.TFLiteConverter.from_concrete_functions(
      [add_one.get_concrete_function()], add_one).convert()
  with pytest.raises(ValueError, match='no kmax_serving_metadata'):
    tflite_export.read_metadata(model)
  tagged = tflite_export.with_metadata(model, {'a': 1})
  retagged = tflite_export.with_metadata(tagged, {'a': 2, 'b': [1, 2]})
  assert tflite_export.read_metadata(retagged) == {'a': 2, 'b': [1, 2]}
  assert tflite_export.op_names(retagged) == ['ADD']
  interpreter = tf.lite.Interpreter(model_content=retagged)
  interpreter.allocate_tensors()  # Still a loadable model.
  not_a_model = tmp_path / 'x.tflite'
  not_a_model.write_bytes(b'\x00' * 64)
  with pytest.raises(ValueError, match='not a TFLite flatbuffer'):
    tflite_export.TFLitePanopticPredictor(str(not_a_model))

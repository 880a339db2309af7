"""ONNX export (tf2onnx) and inference (onnxruntime + NumPy post-processing).

Marked `onnx`: they need the optional `deeplab_kmax[onnx]` packages (and
fail, rather than skip, without them) and the full-model conversion takes
about two minutes on two cores.
  python -m pytest -m onnx tests/export/test_onnx.py     # only these
  python -m pytest -m "not onnx" tests                   # all but these
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import predict
from deeplab_kmax.export import onnx_export
from deeplab_kmax.export import serving
from deeplab_kmax.layers import axial_attention
from tests.export import helpers

pytestmark = [pytest.mark.onnx, pytest.mark.slow]

@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """The test checkpoint exported by the CLI with --onnx_path."""
  onnx = onnx_export.require_optional('onnx')
  bundle = helpers.bundle()
  out = tmp_path_factory.mktemp('onnx')
  path = str(out / 'kmax.onnx')
  result = helpers.run_command(helpers.export_command(
      bundle.checkpoint_path, str(out / 'saved_model'),
      f'--onnx_path={path}'))
  assert result.returncode == 0, result.stderr[-5000:]
  return bundle, path, onnx.load(path)


def test_resize_ops_were_repaired(exported):
  """Strict ONNX shape inference accepts the model, with odd output sizes."""
  onnx = onnx_export.require_optional('onnx')
  _, _, proto = exported
  inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
  shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in inferred.graph.value_info}
  resized = [shapes[n.output[0]] for n in inferred.graph.node
             if n.op_type == 'Resize' and n.output[0] in shapes]
  assert resized
  for shape in resized:  # NCHW; corner-aligned sizes are 2^k + 1 here.
    assert all(side % 2 == 1 for side in shape[2:] if side), shape


def test_onnx_network_matches_tensorflow(exported):
  bundle, path, _ = exported
  predictor = onnx_export.OnnxPanopticPredictor(path)
  spec = serving.EvalPreprocessing.from_json_dict(
      predictor.metadata['preprocessing'])
  padded, _ = spec(tf.constant(helpers.sample_image()[None]))
  mask_logits, class_logits = predictor.network(padded.numpy())
  expected = bundle.model.predict_raw(padded, training=False)
  for ours, key in ((mask_logits, onnx_export.MASK_LOGITS),
                    (class_logits, onnx_export.CLASS_LOGITS)):
    reference = expected[key].numpy()
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, atol=1e-3 * scale, rtol=0,
                               err_msg=key)


def test_onnx_pipeline_gives_the_keras_panoptic_map(exported):
  bundle, path, _ = exported
  maps = onnx_export.OnnxPanopticPredictor(path)(helpers.sample_image())
  for key in (serving.PANOPTIC_PRED, serving.SEMANTIC_PRED,
              serving.INSTANCE_PRED):
    np.testing.assert_array_equal(maps[key], bundle.keras_maps[key],
                                  err_msg=key)
  for key in (serving.INSTANCE_SCORES, serving.SEMANTIC_SCORES):
    np.testing.assert_allclose(maps[key], bundle.keras_maps[key], atol=1e-3,
                               err_msg=key)
  # The CLI's --onnx_model predictor wraps the same thing.
  cli = predict.onnx_predictor(path)
  np.testing.assert_array_equal(
      cli(helpers.sample_image())[serving.PANOPTIC_PRED],
      maps[serving.PANOPTIC_PRED])
  assert cli.info.name == 'coco_panoptic'


def test_axial_attention_converts():
  """The relative-position expansion (slicing, not a gather) converts."""
  tf2onnx = onnx_export.require_optional('tf2onnx')
  onnxruntime = onnx_export.require_optional('onnxruntime')
  layer = axial_attention.AxialAttention2D(filters=32, strides=2,
                                           num_heads=4)
  features = np.random.default_rng(0).normal(size=(1, 9, 11, 64)).astype(
      np.float32)
  expected = layer(features, training=False).numpy()

  @tf.function(input_signature=[tf.TensorSpec([None, 9, 11, 64], tf.float32,
                                              name='features')])
  def attend(x):
    return {'attended': layer(x, training=False)}

  proto, _ = tf2onnx.convert.from_function(
      attend, input_signature=attend.input_signature,
      opset=onnx_export.DEFAULT_OPSET)
  session = onnxruntime.InferenceSession(
      proto.SerializeToString(), providers=['CPUExecutionProvider'])
  (ours,) = session.run(None, {'features': features})
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
  assert isinstance(layer, tf_keras.layers.Layer)

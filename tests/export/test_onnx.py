"""ONNX export (tf2onnx) of network + post-processing, run by onnxruntime.

Marked `onnx`: they need the optional `deeplab_kmax[onnx]` packages (and
fail, rather than skip, without them) and the full-model conversion takes
about two minutes on two cores.
  python -m pytest -m onnx tests/export/test_onnx.py     # only these
  python -m pytest -m "not onnx" tests                   # all but these
"""

import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax import post_processing
from deeplab_kmax import predict
from deeplab_kmax.data import label_space
from deeplab_kmax.export import onnx_export
from deeplab_kmax.export import serving
from deeplab_kmax.layers import axial_attention
from tests.export import helpers

pytestmark = [pytest.mark.onnx, pytest.mark.slow]

@pytest.fixture(scope='module')
def exported():
  """The test checkpoint exported by the CLI with --onnx_path (the same CLI
  run that writes the shared SavedModel, see helpers.bundle)."""
  onnx = onnx_export.require_optional('onnx')
  bundle = helpers.bundle(onnx=True)
  return bundle, bundle.onnx_path, onnx.load(bundle.onnx_path)


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


def test_onnx_graph_gives_the_tensorflow_maps_at_the_crop(exported):
  """The graph holds the merge too: crop in, the six serving maps out."""
  bundle, path, proto = exported
  assert {'Loop', 'TopK'} <= {node.op_type for node in proto.graph.node}
  predictor = onnx_export.OnnxPanopticPredictor(path)
  spec = serving.EvalPreprocessing.from_json_dict(
      predictor.metadata['preprocessing'])
  padded, _ = spec(tf.constant(helpers.sample_image()[None]))
  ours = predictor.network(padded.numpy())
  expected = serving.network_maps(bundle.model, padded)
  assert sorted(ours) == sorted(serving.OUTPUT_KEYS)
  for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED, keys.INSTANCE_PRED):
    np.testing.assert_array_equal(ours[key], expected[key].numpy(),
                                  err_msg=key)
  for key in (keys.INSTANCE_SCORES, keys.SEMANTIC_SCORES,
              keys.SEMANTIC_PROBS):
    np.testing.assert_allclose(ours[key], expected[key].numpy(), atol=1e-3,
                               err_msg=key)


def test_onnx_pipeline_gives_the_keras_panoptic_map(exported):
  bundle, path, _ = exported
  maps = onnx_export.OnnxPanopticPredictor(path)(helpers.sample_image())
  for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED,
              keys.INSTANCE_PRED):
    np.testing.assert_array_equal(maps[key], bundle.keras_maps[key],
                                  err_msg=key)
  for key in (keys.INSTANCE_SCORES, keys.SEMANTIC_SCORES):
    np.testing.assert_allclose(maps[key], bundle.keras_maps[key], atol=1e-3,
                               err_msg=key)
  # The same maps as the SavedModel's, whose resize and undo the predictor
  # shares.
  saved = predict.saved_model_predictor(bundle.saved_model_dir)(
      helpers.sample_image())
  for key in serving.OUTPUT_KEYS:
    np.testing.assert_allclose(maps[key], saved[key], atol=1e-3, rtol=0,
                               err_msg=key)
  # The CLI's --onnx_model predictor wraps the same thing.
  cli = predict.onnx_predictor(path)
  np.testing.assert_array_equal(
      cli(helpers.sample_image())[keys.PANOPTIC_PRED],
      maps[keys.PANOPTIC_PRED])
  assert cli.info.name == 'coco_panoptic'


def test_post_processing_converts_exactly():
  """The mask-wise merge (rank-order gather, while loop, area limits with
  1-D segment ids) and the class marginal run in ONNX as in TensorFlow."""
  tf2onnx = onnx_export.require_optional('tf2onnx')
  onnxruntime = onnx_export.require_optional('onnxruntime')
  space = label_space.LabelSpace(7, 0, 1000, [1, 2, 3])
  processor = post_processing.MaskWisePostProcessor(
      space, thing_confidence_threshold=0.3, stuff_confidence_threshold=0.3,
      thing_area_limit=20, stuff_area_limit=40)
  # A stand-in network: mask logits at stride 4 (9 x 13 for a 33 x 49
  # crop), class logits from the spatial mean.
  model = types.SimpleNamespace(
      predict_raw=lambda logits, training: {
          keys.PIXEL_SPACE_MASK_LOGITS: logits[:, ::4, ::4, :8],
          keys.TRANSFORMER_CLASS_LOGITS: tf.reshape(
              tf.reduce_mean(logits, axis=[1, 2])[:, 8:], [-1, 8, 7])},
      post_processor=processor)

  @tf.function(input_signature=[tf.TensorSpec([None, 33, 49, 64], tf.float32,
                                              name='logits')])
  def merge(logits):
    maps = serving.network_maps(model, logits)
    return {key: tf.identity(value, name=key) for key, value in maps.items()}

  proto, _ = tf2onnx.convert.from_function(
      merge, input_signature=merge.input_signature,
      opset=onnx_export.DEFAULT_OPSET)
  session = onnxruntime.InferenceSession(
      proto.SerializeToString(), providers=['CPUExecutionProvider'])
  names = [output.name for output in session.get_outputs()]
  rng = np.random.default_rng(0)
  for _ in range(3):
    logits = (4 * rng.standard_normal((2, 33, 49, 64))).astype(np.float32)
    logits[..., 8:] *= 50  # Confident classes after the spatial mean.
    ours = dict(zip(names, session.run(None, {'logits': logits})))
    expected = {key: value.numpy() for key, value in merge(logits).items()}
    for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED, keys.INSTANCE_PRED):
      np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    for key in (keys.INSTANCE_SCORES, keys.SEMANTIC_SCORES,
                keys.SEMANTIC_PROBS):
      # Probabilities: float32 rounding of differently ordered sums.
      np.testing.assert_allclose(ours[key], expected[key], atol=1e-5,
                                 rtol=0, err_msg=key)
  # Not a trivial case: segments survive, and the area limits void some.
  assert len(np.unique(ours[keys.PANOPTIC_PRED])) > 3
  assert np.any(ours[keys.PANOPTIC_PRED] == 0)


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

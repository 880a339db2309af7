"""Serving pre/post-processing (the TF graph), without the model."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax import post_processing as pp
from deeplab_kmax.data import label_space
from deeplab_kmax.data import preprocessing
from deeplab_kmax.export import serving
from deeplab_kmax.testing import reference

_SPEC_129 = serving.EvalPreprocessing(crop_size=(129, 129),
                                      min_resize_value=(129,),
                                      max_resize_value=(129,))


def test_preprocessing_matches_deeplab2_eval_input(reference_dir):
  """The in-graph resize + pad reproduces DeepLab2's eval sample."""
  records = np.load(reference_dir / 'tfrecord' / 'decoded_records.npz')
  golden = np.load(reference_dir / 'golden' / 'sample_eval_example0.npz')
  image = records['record0/image_decoded_uint8']  # 48 x 64
  padded, size = _SPEC_129(tf.constant(image[None]))
  assert size.numpy().tolist() == list(golden['resized_image'].shape[1:3])
  # Resized pixels are computed floats: float32 rounding may depend on the
  # CPU, so 1e-6 relative and 1e-6 of the largest value (255), a few ulps.
  np.testing.assert_allclose(padded.numpy(), golden['image'], rtol=1e-6,
                             atol=1e-6 * 255)


@pytest.mark.parametrize('shape,spec', [
    ((48, 64), _SPEC_129),
    ((200, 31), _SPEC_129),
    ((1, 1), _SPEC_129),
    ((300, 500), serving.EvalPreprocessing((161, 257), None, None)),
    ((100, 120), serving.EvalPreprocessing((129, 129), (65,), (129,),
                                           resize_factor=16)),
])
def test_preprocessing_matches_input_pipeline(shape, spec):
  image = np.random.default_rng(0).integers(0, 256, shape + (3,), np.uint8)
  resized, expected, _ = preprocessing.preprocess(
      tf.constant(image), None, crop_size=spec.crop_size, is_training=False,
      label_pad_value=0, min_resize_value=spec.min_resize_value,
      max_resize_value=spec.max_resize_value,
      resize_factor=spec.resize_factor)
  padded, size = spec(tf.constant(image[None]))
  assert tuple(size.numpy()) == tuple(resized.shape[:2])
  # The same recipe as the data pipeline: equal to float32 rounding of
  # pixels up to 255.
  np.testing.assert_allclose(padded.numpy()[0], expected.numpy(), rtol=1e-6,
                             atol=1e-6 * 255)


def test_preprocessing_rejects_crop_smaller_than_max_resize():
  with pytest.raises(ValueError, match='exceeds the crop size'):
    serving.EvalPreprocessing((129, 129), max_resize_value=(257,))


def test_preprocessing_round_trips_through_json():
  spec = serving.EvalPreprocessing((129, 257), (65,), (129, 257), 8)
  assert serving.EvalPreprocessing.from_json_dict(
      json.loads(json.dumps(spec.to_json_dict()))) == spec


def test_undo_preprocessing_matches_deeplab2_recipe():
  rng = np.random.default_rng(1)
  maps = {keys.PANOPTIC_PRED: rng.integers(0, 999, (2, 129, 129),
                                              dtype=np.int32),
          keys.SEMANTIC_PROBS: rng.random((2, 129, 129), np.float32)}
  resized, raw = (96, 129), (48, 64)
  restored = preprocessing.undo_eval_preprocessing(
      {k: tf.constant(v) for k, v in maps.items()}, tf.constant(resized),
      tf.constant(raw), serving.BILINEAR_OUTPUTS)
  for key, method in ((keys.PANOPTIC_PRED, 'nearest'),
                      (keys.SEMANTIC_PROBS, 'bilinear')):
    method = (tf.compat.v1.image.ResizeMethod.NEAREST_NEIGHBOR
              if method == 'nearest' else
              tf.compat.v1.image.ResizeMethod.BILINEAR)
    expected = tf.cast(tf.compat.v1.image.resize(
        maps[key][:, :96, :129, None], raw, method=method,
        align_corners=True)[..., 0], maps[key].dtype).numpy()
    if key == keys.PANOPTIC_PRED:  # Nearest neighbour copies ids: exact.
      np.testing.assert_array_equal(restored[key].numpy(), expected)
    else:  # Bilinear probabilities in [0, 1]: float32 rounding.
      np.testing.assert_allclose(restored[key].numpy(), expected, rtol=0,
                                 atol=1e-6)


def _golden_setup(reference_dir):
  case = dict(np.load(reference_dir / 'golden' / 'post_processing_case.npz'))
  with open(reference_dir / 'golden' / 'post_processing_case.json') as f:
    info = json.load(f)
  # COCO: void 0 is one of the 134 semantic classes, as in the class head.
  space = label_space.LabelSpace(info['num_class_logits'], info['void_label'],
                                 info['label_divisor'], info['thing_class_ids'])
  settings = pp.MaskWisePostProcessor.from_options(
      reference.golden_evaluator_options(info['evaluator_options']),
      space).options
  return case, info, space, settings


def test_semantic_probs_is_the_class_marginal(reference_dir):
  """semantic_probs equals sum_k p(k|x) p(c|k) at semantic_pred."""
  case, _, space, settings = _golden_setup(reference_dir)
  mask_logits = case['pixel_space_mask_logits'][:1]  # [1, 33, 33, N]
  class_logits = case['transformer_class_logits'][:1]
  size = (65, 65)
  tf_maps = pp.maskwise_panoptic_inference(mask_logits, class_logits, size,
                                           space, settings)
  semantic = tf_maps['semantic_pred']
  probs = serving.semantic_class_probability(
      tf.constant(mask_logits), tf.constant(class_logits),
      tf_maps[keys.SEMANTIC_CLASS_INDEX]).numpy()
  # The full marginal [H, W, C + 1] by brute force.
  marginal = np.einsum('bhwn,bnc->bhwc', tf.nn.softmax(mask_logits).numpy(),
                       tf.nn.softmax(class_logits).numpy())
  np.testing.assert_allclose(marginal.sum(-1), 1.0, atol=1e-5)
  upsampled = tf.raw_ops.ResizeBilinear(images=marginal, size=size,
                                        align_corners=True).numpy()
  index = np.searchsorted(np.asarray(space.semantic_ids), semantic.numpy())
  expected = np.take_along_axis(upsampled, index[..., None], -1)[..., 0]
  np.testing.assert_allclose(probs, expected, atol=1e-5)
  assert 0.0 <= probs.min() and probs.max() <= 1.0 + 1e-6
  assert len(np.unique(semantic.numpy())) > 1

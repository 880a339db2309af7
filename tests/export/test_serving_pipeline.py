"""Serving pre/post-processing (TF graph and NumPy twin), without the model."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import post_processing as pp
from deeplab_kmax.data import preprocessing
from deeplab_kmax.export import numpy_pipeline
from deeplab_kmax.export import serving

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
  # pixels up to 255 (the NumPy twin below is looser).
  np.testing.assert_allclose(padded.numpy()[0], expected.numpy(), rtol=1e-6,
                             atol=1e-6 * 255)
  # The NumPy twin: same size, same pixels up to float rounding.
  np_padded, np_size = numpy_pipeline.preprocess(image[None], spec)
  assert np_size == tuple(resized.shape[:2])
  np.testing.assert_allclose(np_padded, padded.numpy(), atol=2e-4, rtol=0)


def test_preprocessing_rejects_crop_smaller_than_max_resize():
  with pytest.raises(ValueError, match='exceeds the crop size'):
    serving.EvalPreprocessing((129, 129), max_resize_value=(257,))


def test_preprocessing_round_trips_through_json():
  spec = serving.EvalPreprocessing((129, 257), (65,), (129, 257), 8)
  assert serving.EvalPreprocessing.from_json_dict(
      json.loads(json.dumps(spec.to_json_dict()))) == spec


def test_undo_preprocessing_matches_deeplab2_recipe():
  rng = np.random.default_rng(1)
  maps = {serving.PANOPTIC_PRED: rng.integers(0, 999, (2, 129, 129),
                                              dtype=np.int32),
          serving.SEMANTIC_PROBS: rng.random((2, 129, 129), np.float32)}
  resized, raw = (96, 129), (48, 64)
  restored = serving.undo_preprocessing(
      {k: tf.constant(v) for k, v in maps.items()}, tf.constant(resized),
      tf.constant(raw))
  for key, method in ((serving.PANOPTIC_PRED, 'nearest'),
                      (serving.SEMANTIC_PROBS, 'bilinear')):
    method = (tf.compat.v1.image.ResizeMethod.NEAREST_NEIGHBOR
              if method == 'nearest' else
              tf.compat.v1.image.ResizeMethod.BILINEAR)
    expected = tf.cast(tf.compat.v1.image.resize(
        maps[key][:, :96, :129, None], raw, method=method,
        align_corners=True)[..., 0], maps[key].dtype).numpy()
    if key == serving.PANOPTIC_PRED:  # Nearest neighbour copies ids: exact.
      np.testing.assert_array_equal(restored[key].numpy(), expected)
    else:  # Bilinear probabilities in [0, 1]: float32 rounding.
      np.testing.assert_allclose(restored[key].numpy(), expected, rtol=0,
                                 atol=1e-6)
    ours = numpy_pipeline.undo_preprocessing(maps, resized, raw)[key]
    np.testing.assert_allclose(ours, restored[key].numpy(), atol=1e-6)


@pytest.mark.parametrize('in_size,out_size', [((33, 33), (129, 129)),
                                              ((9, 7), (5, 13)),
                                              ((1, 4), (3, 1))])
def test_numpy_resizes_match_tensorflow(in_size, out_size):
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2,) + in_size + (3,)).astype(np.float32)
  expected = tf.raw_ops.ResizeBilinear(images=images, size=out_size,
                                       align_corners=True).numpy()
  np.testing.assert_allclose(numpy_pipeline.resize_bilinear(images, out_size),
                             expected, atol=1e-6, rtol=1e-6)
  ids = rng.integers(0, 100, (2,) + in_size, dtype=np.int32)
  expected = tf.raw_ops.ResizeNearestNeighbor(
      images=ids[..., None], size=out_size, align_corners=True)[..., 0]
  np.testing.assert_array_equal(numpy_pipeline.resize_nearest(ids, out_size),
                                expected.numpy())


def _assert_semantic_equal_but_near_ties(ours, expected, mask_logits, size):
  """semantic_pred is argmax over slots of upsampled logits, then a lookup.

  Two float32 implementations (and one on two CPUs) may break a near-tie
  differently, so pixels whose top-2 upsampled logits are within 1e-5 of the
  largest logit (many float32 ulps) may differ; they must be rare (<= 2).
  """
  upsampled = numpy_pipeline.resize_bilinear(mask_logits, size)  # [B, H, W, N]
  top2 = np.sort(upsampled, axis=-1)[..., -2:]
  near_ties = top2[..., 1] - top2[..., 0] < 1e-5 * np.abs(mask_logits).max()
  differs = ours != expected
  assert not np.any(differs & ~near_ties), np.argwhere(differs & ~near_ties)
  assert differs.sum() <= 2, differs.sum()


def _golden_setup(reference_dir):
  case = dict(np.load(reference_dir / 'golden' / 'post_processing_case.npz'))
  with open(reference_dir / 'golden' / 'post_processing_case.json') as f:
    info = json.load(f)
  space = pp.PanopticLabelSpace.derive(
      info['num_class_logits'] - 1, info['thing_class_ids'],
      info['void_label'], info['label_divisor'])
  options = info['evaluator_options']
  settings = pp.MaskWisePostProcessor.from_options(
      dict(options, maskwise_postprocessing=options['maskwise']),
      thing_class_ids=info['thing_class_ids'],
      ignore_label=info['void_label'],
      label_divisor=info['label_divisor']).options
  return case, info, space, settings


def test_numpy_postprocess_matches_deeplab2_golden(reference_dir):
  case, info, space, settings = _golden_setup(reference_dir)
  maps = numpy_pipeline.maskwise_postprocess(
      case['pixel_space_mask_logits'], case['transformer_class_logits'],
      info['image_shape'], space, settings)
  for key in ('panoptic_pred', 'instance_pred', 'semantic_pred'):
    np.testing.assert_array_equal(maps[key], case['out_' + key], err_msg=key)
  for key in ('instance_scores', 'semantic_scores'):
    np.testing.assert_allclose(maps[key], case['out_' + key], atol=1e-5,
                               err_msg=key)
  assert len(np.unique(maps['panoptic_pred'][0])) > 3  # Not a trivial case.


def test_corner_aligned_lookup_reads_the_upsampled_table():
  rng = np.random.default_rng(4)
  table = rng.random((2, 5, 7, 6)).astype(np.float32)
  channel = rng.integers(0, 6, (2, 17, 25)).astype(np.int32)
  upsampled = tf.raw_ops.ResizeBilinear(images=table, size=(17, 25),
                                        align_corners=True).numpy()
  expected = np.take_along_axis(upsampled, channel[..., None], -1)[..., 0]
  ours = serving.corner_aligned_lookup(tf.constant(table),
                                       tf.constant(channel)).numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-6)
  np.testing.assert_allclose(
      numpy_pipeline.corner_aligned_lookup(table, channel), expected,
      atol=1e-6)


def test_semantic_probs_is_the_class_marginal(reference_dir):
  """TF and NumPy agree, and equal sum_k p(k|x) p(c|k) at semantic_pred."""
  case, _, space, settings = _golden_setup(reference_dir)
  mask_logits = case['pixel_space_mask_logits'][:1]  # [1, 33, 33, N]
  class_logits = case['transformer_class_logits'][:1]
  size = (65, 65)
  tf_maps = pp.maskwise_panoptic_inference(mask_logits, class_logits, size,
                                           space, settings)
  semantic = tf_maps['semantic_pred']
  probs = serving.semantic_class_probability(
      tf.constant(mask_logits), tf.constant(class_logits),
      serving.class_index_of(semantic, space)).numpy()
  np_maps = numpy_pipeline.maskwise_postprocess(mask_logits, class_logits,
                                                size, space, settings)
  _assert_semantic_equal_but_near_ties(np_maps['semantic_pred'],
                                       semantic.numpy(), mask_logits, size)
  same = np_maps['semantic_pred'] == semantic.numpy()  # Probs of one class.
  np.testing.assert_allclose(np_maps['semantic_probs'][same], probs[same],
                             atol=1e-5)
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


def test_numpy_postprocess_matches_tensorflow_with_area_limits():
  rng = np.random.default_rng(3)
  mask_logits = (4 * rng.standard_normal((2, 9, 13, 16))).astype(np.float32)
  class_logits = (5 * rng.standard_normal((2, 16, 6))).astype(np.float32)
  space = pp.PanopticLabelSpace.derive(5, [1, 2], 0, 100)
  settings = pp.MaskWiseOptions(thing_confidence_threshold=0.3,
                                stuff_confidence_threshold=0.3,
                                thing_area_limit=30, stuff_area_limit=60)
  size = (33, 49)
  expected = pp.maskwise_panoptic_inference(mask_logits, class_logits, size,
                                            space, settings)
  ours = numpy_pipeline.maskwise_postprocess(mask_logits, class_logits, size,
                                             space, settings)
  for key in ('panoptic_pred', 'instance_pred'):
    np.testing.assert_array_equal(ours[key], expected[key].numpy(),
                                  err_msg=key)
  _assert_semantic_equal_but_near_ties(ours['semantic_pred'],
                                       expected['semantic_pred'].numpy(),
                                       mask_logits, size)
  for key in ('instance_scores', 'semantic_scores'):
    np.testing.assert_allclose(ours[key], expected[key].numpy(), atol=1e-5)
  assert len(np.unique(ours['panoptic_pred'])) > 4

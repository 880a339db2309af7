"""Tests for mask-wise panoptic post-processing."""

import dataclasses
import json
import types

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax import post_processing as pp
from deeplab_kmax.config import evaluator_pb2
from deeplab_kmax.data import dataset_info
from deeplab_kmax.data import label_space
from deeplab_kmax.ops import resize
from deeplab_kmax.testing import reference

_INT_KEYS = ('panoptic_pred', 'instance_pred', 'semantic_pred')
_FLOAT_KEYS = ('instance_scores', 'semantic_scores')


# ---------------------------------------------------------------------------
# The DeepLab2 golden case (COCO settings).
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def golden(reference_dir):
  case = np.load(reference_dir / 'golden' / 'post_processing_case.npz')
  with open(reference_dir / 'golden' / 'post_processing_case.json') as f:
    info = json.load(f)
  return dict(case), info


def _golden_space(info):
  # COCO: void 0 is one of the 134 semantic classes, as in the class head.
  return label_space.LabelSpace(info['num_class_logits'], info['void_label'],
                                info['label_divisor'], info['thing_class_ids'])


def _golden_layer(info):
  h, w = info['image_shape']
  return pp.MaskWisePostProcessor.from_options(
      reference.golden_evaluator_options(info['evaluator_options']),
      _golden_space(info), output_size=(h, w))


def _assert_matches_golden(outputs, case, float_atol):
  for key in _INT_KEYS:
    np.testing.assert_array_equal(np.asarray(outputs[key]), case['out_' + key],
                                  err_msg=key)
    assert outputs[key].dtype == tf.int32
  for key in _FLOAT_KEYS:
    np.testing.assert_allclose(np.asarray(outputs[key]), case['out_' + key],
                               atol=float_atol, rtol=0, err_msg=key)
    assert outputs[key].dtype == tf.float32


def test_golden_case_eager(golden):
  case, info = golden
  layer = _golden_layer(info)
  outputs = layer(case['pixel_space_mask_logits'],
                  case['transformer_class_logits'])
  assert set(outputs) == set(_INT_KEYS + _FLOAT_KEYS)
  _assert_matches_golden(outputs, case, float_atol=1e-6)


def test_golden_case_maskwise_semantic_map(golden):
  case, info = golden
  space = _golden_space(info)
  assert space.stuff_class_ids == tuple(info['stuff_class_ids'])
  outputs = pp.maskwise_panoptic_inference(
      case['pixel_space_mask_logits'], case['transformer_class_logits'],
      info['image_shape'], space, _golden_layer(info).options)
  np.testing.assert_array_equal(outputs[keys.MASKWISE_SEMANTIC_PRED].numpy(),
                                case['raw_maskwise_semantic_map'])


def test_golden_case_designed_outcomes(golden):
  """Kept slots carry id semantic * 256 + (1 + reorder rank) for things."""
  case, info = golden
  panoptic = case['out_panoptic_pred'][0]
  outputs = _golden_layer(info)(case['pixel_space_mask_logits'],
                                case['transformer_class_logits'])
  ours = outputs['panoptic_pred'].numpy()[0]
  for slot in info['designed_slots_example0']:
    expected = slot['semantic_id'] * info['label_divisor']
    if slot['is_thing']:
      expected += slot['reorder_rank'] + 1
    present = np.any(ours == expected)
    assert present == slot['design_intent'].startswith('kept'), slot['tag']
    assert present == np.any(panoptic == expected), slot['tag']


def test_golden_case_tf_function_dynamic_shapes(golden):
  case, info = golden
  layer = _golden_layer(info)
  fn = tf.function(layer, input_signature=[
      tf.TensorSpec([None, None, None, None], tf.float32),
      tf.TensorSpec([None, None, info['num_class_logits']], tf.float32)])
  _assert_matches_golden(
      fn(case['pixel_space_mask_logits'], case['transformer_class_logits']),
      case, float_atol=1e-6)


def test_golden_case_xla(golden):
  case, info = golden
  layer = _golden_layer(info)
  fn = tf.function(layer, jit_compile=True)
  _assert_matches_golden(
      fn(case['pixel_space_mask_logits'], case['transformer_class_logits']),
      case, float_atol=1e-5)


# ---------------------------------------------------------------------------
# A slow, loop-based reference of the same algorithm, written from the
# description in the module docstring, in float64.
# ---------------------------------------------------------------------------


def _softmax(x, axis=-1):
  x = x.astype(np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _resize_align_corners(image, out_h, out_w):
  """Bilinear resize of [h, w, c] where corner pixels map onto corners."""
  h, w = image.shape[:2]
  out = np.zeros((out_h, out_w, image.shape[2]))
  for i in range(out_h):
    y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(y))
    y1 = min(y0 + 1, h - 1)
    dy = y - y0
    for j in range(out_w):
      x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(x))
      x1 = min(x0 + 1, w - 1)
      dx = x - x0
      out[i, j] = ((1 - dy) * ((1 - dx) * image[y0, x0] + dx * image[y0, x1]) +
                   dy * ((1 - dx) * image[y1, x0] + dx * image[y1, x1]))
  return out


def _reference_post_processing(mask_logits, class_logits, out_hw, things,
                               stuff, ignore, divisor, opts):
  """Returns the five outputs and, per image, the near-tie pixel mask."""
  table = list(things) + list(stuff)
  batch, _, _, num_slots = mask_logits.shape
  out_h, out_w = out_hw
  results = {key: [] for key in _INT_KEYS + _FLOAT_KEYS}
  near_ties = []
  for b in range(batch):
    class_probs = _softmax(class_logits[b])[:, :-1]
    cls = class_probs.argmax(-1)
    conf = class_probs.max(-1)
    probs = _softmax(mask_logits[b])
    quality = np.zeros(num_slots)
    for n in range(num_slots):
      claimed = probs[..., n] > opts.pixel_confidence_threshold
      if claimed.any():
        quality[n] = probs[..., n][claimed].mean()
    score = (conf**opts.reorder_class_weight *
             quality**opts.reorder_mask_weight)
    order = sorted(range(num_slots), key=lambda n: -score[n])  # stable

    upsampled = _resize_align_corners(mask_logits[b], out_h, out_w)
    up_probs = _softmax(upsampled)
    canvas = np.zeros((out_h, out_w), np.int64)
    for rank, n in enumerate(order):
      is_thing = cls[n] < len(things)
      threshold = (opts.thing_confidence_threshold if is_thing else
                   opts.stuff_confidence_threshold)
      if conf[n] < threshold:
        continue
      mask = up_probs[..., n] > opts.pixel_confidence_threshold
      free = mask & (canvas == 0)
      if free.sum() > opts.overlapping_threshold * mask.sum():
        canvas[free] = rank + 1

    panoptic = np.full((out_h, out_w), ignore * divisor, np.int64)
    semantic_scores = np.zeros((out_h, out_w))
    stuff_regions = {}
    for rank_plus_one in np.unique(canvas[canvas > 0]):
      region = canvas == rank_plus_one
      n = order[rank_plus_one - 1]
      semantic_scores[region] = conf[n]
      if cls[n] < len(things):
        if region.sum() >= opts.thing_area_limit:
          panoptic[region] = table[cls[n]] * divisor + rank_plus_one
      else:
        stuff_regions[cls[n]] = stuff_regions.get(cls[n], False) | region
    for c, region in stuff_regions.items():
      if region.sum() >= opts.stuff_area_limit:
        panoptic[region] = table[c] * divisor

    has_detection = np.any(conf >= min(opts.thing_confidence_threshold,
                                       opts.stuff_confidence_threshold))
    top2 = np.sort(upsampled, axis=-1)[..., -2:]
    near_ties.append(top2[..., 1] - top2[..., 0] < 1e-4)
    results['panoptic_pred'].append(panoptic)
    results['instance_pred'].append(np.maximum(canvas, 1))
    results['semantic_pred'].append(
        np.asarray(table)[cls[upsampled.argmax(-1)]])
    results['instance_scores'].append(
        up_probs.max(-1) if has_detection else np.zeros((out_h, out_w)))
    results['semantic_scores'].append(semantic_scores)
  return {k: np.stack(v) for k, v in results.items()}, np.stack(near_ties)


# ---------------------------------------------------------------------------
# Cityscapes-like random designed cases.
# ---------------------------------------------------------------------------

_CITYSCAPES_THINGS = tuple(range(11, 19))
_CITYSCAPES_STUFF = tuple(range(11))


def _logits_for_confidence(rng, num_logits, target_class, confidence):
  """Class logits whose softmax gives `target_class` the given probability."""
  logits = rng.standard_normal(num_logits)
  logits[-1] += 2.0
  others = np.delete(logits, target_class)
  logits[target_class] = np.log(confidence / (1 - confidence) *
                                np.exp(others).sum())
  return logits


def _designed_case(seed, batch=2, grid=(13, 17), num_slots=256,
                   num_designed=14, empty_images=()):
  """Rectangular masks with chosen classes/confidences, plus duplicates."""
  rng = np.random.default_rng(seed)
  num_logits = len(_CITYSCAPES_THINGS) + len(_CITYSCAPES_STUFF) + 1
  h, w = grid
  mask_logits = -2.0 + 0.3 * rng.standard_normal((batch, h, w, num_slots))
  class_logits = rng.standard_normal((batch, num_slots, num_logits))
  class_logits[..., -1] += 6.0
  for b in range(batch):
    if b in empty_images:
      continue
    slots = rng.choice(num_slots, num_designed, replace=False)
    rect = None
    for i, slot in enumerate(slots):
      if i % 4 == 3 and rect is not None:
        # A shifted near-duplicate of the previous mask, sometimes the same
        # class, to exercise the overlap rule.
        r0, r1, c0, c1 = rect
        dr, dc = rng.integers(-1, 2, size=2)
        rect = (max(r0 + dr, 0), min(r1 + dr, h), max(c0 + dc, 0),
                min(c1 + dc, w))
      else:
        r0, c0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
        rect = (r0, min(r0 + rng.integers(1, 8), h), c0,
                min(c0 + rng.integers(1, 10), w))
      target = rng.integers(0, num_logits - 1)
      confidence = rng.uniform(0.2, 0.99)
      class_logits[b, slot] = _logits_for_confidence(rng, num_logits, target,
                                                     confidence)
      r0, r1, c0, c1 = rect
      mask_logits[b, r0:r1, c0:c1, slot] += 10.0
  return mask_logits.astype(np.float32), class_logits.astype(np.float32)


def _cityscapes_options(**overrides):
  values = dict(pixel_confidence_threshold=0.4,
                thing_confidence_threshold=0.5,
                stuff_confidence_threshold=0.3,
                overlapping_threshold=0.9,
                reorder_class_weight=1.0,
                reorder_mask_weight=0.0,
                thing_area_limit=40,
                stuff_area_limit=120)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def _cityscapes_layer(opts, output_size=None):
  return pp.MaskWisePostProcessor(
      dataset_info.CITYSCAPES_PANOPTIC.label_space, output_size=output_size,
      **vars(opts))


def _compare_with_reference(mask_logits, class_logits, out_hw, opts):
  outputs = _cityscapes_layer(opts)(mask_logits, class_logits, out_hw)
  expected, near_ties = _reference_post_processing(
      mask_logits, class_logits, out_hw, _CITYSCAPES_THINGS,
      _CITYSCAPES_STUFF, 255, 1000, opts)
  for key in ('panoptic_pred', 'instance_pred'):
    np.testing.assert_array_equal(outputs[key].numpy(), expected[key],
                                  err_msg=key)
  # The threshold-free argmax may only differ where two slots nearly tie.
  differs = outputs['semantic_pred'].numpy() != expected['semantic_pred']
  assert not np.any(differs & ~near_ties)
  assert differs.sum() <= 2
  for key in _FLOAT_KEYS:
    np.testing.assert_allclose(outputs[key].numpy(), expected[key], atol=1e-5,
                               err_msg=key)
  return outputs, expected


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_matches_loop_reference_at_logit_resolution(seed):
  mask_logits, class_logits = _designed_case(seed)
  opts = _cityscapes_options(thing_area_limit=6, stuff_area_limit=15)
  outputs, expected = _compare_with_reference(mask_logits, class_logits,
                                              (13, 17), opts)
  # The designed cases must actually produce several segments.
  assert len(np.unique(expected['panoptic_pred'])) >= 4


@pytest.mark.parametrize('seed', [10, 11])
def test_matches_loop_reference_with_upsampling(seed):
  mask_logits, class_logits = _designed_case(seed)
  # Stride 4: 13x17 logits -> 49x65 pixels; area limits in output pixels.
  opts = _cityscapes_options(reorder_mask_weight=1.0)
  _, expected = _compare_with_reference(mask_logits, class_logits, (49, 65),
                                        opts)
  things = expected['panoptic_pred'] % 1000
  assert things.max() > 0 and np.any(expected['panoptic_pred'] == 255000)


def test_area_limits_are_per_image_and_void_filled():
  mask_logits, class_logits = _designed_case(5)
  loose = _cityscapes_layer(_cityscapes_options(thing_area_limit=0,
                                                stuff_area_limit=0))
  strict = _cityscapes_layer(_cityscapes_options(thing_area_limit=30,
                                                 stuff_area_limit=60))
  a = loose(mask_logits, class_logits, (25, 33))['panoptic_pred'].numpy()
  b = strict(mask_logits, class_logits, (25, 33))['panoptic_pred'].numpy()
  changed = a != b
  assert changed.any()
  assert np.all(b[changed] == 255 * 1000)
  for image in range(a.shape[0]):
    for segment in np.unique(a[image][changed[image]]):
      area = np.sum(a[image] == segment)
      limit = 30 if segment % 1000 else 60
      assert area < limit


def test_empty_image_gives_void_and_zero_scores():
  mask_logits, class_logits = _designed_case(7, empty_images=(1,))
  opts = _cityscapes_options(thing_area_limit=0, stuff_area_limit=0)
  outputs, _ = _compare_with_reference(mask_logits, class_logits, (13, 17),
                                       opts)
  assert np.all(outputs['panoptic_pred'].numpy()[1] == 255000)
  assert np.all(outputs['instance_pred'].numpy()[1] == 1)
  assert np.all(outputs['instance_scores'].numpy()[1] == 0)
  assert np.all(outputs['semantic_scores'].numpy()[1] == 0)
  assert np.any(outputs['instance_scores'].numpy()[0] > 0)
  space = dataset_info.CITYSCAPES_PANOPTIC.label_space
  raw = pp.maskwise_panoptic_inference(mask_logits, class_logits, (13, 17),
                                       space, _cityscapes_layer(opts).options)
  assert np.all(raw[keys.MASKWISE_SEMANTIC_PRED].numpy()[1] == 0)


def test_dynamic_shapes_and_xla_agree_with_eager():
  mask_logits, class_logits = _designed_case(3, batch=3)
  layer = _cityscapes_layer(_cityscapes_options(), output_size=(25, 33))
  eager = layer(mask_logits, class_logits)
  dynamic = tf.function(layer, input_signature=[
      tf.TensorSpec([None, None, None, None], tf.float32),
      tf.TensorSpec([None, None, 20], tf.float32)])
  xla = tf.function(layer, jit_compile=True)
  for outputs in (dynamic(mask_logits, class_logits),
                  xla(mask_logits, class_logits)):
    for key in _INT_KEYS:
      np.testing.assert_array_equal(outputs[key].numpy(), eager[key].numpy())
    for key in _FLOAT_KEYS:
      np.testing.assert_allclose(outputs[key].numpy(), eager[key].numpy(),
                                 atol=1e-5)


def test_upsampling_is_corner_aligned_bilinear():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((1, 5, 7, 3)).astype(np.float32)
  ours = resize.bilinear(logits, (17, 25)).numpy()[0]
  np.testing.assert_allclose(ours, _resize_align_corners(logits[0], 17, 25),
                             atol=1e-5)
  np.testing.assert_array_equal(ours[::4, ::4], logits[0])


def test_convertible_forms_equal_the_batched_ops():
  """The ONNX-convertible rank-order gather and per-image segment areas
  equal the direct batched ops, exactly."""
  rng = np.random.default_rng(5)
  masks = tf.constant(rng.random((3, 40, 7)) > 0.6)  # [B, P, N]
  rank_to_slot = tf.constant(np.stack([rng.permutation(7) for _ in range(3)]),
                             tf.int32)
  np.testing.assert_array_equal(
      pp.masks_in_rank_order(masks, rank_to_slot).numpy(),
      tf.gather(masks, rank_to_slot, axis=-1, batch_dims=1).numpy())
  ids = rng.integers(0, 5, (3, 40)).astype(np.int32)
  expected = np.stack([np.bincount(row, minlength=5)[row] for row in ids])
  np.testing.assert_array_equal(
      pp._area_of_own_segment(tf.constant(ids), 5).numpy(), expected)


def test_config_round_trip_and_from_options():
  opts = _cityscapes_options()
  layer = _cityscapes_layer(opts, output_size=(13, 17))
  clone = pp.MaskWisePostProcessor.from_config(layer.get_config())
  assert clone.get_config() == layer.get_config()
  evaluator_options = evaluator_pb2.EvaluatorOptions(
      transformer_post_processing='maskwise',
      pixel_confidence_threshold=0.4, thing_area_limit=40,
      stuff_area_limit=120,
      maskwise_postprocessing=evaluator_pb2.EvaluatorOptions.
      MaskwisePostProcessingOptions(
          transformer_class_confidence_threshold_thing=0.5,
          transformer_class_confidence_threshold_stuff=0.3,
          overlapping_threshold=0.9, reorder_class_weight=1.0,
          reorder_mask_weight=0.0))
  built = pp.MaskWisePostProcessor.from_options(
      evaluator_options, dataset_info.CITYSCAPES_PANOPTIC.label_space,
      output_size=(13, 17))
  # The proto stores float32: equal to the Python floats to that rounding.
  assert dataclasses.asdict(built.options) == pytest.approx(
      dataclasses.asdict(layer.options), rel=1e-7)
  mask_logits, class_logits = _designed_case(4)
  a = clone(mask_logits, class_logits)
  b = built(mask_logits, class_logits)
  for key in _INT_KEYS:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_defaults_are_the_protos():
  """The dataclass and the layer default to what an unset config gives."""
  from_proto = pp.MaskWisePostProcessor.from_options(
      evaluator_pb2.EvaluatorOptions(transformer_post_processing='maskwise'),
      dataset_info.CITYSCAPES_PANOPTIC.label_space).options
  assert pp.MaskWiseOptions() == from_proto
  layer = pp.MaskWisePostProcessor(
      dataset_info.CITYSCAPES_PANOPTIC.label_space)
  assert layer.options == from_proto
  # DeepLab2's values, to float32 rounding.
  assert dataclasses.asdict(from_proto) == pytest.approx(dict(
      pixel_confidence_threshold=0.4, thing_confidence_threshold=0.7,
      stuff_confidence_threshold=0.7, overlapping_threshold=0.5,
      reorder_class_weight=1.0, reorder_mask_weight=0.0,
      thing_area_limit=0, stuff_area_limit=0), rel=1e-7)


def test_label_space_orders_things_first():
  space = label_space.LabelSpace(19, 255, 1000, _CITYSCAPES_THINGS)
  assert space.semantic_ids == _CITYSCAPES_THINGS + _CITYSCAPES_STUFF
  coco = label_space.LabelSpace(134, 0, 256, range(1, 81))
  assert coco.semantic_ids == tuple(range(1, 134))


def test_bad_inputs_raise_clear_errors():
  layer = _cityscapes_layer(_cityscapes_options())
  mask_logits, class_logits = _designed_case(0, batch=1)
  with pytest.raises(ValueError, match='output size'):
    layer(mask_logits, class_logits)
  with pytest.raises(ValueError, match='non-void classes'):
    layer(mask_logits, class_logits[..., 1:], (13, 17))
  with pytest.raises(ValueError, match=r'\[B, h, w, N\]'):
    layer(mask_logits[0], class_logits, (13, 17))
  with pytest.raises(ValueError, match='slots'):
    layer(mask_logits, class_logits[:, :10], (13, 17))
  with pytest.raises(ValueError, match='maskwise'):
    pp.MaskWisePostProcessor.from_options(
        evaluator_pb2.EvaluatorOptions(
            transformer_post_processing='pixelwise'),
        dataset_info.CITYSCAPES_PANOPTIC.label_space)
  with pytest.raises(ValueError, match='distinct'):
    label_space.LabelSpace(4, 0, 256, (1, 2, 2))


def test_two_claim_paste_is_taken_only_where_it_is_exact():
  assert pp.uses_two_claim_paste(0.4, 128)
  assert not pp.uses_two_claim_paste(0.3, 128)  # three slots may claim
  assert not pp.uses_two_claim_paste(0.4, None)  # slot count unknown
  assert not pp.uses_two_claim_paste(0.4, 1)


@pytest.mark.parametrize('overlapping_threshold', [0.0, 0.5, 0.8, 0.95])
def test_two_claim_paste_equals_the_dense_paste(overlapping_threshold):
  """The count-based paste gives the dense loop's canvas, bit for bit, on
  masks with many two-slot overlaps (blobby logits, batch of two)."""
  rng = np.random.default_rng(int(overlapping_threshold * 100))
  coarse = rng.standard_normal((2, 4, 5, 24)).astype(np.float32) * 4
  probs = tf.nn.softmax(resize.bilinear(coarse, (31, 41)) + 0.3 *
                        rng.standard_normal((2, 31, 41, 24)).astype(
                            np.float32))
  probs = tf.reshape(probs, [2, -1, 24])
  rank_to_slot = tf.constant(
      np.stack([rng.permutation(24) for _ in range(2)]), tf.int32)
  pasteable = tf.constant(rng.random((2, 24)) > 0.2)
  claims = probs > 0.4
  dense = pp.paste_masks_in_order(
      pp.masks_in_rank_order(claims, rank_to_slot), pasteable,
      overlapping_threshold)
  top_probs, claim_slots = pp.top_two_slots(probs)
  two_claim = pp.paste_two_claim_masks(claim_slots, top_probs > 0.4,
                                       rank_to_slot, pasteable,
                                       overlapping_threshold)
  # The case has real overlaps, and some masks lose to them.
  assert np.sum(np.sum(claims.numpy(), axis=-1) == 2) > 20
  np.testing.assert_array_equal(two_claim.numpy(), dense.numpy())
  assert len(np.unique(dense.numpy())) > 5


@pytest.mark.parametrize('threshold', [0.34, 0.4, 0.45])
def test_claiming_slots_claim_what_the_dense_pass_claims(threshold):
  """Same first slot and probability everywhere and the same claimed
  (slot, probability) pairs as the dense two-argmax pass, on blobby masks
  whose borders are shared and with exact ties; some pixels have two
  claimants, and the second pass ran on a part of the pixels only."""
  rng = np.random.default_rng(7)
  coarse = rng.standard_normal((2, 5, 6, 30)).astype(np.float32) * 6
  logits = resize.bilinear(coarse, (40, 47)).numpy().reshape(2, -1, 30)
  logits[0, :4] = 0.0  # every slot tied
  logits[0, 4, [3, 9]] = 50.0  # two slots tied at 0.5
  probs = tf.nn.softmax(logits)
  dense_probs, dense_slots = pp.top_two_slots(probs)
  probs_, slots = pp.claiming_slots(probs, threshold)
  np.testing.assert_array_equal(slots[..., 0].numpy(),
                                dense_slots[..., 0].numpy())
  np.testing.assert_array_equal(probs_[..., 0].numpy(),
                                dense_probs[..., 0].numpy())
  claimed = (dense_probs > threshold).numpy()
  np.testing.assert_array_equal((probs_ > threshold).numpy(), claimed)
  np.testing.assert_array_equal(slots.numpy()[claimed],
                                dense_slots.numpy()[claimed])
  np.testing.assert_array_equal(probs_.numpy()[claimed],
                                dense_probs.numpy()[claimed])
  assert claimed[..., 1].sum() > 5 and claimed[0, 4, 1]
  gathered = np.sum(probs_.numpy()[..., 1] > 0)
  assert 0 < gathered < 0.5 * claimed[..., 0].size


def test_claiming_slots_under_xla_take_the_dense_pass():
  probs = tf.nn.softmax(np.random.default_rng(8).standard_normal(
      (1, 50, 9)).astype(np.float32) * 3)
  xla = tf.function(lambda p: pp.claiming_slots(p, 0.4), jit_compile=True)
  dense = pp.top_two_slots(probs)
  for got, expected in zip(xla(probs), dense):
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_top_two_slots_are_top_k():
  """Same slots and probabilities as tf.math.top_k(k=2) without ties; with
  ties, the same probabilities and the same claimed set above 0.34."""
  rng = np.random.default_rng(3)
  probs = tf.nn.softmax(rng.standard_normal((2, 500, 37)).astype(np.float32)
                        * 3)
  values, slots = pp.top_two_slots(probs)
  expected = tf.math.top_k(probs, k=2)
  np.testing.assert_array_equal(slots.numpy(), expected.indices.numpy())
  np.testing.assert_array_equal(values.numpy(), expected.values.numpy())

  tied = np.zeros((1, 4, 6), np.float32)
  tied[0, 0, [1, 4]] = 0.5  # two-way tie for first: both claim
  tied[0, 1, :5] = 0.2  # five-way tie: nothing claims
  tied[0, 2, [0, 2, 5]] = [0.4, 0.3, 0.3]  # tie for second: one claim
  tied[0, 3, [3, 5]] = [0.25, 0.75]
  values, slots = pp.top_two_slots(tf.constant(tied))
  expected = tf.math.top_k(tied, k=2)
  np.testing.assert_array_equal(values.numpy(), expected.values.numpy())
  for row in range(4):
    claimed = {int(s) for s, v in zip(slots[0, row], values[0, row])
               if v > pp.TWO_CLAIMS_MIN_THRESHOLD}
    assert claimed == set(np.flatnonzero(tied[0, row] > 0.34)), row
  assert sorted(slots[0, 0].numpy().tolist()) == [1, 4]

"""KMaXLoss against DeepLab2's goldens, a numpy reference, and in TF modes."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import label_space
from deeplab_kmax.losses import kmax_loss
from tests.losses import synthetic_case



def _golden(reference_dir, name):
  golden = reference_dir / 'golden'
  arrays = np.load(golden / f'{name}.npz')
  info = json.loads((golden / f'{name}.json').read_text())
  y_true = {k[len('gt/'):]: tf.constant(arrays[k])
            for k in arrays.files if k.startswith('gt/')}
  y_pred = {k[len('pred/'):]: tf.constant(arrays[k]) for k in arrays.files
            if k.startswith('pred/') and not k.startswith('pred/aux')}
  num_aux = info['loss_facts']['auxiliary_output_number']
  if num_aux:
    y_pred['auxiliary_outputs_pred'] = [
        {k.split('/')[-1]: tf.constant(arrays[k]) for k in arrays.files
         if k.startswith(f'pred/aux{i}/')} for i in range(num_aux)]
  return arrays, info, y_true, y_pred


# KMaXLoss argument <- option recorded in the golden's loss_facts.
_FACT_FOR_ARGUMENT = {
    'pq_style_weight': 'pq_style_loss_weight',
    'mask_id_cross_entropy_weight': 'mask_id_cross_entropy_loss_weight',
    'instance_discrimination_weight': 'instance_discrimination_loss_weight',
    'instance_discrimination_sample_k': 'instance_discrimination_sample_k',
    'instance_discrimination_sample_temperature':
        'instance_discrimination_sample_temperature',
    'semantic_weight': 'semantic_loss_weight',
    'auxiliary_output_number': 'auxiliary_output_number',
}


def _coco_loss(facts, **kwargs):
  options = {arg: facts[fact] for arg, fact in _FACT_FOR_ARGUMENT.items()}
  return kmax_loss.KMaXLoss(dataset_info_lib.COCO_PANOPTIC.label_space,
                            **options, **kwargs)


def _tensors(tree):
  return tf.nest.map_structure(tf.constant, tree)


@pytest.mark.parametrize('name', ['loss_case', 'loss_case_aux'])
def test_matches_deeplab2_golden(reference_dir, name):
  arrays, info, y_true, y_pred = _golden(reference_dir, name)
  loss = _coco_loss(info['loss_facts'])
  losses = loss(y_true, y_pred)  # Graph and XLA modes are tested below.

  assert sorted(losses) == sorted(info['loss_facts']['loss_names'])
  assert loss.loss_names == info['loss_facts']['loss_names']
  batch = arrays['gt/semantic_gt'].shape[0]
  for term, value in losses.items():
    assert value.shape == [batch], term
    # Goldens vary by ~1e-6 over seeds on the sampled term; aim at 1e-5.
    np.testing.assert_allclose(value.numpy(), arrays[f'loss/{term}'],
                               rtol=1e-5, atol=0, err_msg=term)


@pytest.mark.parametrize('name', ['loss_case', 'loss_case_aux'])
def test_matching_matches_deeplab2_debug_arrays(reference_dir, name):
  arrays, info, y_true, y_pred = _golden(reference_dir, name)
  loss = _coco_loss(info['loss_facts'])
  targets = loss.mask_targets(y_true, y_pred)
  matching = tf.function(loss.match)(y_true, y_pred)
  valid = targets.mask_valid.numpy()
  np.testing.assert_array_equal(valid.sum(1), info['n_valid_gt_masks'])
  golden_weights = arrays['debug/hungarian_weights']
  # DeepLab2 fills void rows with +999 when rows (181) outnumber slots (128):
  # a constant, so exact.
  np.testing.assert_array_equal(golden_weights[~valid], 999.0)
  # The costs are float32 sums over pixels; their rounding depends on the
  # CPU's vector width (AVX2 vs AVX-512 differ by up to 7e-7 relative, 3e-7
  # of the largest cost). 1e-6 relative plus 1e-6 of the largest cost is a
  # few float32 ulps, far below the spread of the costs.
  costs = matching.costs.numpy()[valid]  # [valid masks, slots]
  scale = np.abs(golden_weights[valid]).max()
  np.testing.assert_allclose(costs, golden_weights[valid], rtol=1e-6,
                             atol=1e-6 * scale)
  # Which slot each mask gets is the discrete outcome: exact.
  slots = np.where(valid, matching.slot_for_mask.numpy(), -1)
  np.testing.assert_array_equal(slots, arrays['debug/matched_slot_for_gt_mask'])


def test_exact_matcher_is_at_least_as_good_on_golden(reference_dir):
  arrays, info, y_true, y_pred = _golden(reference_dir, 'loss_case_aux')
  costs = arrays['debug/hungarian_weights']
  dl2_slots = arrays['debug/matched_slot_for_gt_mask']
  exact = _coco_loss(info['loss_facts'], matcher='exact')
  slots = exact.match(y_true, y_pred).slot_for_mask.numpy()
  for b in range(costs.shape[0]):
    rows = np.nonzero(dl2_slots[b] >= 0)[0]
    exact_cost = costs[b, rows, slots[b, rows]].astype(np.float64).sum()
    dl2_cost = costs[b, rows, dl2_slots[b, rows]].astype(np.float64).sum()
    # The exact matcher optimises our float32 costs, which equal the golden
    # costs to ~1e-6 relative (see above), so on the golden costs it is
    # optimal up to that rounding summed over the matched rows.
    rounding = 1e-6 * np.abs(costs[b, rows]).max() * len(rows)
    assert exact_cost <= dl2_cost + rounding
    assert dl2_cost - exact_cost < 1e-4  # DeepLab2 is optimal up to rounding.


@pytest.mark.parametrize('num_slots', [12, 24])  # Fewer / more slots than rows.
def test_matches_numpy_reference(num_slots):
  case = synthetic_case.make_case(seed=7, batch=2, num_slots=num_slots)
  out_pixels = case.y_pred['pixel_space_mask_logits'].shape[1] ** 2
  loss = kmax_loss.KMaXLoss(
      synthetic_case.LABEL_SPACE, instance_discrimination_sample_k=out_pixels,
      matcher='exact')
  losses = loss(_tensors(case.y_true), _tensors(case.y_pred))
  expected = synthetic_case.reference_losses(case)
  for term, value in expected.items():
    np.testing.assert_allclose(losses[term].numpy(), value, rtol=2e-5,
                               err_msg=term)
  np.testing.assert_allclose(losses['total_loss'].numpy(),
                             sum(expected.values()), rtol=2e-5)


def test_void_after_the_classes_gives_the_same_losses():
  """ignore_label == num_classes (void outside the ids) is the same dataset
  as void 0 with every id shifted down by one: same class-head width, same
  losses."""
  case = synthetic_case.make_case(seed=2)
  out_pixels = case.y_pred['pixel_space_mask_logits'].shape[1] ** 2
  # No probability on the void channel, so dropping it keeps the softmax.
  case.y_pred['semantic_logits'][..., 0] = -1e9
  void = synthetic_case.NUM_CLASSES - 1  # Classes 1..10 become 0..9.
  shifted_space = label_space.LabelSpace(
      void, void, 256, [c - 1 for c in synthetic_case.THING_IDS])
  assert (shifted_space.class_head_outputs ==
          synthetic_case.LABEL_SPACE.class_head_outputs)
  semantic = case.y_true['semantic_gt']
  thing_class = case.y_true['thing_id_class_gt']
  shifted_true = dict(
      case.y_true,
      semantic_gt=np.where(semantic == synthetic_case.IGNORE_LABEL, void,
                           semantic - 1).astype(np.int32),
      thing_id_class_gt=np.where(thing_class >= 0, thing_class - 1,
                                 -1).astype(np.int32))
  shifted_pred = dict(case.y_pred,
                      semantic_logits=case.y_pred['semantic_logits'][..., 1:])
  options = dict(instance_discrimination_sample_k=out_pixels, matcher='exact')
  expected = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE, **options)(
      _tensors(case.y_true), _tensors(case.y_pred))
  losses = kmax_loss.KMaXLoss(shifted_space, **options)(
      _tensors(shifted_true), _tensors(shifted_pred))
  assert set(losses) == set(expected)
  for term, value in expected.items():
    np.testing.assert_allclose(losses[term].numpy(), value.numpy(), rtol=1e-5,
                               err_msg=term)


@pytest.mark.parametrize('num_slots', [12, 24])
def test_deeplab2_matcher_agrees_with_exact_on_distinct_costs(num_slots):
  # Costs here are far apart relative to float32 rounding, so both matchers
  # find the same optimum.
  case = synthetic_case.make_case(seed=3, batch=2, num_slots=num_slots)
  y_true, y_pred = _tensors(case.y_true), _tensors(case.y_pred)
  common = dict(instance_discrimination_weight=None, semantic_weight=None)
  dl2 = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE, **common)
  exact = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE, matcher='exact',
                             **common)
  valid = dl2.mask_targets(y_true, y_pred).mask_valid.numpy()
  np.testing.assert_array_equal(
      np.where(valid, dl2.match(y_true, y_pred).slot_for_mask, -1),
      np.where(valid, exact.match(y_true, y_pred).slot_for_mask, -1))


def test_auxiliary_outputs_reuse_the_main_matching():
  case = synthetic_case.make_case(seed=5, num_aux=2)
  # An auxiliary output identical to the final one gets identical losses.
  case.y_pred['auxiliary_outputs_pred'][1] = {
      k: case.y_pred[k] for k in case.y_pred['auxiliary_outputs_pred'][0]}
  loss = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                            auxiliary_output_number=2,
                            instance_discrimination_weight=None)
  losses = loss(_tensors(case.y_true), _tensors(case.y_pred))
  for term in ['pq_style_loss_class_term', 'pq_style_loss_mask_dice_term',
               'mask_id_cross_entropy_loss']:
    # Same inputs, same matching; the terms may be reduced in a different
    # order (e.g. stacked with the other outputs), so float32 rounding only.
    np.testing.assert_allclose(losses['aux_1' + term], losses[term],
                               rtol=1e-6)
    assert not np.allclose(losses['aux_0' + term], losses[term])
  assert 'aux_0semantic_loss' not in losses
  np.testing.assert_allclose(
      losses['total_loss'],
      sum(v for k, v in losses.items() if k != 'total_loss'), rtol=1e-6)


def test_gradients_reach_every_prediction():
  case = synthetic_case.make_case(seed=11, num_aux=2)
  y_true, y_pred = _tensors(case.y_true), _tensors(case.y_pred)
  loss = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                            auxiliary_output_number=2,
                            instance_discrimination_sample_k=32)
  flat_pred = tf.nest.flatten(y_pred)
  with tf.GradientTape() as tape:
    tape.watch(flat_pred)
    total = tf.reduce_mean(loss(y_true, y_pred)['total_loss'])
  grads = tape.gradient(total, flat_pred)
  for path, grad in zip(_paths(y_pred), grads):
    assert grad is not None, path
    assert np.all(np.isfinite(grad.numpy())), path
    assert np.abs(grad.numpy()).sum() > 0, path


def _paths(tree, prefix=''):
  """Leaf paths in tf.nest.flatten order (sorted dict keys, list order)."""
  if isinstance(tree, dict):
    return [p for k in sorted(tree) for p in _paths(tree[k], f'{prefix}/{k}')]
  if isinstance(tree, (list, tuple)):
    return [p for i, v in enumerate(tree) for p in _paths(v, f'{prefix}/{i}')]
  return [prefix]


def test_xla_and_distribute_agree_with_eager():
  case = synthetic_case.make_case(seed=2, batch=2, out_size=5, num_aux=1)
  y_true, y_pred = _tensors(case.y_true), _tensors(case.y_pred)
  # Every pixel is sampled, so only the summation order is random.
  loss = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                            auxiliary_output_number=1,
                            instance_discrimination_sample_k=25)
  eager = loss(y_true, y_pred)
  compiled = tf.function(loss.__call__, jit_compile=True)(y_true, y_pred)
  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
  distributed = strategy.run(tf.function(loss.__call__), (y_true, y_pred))
  for term, value in eager.items():
    np.testing.assert_allclose(compiled[term], value, rtol=1e-5, err_msg=term)
    np.testing.assert_allclose(distributed[term], value, rtol=1e-5,
                               err_msg=term)


def test_more_valid_masks_than_slots():
  # 7 things + 3 stuff bands on 4 slots: some masks must stay unmatched.
  case = synthetic_case.make_case(seed=4, batch=1, num_slots=4, num_things=7)
  y_true, y_pred = _tensors(case.y_true), _tensors(case.y_pred)
  common = dict(instance_discrimination_weight=None, semantic_weight=None)
  deeplab2 = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE, **common)
  assert deeplab2.mask_targets(y_true, y_pred).mask_valid.numpy().sum() > 4
  fixed = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                             exclude_unmatched_masks=True, **common)
  for matcher in ['deeplab2', 'exact']:
    slots = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                               matcher=matcher).match(y_true, y_pred)
    slots = slots.slot_for_mask.numpy()
    assert sorted(slots[slots >= 0]) == [0, 1, 2, 3]
  buggy = deeplab2(y_true, y_pred)['mask_id_cross_entropy_loss'].numpy()
  fine = fixed(y_true, y_pred)['mask_id_cross_entropy_loss'].numpy()
  assert buggy > 1e3  # DeepLab2 scores unmatched pixels vs a -99999 logit.
  assert 0 < fine < 10


def test_semantic_sampling_of_every_pixel_matches_full_loss():
  case = synthetic_case.make_case(seed=8)
  y_true, y_pred = _tensors(case.y_true), _tensors(case.y_pred)
  common = dict(pq_style_weight=None, mask_id_cross_entropy_weight=None,
                instance_discrimination_weight=None)
  full = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE, **common)
  sampled = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                               semantic_sample_k=81, **common)
  np.testing.assert_allclose(sampled(y_true, y_pred)['semantic_loss'],
                             full(y_true, y_pred)['semantic_loss'], rtol=1e-5)
  assert list(full(y_true, y_pred)) == ['semantic_loss', 'total_loss']


def test_original_instance_discrimination_without_sampling():
  case = synthetic_case.make_case(seed=9)
  loss = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                            instance_discrimination_sample_k=0)
  value = loss(_tensors(case.y_true), _tensors(case.y_pred))[
      'instance_discrimination_loss'].numpy()
  # Thing pixels vs the normalised mean feature of every visible mask.
  y_true, y_pred, s = case.y_true, case.y_pred, case.stride
  for b in range(2):
    sem = y_true['semantic_gt'][b, ::s, ::s].ravel()
    tid = y_true['thing_id_mask_gt'][b, ::s, ::s].ravel()
    feature = y_pred['pixel_space_normalized_feature'][b].reshape(
        sem.size, -1).astype(np.float64)
    rows = [tid == t for t in range(16) if (tid == t).any()]
    rows += [sem == c for c in synthetic_case.STUFF_IDS if (sem == c).any()]
    centers = np.stack([feature[r].mean(0) for r in rows])
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    logits = feature @ centers.T / 0.3
    logits -= logits.max(1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = [-log_probs[p, [i for i, r in enumerate(rows) if r[p]][0]]
          for p in range(sem.size) if tid[p] >= 0]
    np.testing.assert_allclose(value[b], np.mean(ce), rtol=1e-5)


def test_from_config_reads_deeplab2_fields():
  config = config_lib.parse_config('''
      trainer_options { loss_options {
        semantic_loss { weight: 1.0 }  pq_style_loss { weight: 3.0 }
        mask_id_cross_entropy_loss { weight: 0.3 top_k_percent: 0.5 }
        instance_discrimination_loss { weight: 1.0 } } }
      model_options { max_deeplab {
        instance_discrimination_sample_k: 4096
        instance_discrimination_sample_temperature: 1.5
        semantic_sample_k: 4096 semantic_sample_temperature: 2.0 } }''')
  loss_options = config.trainer_options.loss_options
  model_options = config.model_options
  dataset_info = dataset_info_lib.COCO_PANOPTIC
  loss = kmax_loss.KMaXLoss.from_config(loss_options, model_options,
                                        dataset_info,
                                        auxiliary_output_number=6)
  assert len(loss.loss_names) == 30
  assert loss.stuff_class_ids == list(range(81, 134))
  # pylint: disable=protected-access
  assert loss._mask_id_top_k == 0.5
  assert loss._semantic_k == 0  # DeepLab2's builder drops semantic_sample_k.
  sampled = kmax_loss.KMaXLoss.from_config(
      loss_options, model_options, dataset_info, use_semantic_sampling=True)
  assert sampled._semantic_k == 4096
  assert sampled._semantic_k_temperature == 2.0
  # pylint: enable=protected-access
  loss_options.ClearField('instance_discrimination_loss')
  without = kmax_loss.KMaXLoss.from_config(loss_options, model_options,
                                           dataset_info)
  assert 'instance_discrimination_loss' not in without.loss_names


def test_bad_inputs_raise_clear_errors():
  case = synthetic_case.make_case(seed=1, num_aux=1)
  y_true, y_pred = _tensors(case.y_true), _tensors(case.y_pred)
  loss = kmax_loss.KMaXLoss(synthetic_case.LABEL_SPACE,
                            auxiliary_output_number=2)
  with pytest.raises(ValueError, match='Expected 2 auxiliary outputs'):
    loss(y_true, y_pred)
  with pytest.raises(KeyError, match='thing_id_mask_gt'):
    loss({'semantic_gt': y_true['semantic_gt']}, y_pred)
  wrong_classes = kmax_loss.KMaXLoss(
      label_space.LabelSpace(20, 0, 256, synthetic_case.THING_IDS))
  with pytest.raises(ValueError, match='transformer_class_logits'):
    wrong_classes(y_true, y_pred)
  with pytest.raises(ValueError, match='matcher'):
    kmax_loss.KMaXLoss(label_space.LabelSpace(11, 0, 256, [1]),
                       matcher='greedy')


def test_from_deeplab2_textproto_reproduces_golden(reference_dir):
  from deeplab_kmax.config import loader  # pylint: disable=g-import-not-at-top
  config = loader.load_config(
      reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  arrays, info, y_true, y_pred = _golden(reference_dir, 'loss_case_aux')
  dataset_info = dataset_info_lib.COCO_PANOPTIC
  # The golden overrides sample_k to 256 (= 16 x 16) so every pixel is used.
  loss = kmax_loss.KMaXLoss.from_config(
      config.trainer_options.loss_options, config.model_options, dataset_info,
      auxiliary_output_number=6, instance_discrimination_sample_k=256)
  assert loss.loss_names == info['loss_facts']['loss_names']
  losses = loss(y_true, y_pred)
  for term, value in losses.items():
    np.testing.assert_allclose(value, arrays[f'loss/{term}'], rtol=1e-5,
                               err_msg=term)

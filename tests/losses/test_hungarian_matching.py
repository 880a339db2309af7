"""In-graph Hungarian matching vs scipy.optimize.linear_sum_assignment."""

import json

import numpy as np
import pytest
import tensorflow as tf
from scipy import optimize

from deeplab_kmax.losses import hungarian_matching


def _check_optimal(costs, row_mask, assignment, atol):
  """Valid, complete, and optimal (total cost) per example; ties allowed."""
  for b in range(costs.shape[0]):
    rows = np.nonzero(row_mask[b])[0]
    assert np.all(assignment[b][~row_mask[b]] == -1)
    matched = [r for r in rows if assignment[b, r] >= 0]
    cols = assignment[b, matched]
    assert len(set(cols)) == len(cols)
    assert np.all((cols >= 0) & (cols < costs.shape[2]))
    assert len(matched) == min(len(rows), costs.shape[2])
    sub = costs[b][rows].astype(np.float64)
    best = sub[optimize.linear_sum_assignment(sub)].sum() if len(rows) else 0
    got = costs[b][matched, cols].astype(np.float64).sum()
    np.testing.assert_allclose(got, best, atol=atol)


def _cases():
  rng = np.random.default_rng(0)
  yield 'square', rng.standard_normal([3, 6, 6]), None
  # DeepLab2's COCO shape: 181 ground-truth rows, 128 slots.
  yield 'tall', rng.standard_normal([2, 181, 128]), None
  yield 'wide', rng.standard_normal([2, 40, 64]), None
  yield 'ties', rng.integers(0, 3, [3, 20, 20]), None
  yield 'constant', np.zeros([2, 9, 5]), None
  mask = np.zeros([3, 181], bool)
  mask[0, [0, 3, 150, 170]] = True  # A few valid masks.
  mask[1] = rng.uniform(size=181) < 0.85  # More valid rows than columns.
  # mask[2]: no ground-truth mask at all.
  yield 'masked', -rng.uniform(size=[3, 181, 128]), mask
  # More slots than ground-truth rows (as for Cityscapes' 256 slots).
  yield 'wide_masked', -rng.uniform(size=[2, 20, 24]), rng.uniform(
      size=[2, 20]) < 0.5


_XLA_CASES = ('tall', 'ties', 'masked')  # Compiling every shape is slow.


@pytest.mark.parametrize('name,costs,mask', list(_cases()),
                         ids=[c[0] for c in _cases()])
def test_exact_solver_matches_scipy(name, costs, mask):
  costs = costs.astype(np.float32)
  if mask is None:
    mask = np.ones(costs.shape[:2], bool)
  solve = tf.function(hungarian_matching.linear_sum_assignment,
                      jit_compile=name in _XLA_CASES)
  assignment = solve(tf.constant(costs), tf.constant(mask)).numpy()
  assert assignment.dtype == np.int32 and assignment.shape == mask.shape
  _check_optimal(costs, mask, assignment, atol=1e-4)


def test_exact_solver_without_mask_equals_scipy_on_unique_optimum():
  costs = np.random.default_rng(1).standard_normal([2, 30, 20])
  assignment = hungarian_matching.linear_sum_assignment(costs).numpy()
  for b in range(2):
    rows, cols = optimize.linear_sum_assignment(costs[b])
    expected = np.full(30, -1)
    expected[rows] = cols
    np.testing.assert_array_equal(assignment[b], expected)
  np.testing.assert_allclose(
      hungarian_matching.assignment_cost(costs, assignment),
      [costs[b][optimize.linear_sum_assignment(costs[b])].sum()
       for b in range(2)], rtol=1e-5)


_DEEPLAB2_CASES = ('tall', 'ties', 'masked', 'wide_masked')


@pytest.mark.parametrize('name,costs,mask',
                         [c for c in _cases() if c[0] in _DEEPLAB2_CASES],
                         ids=list(_DEEPLAB2_CASES))
def test_deeplab2_solver_is_optimal_up_to_rounding(name, costs, mask):
  del name
  costs = costs.astype(np.float32)
  if mask is None:
    mask = np.ones(costs.shape[:2], bool)
  assignment = tf.function(hungarian_matching.deeplab2_assignment)(
      tf.constant(costs), tf.constant(mask)).numpy()
  # Its +-999 sentinels round costs at a float32 ulp of ~1e-4.
  _check_optimal(costs, mask, assignment, atol=5e-3)


def test_deeplab2_solver_reproduces_golden_matching_under_xla(reference_dir):
  golden = reference_dir / 'golden'
  arrays = np.load(golden / 'loss_case_aux.npz')
  weights = arrays['debug/hungarian_weights']
  expected = arrays['debug/matched_slot_for_gt_mask']
  n_valid = json.loads((golden / 'loss_case_aux.json').read_text())[
      'n_valid_gt_masks']
  valid = expected >= 0
  np.testing.assert_array_equal(valid.sum(1), n_valid)
  solve = tf.function(hungarian_matching.deeplab2_assignment,
                      jit_compile=True)
  np.testing.assert_array_equal(solve(weights, valid), expected)
  # The exact solver finds a (slightly) cheaper matching on the same costs.
  exact = hungarian_matching.linear_sum_assignment(weights, valid).numpy()
  assert not np.array_equal(exact, expected)
  _check_optimal(weights, valid, exact, atol=1e-6)


def test_rejects_dynamic_sizes():
  with pytest.raises(ValueError, match='static N and M'):
    tf.function(hungarian_matching.linear_sum_assignment).get_concrete_function(
        tf.TensorSpec([None, None, 4]))

"""Schedules and AdamW against closed forms / a NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax.config import trainer_pb2
from deeplab_kmax.trainer import optimizer as optimizer_lib


def _solver(**fields):
  solver = trainer_pb2.SolverOptions()
  for name, value in fields.items():
    setattr(solver, name, value)
  return solver


def _poly_with_warmup(step, base, total, warmup, end, power):
  if step < warmup:
    return base * step / warmup
  progress = min(step, total) / total
  return (base - end) * (1 - progress) ** power + end


@pytest.mark.parametrize('multiplier', [1.0, 0.1])
def test_warmup_then_poly_matches_closed_form(multiplier):
  solver = _solver(base_learning_rate=5e-4, training_number_of_steps=1000,
                   warmup_steps=100, poly_end_learning_rate=1e-6,
                   poly_learning_power=0.9)
  schedule = optimizer_lib.build_learning_rate_schedule(solver, multiplier)
  for step in [0, 1, 50, 99, 100, 101, 500, 999, 1000, 1500]:
    expected = _poly_with_warmup(step, 5e-4 * multiplier, 1000, 100, 1e-6,
                                 0.9)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5,
                               err_msg=f'step {step}')
  # The poly branch ends exactly at the end rate.
  assert float(schedule(1000)) == pytest.approx(1e-6)


def test_no_warmup_and_cosine():
  poly = optimizer_lib.build_learning_rate_schedule(
      _solver(base_learning_rate=1.0, training_number_of_steps=10))
  assert float(poly(0)) == pytest.approx(1.0)  # No warm-up: full rate at 0.
  cosine = optimizer_lib.build_learning_rate_schedule(
      _solver(base_learning_rate=2.0, training_number_of_steps=10,
              learning_policy='cosine', warmup_steps=2))
  assert float(cosine(1)) == pytest.approx(1.0)
  assert float(cosine(5)) == pytest.approx(1.0 + np.cos(np.pi * 0.5))


def test_bad_names_are_rejected_clearly():
  with pytest.raises(ValueError, match=r"optimizer 'lamb'.*adamw"):
    optimizer_lib.build_optimizer(_solver(optimizer='lamb'))
  with pytest.raises(ValueError, match=r"learning_policy 'step'"):
    optimizer_lib.build_optimizer(_solver(learning_policy='step'))


def test_backbone_optimizer_only_when_multiplier_is_set():
  assert optimizer_lib.build_optimizers(_solver()).backbone is None
  pair = optimizer_lib.build_optimizers(
      _solver(backbone_learning_rate_multiplier=0.1, base_learning_rate=1e-3,
              training_number_of_steps=10))
  assert pair.backbone is not None
  assert float(pair.backbone.learning_rate(0)) == pytest.approx(1e-4)
  assert float(pair.main.learning_rate(0)) == pytest.approx(1e-3)


def _numpy_adamw(w, grads, lrs, wd, decayed, b1=0.9, b2=0.999, eps=1e-7):
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    if decayed:
      w = w - lr * wd * w
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step_size = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    w = w - step_size * m / (np.sqrt(v) + eps)
  return w


def test_adamw_matches_numpy_reference_with_exclusions():
  rng = np.random.default_rng(0)
  init = {name: rng.standard_normal((3, 2)).astype(np.float32)
          for name in ('kernel', 'depthwise_kernel', 'bias', 'gamma',
                       'embeddings', 'cluster_centers')}
  variables = {name: tf.Variable(value, name=name)
               for name, value in init.items()}
  grads = [{name: rng.standard_normal((3, 2)).astype(np.float32)
            for name in init} for _ in range(3)]
  solver = _solver(optimizer='adamw', adamw_weight_decay=0.05,
                   base_learning_rate=0.01, training_number_of_steps=100,
                   warmup_steps=2)
  opt = optimizer_lib.build_optimizer(solver)
  lrs = [float(opt.learning_rate(step)) for step in range(3)]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.005)

  @tf.function
  def step(g):
    opt.apply_gradients([(g[name], variables[name]) for name in init])

  for g in grads:
    step({name: tf.constant(value) for name, value in g.items()})

  for name in init:
    decayed = name in ('kernel', 'depthwise_kernel')
    assert opt.decays(variables[name]) == decayed, name
    expected = _numpy_adamw(init[name].astype(np.float64),
                            [g[name] for g in grads], lrs, 0.05, decayed)
    np.testing.assert_allclose(variables[name].numpy(), expected, rtol=2e-5,
                               atol=1e-6, err_msg=name)
  # Decay really acted: a decayed kernel differs from plain Adam's result.
  plain = _numpy_adamw(init['kernel'].astype(np.float64),
                       [g['kernel'] for g in grads], lrs, 0.05, False)
  assert np.abs(variables['kernel'].numpy() - plain).max() > 1e-5


def test_optimizer_variables_follow_deeplab2_layout(tmp_path):
  opt = optimizer_lib.build_optimizer(_solver(optimizer='adamw',
                                              adamw_weight_decay=0.05))
  kernel = tf.Variable(tf.ones([2]), name='kernel')
  opt.apply_gradients([(tf.ones([2]), kernel)])
  path = tf.train.Checkpoint(optimizer=opt, kernel=kernel).write(
      str(tmp_path / 'ckpt'))
  keys = {key for key, _ in tf.train.list_variables(path)}
  assert {'optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE',
          'optimizer/beta_1/.ATTRIBUTES/VARIABLE_VALUE',
          'optimizer/beta_2/.ATTRIBUTES/VARIABLE_VALUE',
          'optimizer/decay/.ATTRIBUTES/VARIABLE_VALUE',
          'kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE',
          'kernel/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE',
          } <= keys
  assert not any('learning_rate' in key for key in keys)
  assert isinstance(opt, tf_keras.optimizers.legacy.Adam)


def test_replica_suffix_is_ignored_for_decay_decisions():
  class FakeVariable:
    name = 'encoder/conv/kernel/replica_1:0'
  assert optimizer_lib.canonical_variable_name(FakeVariable()) == (
      'encoder/conv/kernel')
  opt = optimizer_lib.AdamWeightDecay(weight_decay=0.1)
  assert opt.decays(FakeVariable())

"""Mixed-precision training: the config switch, bfloat16 and float16 steps."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax.config import trainer_pb2
from tests.trainer import demo_step
from tests.trainer import gradient_compare

_CROP = 33
# XLA against the plain step: see test_jit_compiled_gradients_match_the_plain_
# ones.
_XLA_LOSS_RTOL = 1e-5
_XLA_GRADIENT_RTOL = 1e-4
_NOISE_REORDER = 1e-2
_REORDER_MARGIN = 10.0


def test_unknown_precision_is_rejected_naming_the_field():
  config = demo_step.demo_config()
  config.trainer_options.mixed_precision = 'float8'
  problems = config_lib.find_problems(config)
  assert any(p.startswith("trainer_options.mixed_precision is 'float8'; "
                          "expected one of 'float32', 'bfloat16', "
                          "'mixed_float16'") for p in problems), problems


def test_default_is_float32_without_xla():
  options = trainer_pb2.TrainerOptions()
  assert options.mixed_precision == 'float32'
  assert not options.jit_compile


def _one_step(config, precision, weights_from=None, jit_compile=False,
              use_tf_function=False):
  """Loss logs of one training step on the synthetic batch, and the model."""
  model = demo_step.build_model(config, _CROP, precision)
  if weights_from is not None:
    demo_step.copy_weights(weights_from, model)
  trainer = gradient_compare.trainer_for(
      config, model, _CROP, jit_compile=jit_compile, mixed_precision=precision,
      use_tf_function=use_tf_function)
  return trainer.train(tf.constant(1)), model


@pytest.mark.slow
def test_mixed_precision_steps_are_finite_and_close_to_float32():
  config = demo_step.demo_config()
  # The first step's learning rate is 0 during warm-up.
  config.trainer_options.solver_options.warmup_steps = 0
  start = demo_step.build_model(config, _CROP)
  reference_logs, reference = _one_step(config, 'float32', weights_from=start)
  for precision in ('bfloat16', 'mixed_float16'):
    logs, model = _one_step(config, precision, weights_from=start)
    for term in (keys.TOTAL_LOSS, keys.SEMANTIC_LOSS,
                 keys.PQ_STYLE_MASK_DICE_TERM, keys.MASK_ID_CROSS_ENTROPY):
      name = f'losses/train_{term}'
      ours, theirs = float(logs[name]), float(reference_logs[name])
      print(f'{precision} {term}: {ours:.6g} (float32 {theirs:.6g})')
      assert np.isfinite(ours), (precision, name, ours)
      assert ours == pytest.approx(theirs, rel=0.05), (precision, name)
    # float16's first steps may overflow at the initial loss scale and be
    # skipped; bfloat16 needs no scaling and always updates.
    _check_variables(model, reference, start,
                     must_move=precision == 'bfloat16')


def _check_variables(model, reference, start, must_move: bool):
  # Variables stay float32 and keep their names (checkpoints unchanged).
  assert demo_step.variable_names(model) == demo_step.variable_names(
      reference)
  assert all(v.dtype == tf.float32 for v in model.variables)
  # The weights stay finite and (unless the step was skipped) moved.
  moved = [np.abs(a.numpy() - b.numpy()).max()
           for a, b in zip(model.trainable_variables,
                           start.trainable_variables)]
  assert np.all(np.isfinite(moved))
  assert max(moved) > 0 or not must_move


@pytest.mark.slow
def test_jit_compiled_gradients_match_the_plain_ones(monkeypatch):
  """XLA computes the same loss and gradients, up to float rounding.

  Compared before the optimizer, with the ASPP dropout off: XLA ignores op
  seeds, so its dropout masks are not the plain step's (which is what made
  the semantic loss differ by 1.7e-3 before). XLA's CPU fusions reorder
  float sums, so the gradients agree to rounding, not bit for bit. How
  much rounding a gradient shows is measured: the plain step on the batch's
  examples in reverse order. Gradients that move by more than
  _NOISE_REORDER of themselves are zero in exact arithmetic (a bias or
  beta feeding a training-mode batch norm or a softmax over the same axis)
  and are not compared; every other one must agree to
  max(_XLA_GRADIENT_RTOL, _REORDER_MARGIN x its movement).
  """
  monkeypatch.setattr(tf_keras.layers.Dropout, 'call',
                      lambda self, inputs, training=None: inputs)
  tf_keras.utils.set_random_seed(0)
  config = demo_step.demo_config()
  model = demo_step.build_model(config, _CROP)
  trainer = gradient_compare.trainer_for(config, model, _CROP,
                                         jit_compile=True)
  batch = demo_step.synthetic_batch(_CROP)
  reversed_batch = {name: tf.reverse(value, [0])
                    for name, value in batch.items()}
  # pylint: disable=protected-access
  plain_means, _, plain = trainer._loss_and_gradients(batch)
  _, _, reordered = trainer._loss_and_gradients(reversed_batch)
  compiled_means, _, compiled = trainer._gradients_fn(batch)
  # pylint: enable=protected-access
  for name, value in plain_means.items():
    assert float(compiled_means[name]) == pytest.approx(
        float(value), rel=_XLA_LOSS_RTOL, abs=1e-6), name
  names = [v.name for v in model.trainable_variables]
  plain = gradient_compare.as_numpy(plain)
  movement = gradient_compare.own_relative_errors(
      gradient_compare.as_numpy(reordered), plain, names)
  errors = gradient_compare.own_relative_errors(
      gradient_compare.as_numpy(compiled), plain, names)
  noise = {name for name, moved in movement.items() if moved > _NOISE_REORDER}
  assert len(noise) < 0.05 * len(names), sorted(noise)
  shares = {name: error / max(_XLA_GRADIENT_RTOL,
                              _REORDER_MARGIN * movement[name])
            for name, error in errors.items() if name not in noise}
  worst = gradient_compare.worst(shares)
  print(f'{len(noise)} noise gradients; worst XLA difference relative to '
        'its tolerance:', worst)
  assert worst[0][1] <= 1.0, worst

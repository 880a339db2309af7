"""Two gradients of the same model compared variable by variable.

Two measures. `relative_errors`: ||ours - theirs|| / max(||theirs||,
FLOOR * ||whole gradient||); gradients that are zero in exact arithmetic
(a bias or beta feeding a training-mode batch norm) come out as float noise
of ~1e-9 of the whole gradient, different for every summation order, and
the floor keeps that noise from counting as a relative error of order 1.
`own_relative_errors`: relative to the variable's own gradient alone, for
tests that measure each variable's rounding (e.g. by reversing the batch)
and set its tolerance from that, as the train-step parity test does.
"""

from typing import Dict, Optional, Sequence

import numpy as np
import orbit
import tensorflow as tf

from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import optimizer as optimizer_lib
from tests.trainer import demo_step

FLOOR = 1e-4


def trainer_for(config, model, crop: int, jit_compile: bool = False,
                mixed_precision: str = 'float32',
                use_tf_function: bool = False) -> kmax_trainer.KMaXTrainer:
  """The trainer of `model` on a repeated synthetic batch (not stepped)."""
  solver = config.trainer_options.solver_options
  optimizers = optimizer_lib.build_optimizers(solver)
  batch = demo_step.synthetic_batch(crop)
  return kmax_trainer.KMaXTrainer(
      model, demo_step.build_loss(config, model),
      tf.data.Dataset.from_tensors(batch).repeat(), optimizers.main,
      tf.Variable(0, dtype=tf.int64), backbone_optimizer=optimizers.backbone,
      backbone_variables=lambda: model.backbone_variables,
      options=orbit.StandardTrainerOptions(use_tf_function=use_tf_function,
                                           use_tf_while_loop=False),
      mixed_precision=mixed_precision, jit_compile=jit_compile)


def as_numpy(gradients: Sequence[Optional[tf.Tensor]]):
  return [None if g is None else tf.convert_to_tensor(g).numpy()
          for g in gradients]


def relative_errors(ours, theirs, names: Sequence[str],
                    floor: float = FLOOR) -> Dict[str, float]:
  """{variable name: norm-relative error of `ours` against `theirs`}."""
  whole = np.sqrt(sum(float(np.sum(np.square(t))) for t in theirs
                      if t is not None))
  errors = {}
  for name, mine, reference in zip(names, ours, theirs):
    if mine is None or reference is None:
      errors[name] = 0.0 if mine is None and reference is None else np.inf
      continue
    scale = max(float(np.linalg.norm(reference)), floor * whole)
    errors[name] = float(np.linalg.norm(mine - reference)) / scale
  return errors


def own_relative_errors(ours, theirs,
                        names: Sequence[str]) -> Dict[str, float]:
  """{variable name: ||ours - theirs|| / ||theirs||} (0 where they are equal,
  inf where only one is None or the reference alone is zero)."""
  errors = {}
  for name, mine, reference in zip(names, ours, theirs):
    if mine is None or reference is None:
      errors[name] = 0.0 if mine is None and reference is None else np.inf
      continue
    error = float(np.linalg.norm(mine.astype(np.float64) - reference))
    scale = float(np.linalg.norm(reference.astype(np.float64)))
    errors[name] = 0.0 if error == 0 else (error / scale if scale else np.inf)
  return errors


def worst(errors: Dict[str, float], count: int = 5):
  return sorted(errors.items(), key=lambda item: -item[1])[:count]

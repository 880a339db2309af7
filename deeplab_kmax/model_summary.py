"""Parameter and variable counts of a built model, as DeepLab2 reports them."""

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

from deeplab_kmax import checkpoint_io


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
  checkpoint_keys: int
  trainable_variables: int
  trainable_parameters: int
  total_variables: int
  total_parameters: int

  @property
  def non_trainable_parameters(self) -> int:
    return self.total_parameters - self.trainable_parameters


def _size(variable: tf.Variable) -> int:
  return int(np.prod(variable.shape))


def parameter_counts(model) -> ParameterCounts:
  """Counts over `model.checkpoint_items`, the parts checkpoints hold."""
  items: Mapping[str, tf.Module] = model.checkpoint_items
  by_key = checkpoint_io.variables_by_key(items)
  variables = list(by_key.values())
  trainable = [v for v in variables if v.trainable]
  return ParameterCounts(
      checkpoint_keys=len(by_key),
      trainable_variables=len(trainable),
      trainable_parameters=sum(_size(v) for v in trainable),
      total_variables=len(variables),
      total_parameters=sum(_size(v) for v in variables))


def parameter_table(model) -> str:
  """Per checkpoint item: trainable and total parameters, one line each."""
  lines = []
  for name, item in sorted(model.checkpoint_items.items()):
    variables = list(checkpoint_io.variables_by_key({name: item}).values())
    trainable = sum(_size(v) for v in variables if v.trainable)
    total = sum(_size(v) for v in variables)
    lines.append(f'{name:36s} {trainable:>12,d} {total:>12,d}')
  return '\n'.join(lines)

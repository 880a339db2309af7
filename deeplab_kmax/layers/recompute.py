"""Activation recomputation (gradient checkpointing) of whole sub-layers.

A recomputed layer keeps only its inputs and outputs from the forward pass
of a training step; backpropagation runs its forward pass again to get the
activations in between (`tf.recompute_grad`). The peak memory of a step
then holds one layer's activations plus the layer boundaries instead of
every activation, for about one more forward pass of compute.

The second forward pass must compute the same function as the first, which
`tf.recompute_grad` alone does not ensure for two kinds of state:
* drop path draws a new random factor on every call: the draws of the
  forward pass are recorded and the recomputation replays them;
* batch norm in training mode updates its moving statistics on every call:
  the recomputation puts back the non-trainable variables it changed, so
  they move once per step, as without recomputation.

`enable(layer)` switches this on from outside the layer: it replaces the
`call` of that one instance (training-mode calls only; inference and the
layer's variables and checkpoint paths are unchanged). Training mode must
be passed as the Python bool `training=True`.
"""

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import drop_path

_ENABLED_ATTRIBUTE = '_recomputes_activations'


class _DrawLog:
  """The drop-path factors of one forward pass, by layer, in call order."""

  def __init__(self):
    self._draws: Optional[Dict[int, List[tf.Tensor]]] = None
    self._replay_cursor: Optional[Dict[int, int]] = None

  @contextlib.contextmanager
  def recording(self, draws: Dict[int, List[tf.Tensor]]) -> Iterator[None]:
    self._draws, self._replay_cursor = draws, None
    try:
      yield
    finally:
      self._draws = None

  @contextlib.contextmanager
  def replaying(self, draws: Dict[int, List[tf.Tensor]]) -> Iterator[None]:
    self._draws, self._replay_cursor = draws, {}
    try:
      yield
    finally:
      self._draws, self._replay_cursor = None, None

  def sample(self, layer: drop_path.DropPath, draw: Callable[[tf.Tensor],
                                                             tf.Tensor],
             inputs: tf.Tensor) -> tf.Tensor:
    """`draw(inputs)`, recorded; or, when replaying, the recorded factor."""
    if self._draws is None:
      return draw(inputs)
    key = id(layer)
    if self._replay_cursor is None:
      scale = draw(inputs)
      self._draws.setdefault(key, []).append(scale)
      return scale
    index = self._replay_cursor.get(key, 0)
    recorded = self._draws.get(key, [])
    if index >= len(recorded):
      raise RuntimeError(
          f'Recomputing drop path {layer.name!r} found no draw of the forward '
          'pass to replay: the recomputed layer called it more often than '
          'the forward pass did.')
    self._replay_cursor[key] = index + 1
    return recorded[index]


def _install_replay(layer: drop_path.DropPath, log: _DrawLog) -> None:
  draw = layer.sample_scale

  def sample_scale(inputs: tf.Tensor) -> tf.Tensor:
    return log.sample(layer, draw, inputs)

  layer.sample_scale = sample_scale


@contextlib.contextmanager
def _state_kept(variables: Sequence[tf.Variable]) -> Iterator[None]:
  """Puts `variables` back to their values from before the block.

  Inside tf.function the restoring assignments come after the block's own
  updates because automatic control dependencies order the accesses of each
  resource variable as written.
  """
  saved = [tf.identity(v.read_value()) for v in variables]
  yield
  for variable, value in zip(variables, saved):
    variable.assign(value)


def is_enabled(layer: tf_keras.layers.Layer) -> bool:
  return getattr(layer, _ENABLED_ATTRIBUTE, False)


def enable(layer: tf_keras.layers.Layer) -> None:
  """Recomputes `layer`'s activations in backprop of training-mode calls.

  The layer must take its tensors as arguments (a nest of them is fine)
  and return a nest of float tensors. Calling it twice is harmless.
  """
  if is_enabled(layer):
    return
  log = _DrawLog()
  for module in layer.submodules:
    if isinstance(module, drop_path.DropPath):
      _install_replay(module, log)
  original = layer.call

  @functools.wraps(original)
  def call(*args, **kwargs):
    if kwargs.get('training') is not True:
      return original(*args, **kwargs)
    return _recomputed_call(layer, original, log, args, kwargs)

  layer.call = call
  setattr(layer, _ENABLED_ATTRIBUTE, True)


def _recomputed_call(layer: tf_keras.layers.Layer, original: Callable,
                     log: _DrawLog, args: Sequence[Any],
                     kwargs: Dict[str, Any]) -> Any:
  """`original(*args, **kwargs)` under `tf.recompute_grad`.

  The float tensors among the arguments become the recomputed function's
  inputs (so they get gradients); everything else is passed as it is.
  """
  flat = tf.nest.flatten((args, kwargs))
  positions = [i for i, value in enumerate(flat)
               if tf.is_tensor(value) and value.dtype.is_floating]
  draws: Dict[int, List[tf.Tensor]] = {}
  output_structure = []

  def run(*tensors: tf.Tensor) -> List[tf.Tensor]:
    values = list(flat)
    for position, tensor in zip(positions, tensors):
      values[position] = tensor
    call_args, call_kwargs = tf.nest.pack_sequence_as((args, kwargs), values)
    if not output_structure:  # The forward pass.
      with log.recording(draws):
        outputs = original(*call_args, **call_kwargs)
      output_structure.append(outputs)
    else:  # A recomputation, inside backprop.
      with _state_kept(layer.non_trainable_variables), log.replaying(draws):
        outputs = original(*call_args, **call_kwargs)
    flat_outputs = tf.nest.flatten(outputs)
    if not all(tf.is_tensor(t) and t.dtype.is_floating
               for t in flat_outputs):
      raise TypeError(f'{layer.name}: a recomputed layer must return float '
                      f'tensors only, got {outputs!r}.')
    return flat_outputs

  flat_outputs = tf.recompute_grad(run)(*[flat[i] for i in positions])
  return tf.nest.pack_sequence_as(output_structure[0], flat_outputs)

"""Batch norm folded into the linear op before it, for inference (opt-in).

In inference a batch norm is a per-channel affine map, y = x * s + b with
s = gamma / sqrt(moving_variance + epsilon) and b = beta - moving_mean * s.
After a convolution, conv(x, W) * s + b = conv(x, W * s) + b: computing the
right-hand side removes a multiply and an add over the whole feature map and
leaves Conv2D + BiasAdd (+ Relu), which grappler's remapper fuses into one
oneDNN kernel.

The folded weights are computed from the layers' own variables inside every
inference call (work of the order of the weights, not of the feature maps),
so variables, checkpoints and training are untouched: the switch only
changes which ops an inference call emits. It is opt-in: results move at
float-rounding level (W * s is rounded where x * s was), and recomputing the
kernels per call costs memory (COCO R50 at 641x641 on CPU, 2026-12-02:
3-8% faster, peak 2.47 GiB instead of 2.05 GiB; README, Benchmarks). Those
figures predate the default inference path's fused batch norm
(`normalization.BatchNormalization`), which now gets the convolutions on
feature maps fused without folding; folding still covers the 1-D
convolutions and the heads.

`enable(model)` turns it on for every layer in `model` that supports it
(`FoldsBatchNorm`); a tf.function traced before the switch keeps the graph
it traced, so switch first, then trace or export.
"""

from typing import Optional, Tuple

import tensorflow as tf
import tf_keras
from tf_keras.src.mixed_precision import autocast_variable


class FoldsBatchNorm:
  """Mixin of layers that can run their batch norms folded in inference.

  `fold_batch_norm` is a plain Python switch read at trace time; the class
  default keeps the unfolded (DeepLab2) computation.
  """

  fold_batch_norm: bool = False

  def folds_batch_norm(self, training) -> bool:
    """Whether this call folds: switched on, and not a training call.

    `training` must be a Python bool or None (None is Keras' inference
    default); a tensor-valued training flag never folds.
    """
    return bool(self.fold_batch_norm) and (training is None or
                                           training is False)


def enable(root: tf.Module, enabled: bool = True) -> int:
  """Sets `fold_batch_norm` on `root` and every sub-layer supporting it.

  Returns how many layers were switched (0 means `root` has none).
  """
  count = 0
  for module in (root, *root.submodules):
    if isinstance(module, FoldsBatchNorm):
      module.fold_batch_norm = enabled
      count += 1
  return count


def enabled_count(root: tf.Module) -> int:
  """How many layers of `root` currently fold their batch norms."""
  return sum(1 for module in (root, *root.submodules)
             if isinstance(module, FoldsBatchNorm) and module.fold_batch_norm)


def float32_value(variable) -> tf.Tensor:
  """The variable's value in float32, also under a mixed-precision policy
  (where a layer's call would otherwise read it already rounded to its
  compute dtype)."""
  with autocast_variable.enable_auto_cast_variables(None):
    return tf.cast(tf.convert_to_tensor(variable), tf.float32)


def _check_foldable(norm: tf_keras.layers.BatchNormalization) -> None:
  if not isinstance(norm, tf_keras.layers.BatchNormalization):
    raise TypeError(f'{norm.name}: only BatchNormalization folds, got '
                    f'{type(norm).__name__}.')
  if norm.renorm or norm.virtual_batch_size is not None or (
      norm.adjustment is not None):
    raise ValueError(f'{norm.name}: batch renorm, virtual batches and '
                     'adjustments do not fold into a convolution.')
  if not norm.built:
    raise ValueError(f'{norm.name}: build the model before folding.')


def affine(norm: tf_keras.layers.BatchNormalization
           ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(s, b), float32 [C]: the inference batch norm as x * s + b."""
  _check_foldable(norm)
  variance = float32_value(norm.moving_variance)
  scale = tf.math.rsqrt(variance + norm.epsilon)
  if norm.gamma is not None:
    scale *= float32_value(norm.gamma)
  offset = -float32_value(norm.moving_mean) * scale
  if norm.beta is not None:
    offset += float32_value(norm.beta)
  return scale, offset


def fold(kernel, bias: Optional[tf.Variable],
         norm: tf_keras.layers.BatchNormalization,
         kernel_channels_shape: Optional[Tuple[int, ...]] = None
         ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(W * s, bias * s + b) in float32 for a linear op followed by `norm`.

  Args:
    kernel: the op's kernel variable; its trailing axes index the output
      channels the batch norm normalises.
    bias: the op's bias variable, or None.
    norm: the batch norm after the op.
    kernel_channels_shape: the trailing kernel axes that make the output
      channels (e.g. (in, multiplier) for a depthwise kernel); default: the
      last axis.
  """
  scale, offset = affine(norm)
  kernel = float32_value(kernel)
  if kernel_channels_shape is not None:
    scale_for_kernel = tf.reshape(scale, kernel_channels_shape)
  else:
    scale_for_kernel = scale
  folded_kernel = kernel * scale_for_kernel  # broadcast over trailing axes
  if bias is not None:
    offset += float32_value(bias) * scale
  return folded_kernel, offset


def add_offset(y: tf.Tensor, offset: tf.Tensor,
               activation_follows: bool) -> tf.Tensor:
  """y + offset over the channels of a folded convolution's output y.

  With an activation next, a BiasAdd lets grappler fuse conv + bias +
  activation. Without one, the offset goes in as a plain add: the output of
  such a convolution is usually added to a residual, and grappler's
  remapper (TF 2.20, oneDNN) fuses conv + BiasAdd + Add + Relu even when
  that sum has other consumers too (a stage's endpoint), then fails on the
  whole graph ("remapper failed: ... fanout ... for missing node") and
  leaves every convolution unfused.
  """
  offset = tf.cast(offset, y.dtype)
  if activation_follows:
    return tf.nn.bias_add(y, offset)
  return y + offset


def convolve_folded(conv: tf_keras.layers.Layer,
                    norm: tf_keras.layers.BatchNormalization,
                    x: tf.Tensor, activation_follows: bool) -> tf.Tensor:
  """norm(conv(x)) of an inference call, as conv(x, W * s) + (bias * s + b).

  `conv` is a Keras Conv1D/Conv2D without activation; `x` is already in its
  compute dtype (and padded, where the caller pads).
  """
  if conv.get_config()['activation'] != 'linear':
    raise ValueError(f'{conv.name}: a batch norm folds only into a '
                     'convolution without activation.')
  kernel, bias = fold(conv.kernel, conv.bias if conv.use_bias else None,
                      norm)
  y = conv.convolution_op(x, tf.cast(kernel, x.dtype))
  return add_offset(y, bias, activation_follows)

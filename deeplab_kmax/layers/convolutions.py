"""Convolution wrappers with DeepLab's padding and optional norm + activation.

Strided convolutions pad symmetrically (kernel aligned with the top-left
corner), unlike Keras 'same' padding, so features stay aligned with the input
grid across strides; odd crops such as 129 or 641 then map exactly onto
(129 - 1) / stride + 1 positions.

Checkpoint compatibility fixes the private attribute names used here: the
convolution is `_conv` (`_depthwise_conv` for depthwise), the norm is
`_batch_norm`, and a separable convolution holds `_depthwise` and
`_pointwise`. DeepLab2 checkpoints address variables by these names.

With `fold_batch_norm` switched on (`bn_folding.enable`), inference calls
compute conv(x, W * s) + b instead of the convolution then the batch norm;
see `bn_folding`.
"""

import functools
from typing import Optional, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import activations
from deeplab_kmax.layers import bn_folding
from deeplab_kmax.layers import normalization


def symmetric_padding(kernel_size: int, dilation: int) -> Tuple[int, int]:
  """Padding (before, after) that centres a dilated kernel."""
  effective = kernel_size + (kernel_size - 1) * (dilation - 1)
  total = effective - 1
  return total // 2, total - total // 2


def _kernel_dilations_differentiable(dtype: tf.DType) -> bool:
  """Whether the Conv2D op's own `dilations` have a gradient here.

  TensorFlow's plain CPU kernels compute dilated convolutions forward but not
  their gradients; the oneDNN kernels (on by default on x86, off with
  TF_ENABLE_ONEDNN_OPTS=0) do, for float32 and bfloat16 (GPUs do too).
  """
  return dtype in (tf.float32, tf.bfloat16) and _onednn_enabled()


@functools.lru_cache(maxsize=None)
def _onednn_enabled() -> bool:
  """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at start-up."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):  # a build without the flag
    return False


class _Conv2D(tf_keras.layers.Conv2D):
  """Keras Conv2D whose dilated convolutions run as a single Conv2D op.

  `tf.nn.convolution` turns a dilated convolution into space-to-batch, a
  convolution of many small tiles and batch-to-space. For ASPP's rates 6, 12
  and 18 on a 21x21 map that costs 4-13x the time of the Conv2D kernel's own
  `dilations`, forward and backward (`benchmarks/dilated_conv_benchmark.py`).
  Where that op has no gradient (see `_kernel_dilations_differentiable`)
  Keras' computation stays. Same variables and checkpoint names; outputs
  differ by float rounding.
  """

  def convolution_op(self, inputs, kernel):
    if (self.dilation_rate == (1, 1) or self.groups != 1 or
        not isinstance(self.padding, str) or self.padding == 'causal' or
        not _kernel_dilations_differentiable(inputs.dtype)):
      return super().convolution_op(inputs, kernel)
    return tf.nn.conv2d(
        inputs, kernel, strides=list(self.strides),
        padding=self.padding.upper(), dilations=list(self.dilation_rate),
        data_format=self._tf_data_format, name=self.__class__.__name__)


class _ConvNormAct(bn_folding.FoldsBatchNorm, tf_keras.layers.Layer):
  """A convolution (built by the subclass) with DeepLab's padding, then an
  optional norm and activation.

  The subclass builds its convolution first and then calls `_init_tail`, so
  the weights keep the order conv, norm.
  """

  def _init_padding(self, kernel_size: int, strides: int,
                    atrous_rate: int) -> str:
    """Keras padding for the convolution; strided ones get `_pad` first."""
    self._padding = None
    if strides != 1:
      self._padding = symmetric_padding(kernel_size, atrous_rate)
      return 'valid'
    return 'same'

  def _init_tail(self, use_bias: bool, use_bn: bool = False,
                 bn_layer: normalization.NormLayer = (
                     tf_keras.layers.BatchNormalization),
                 gamma_init: str = 'ones',
                 activation: Optional[str] = None,
                 bn_axis: int = 3):
    """The norm + activation options every convolution here takes."""
    if use_bn and use_bias:
      raise ValueError(f'{self.name}: a convolution followed by batch norm '
                       'must not have a bias (use_bias and use_bn both set).')
    if use_bn:
      self._batch_norm = bn_layer(
          axis=bn_axis, name='batch_norm',
          gamma_initializer=gamma_init)
    self._use_bn = use_bn
    self._act = activations.get_activation(activation)

  def _pad(self, x: tf.Tensor) -> tf.Tensor:
    if self._padding is None:
      return x
    before, after = self._padding
    return tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])

  def _apply_tail(self, x: tf.Tensor, training) -> tf.Tensor:
    if self._use_bn:
      x = self._batch_norm(x, training=training)
    if self._act is not None:
      x = self._act(x)
    return x

  def _folded_conv(self, x: tf.Tensor) -> tf.Tensor:
    """conv(x, W * s) + b with the batch norm's s, b (`bn_folding`); for
    the Keras convolution `_conv` (the depthwise subclass overrides it)."""
    return bn_folding.convolve_folded(self._conv, self._batch_norm, x,
                                      self._act is not None)

  def _conv_tail(self, x: tf.Tensor, conv: tf_keras.layers.Layer,
                 training) -> tf.Tensor:
    """conv, norm, activation of the padded input: folded when switched on
    for an inference call, else exactly as the layers compute them."""
    if not (self._use_bn and self.folds_batch_norm(training)):
      return self._apply_tail(conv(x), training)
    x = self._folded_conv(x)
    return x if self._act is None else self._act(x)


class Conv2DSame(_ConvNormAct):
  """2-D convolution with symmetric padding, optional norm and activation.

  `norm_act` are `_ConvNormAct._init_tail`'s options: use_bn, bn_layer,
  gamma_init, activation.
  """

  def __init__(self,
               output_channels: int,
               kernel_size: int,
               name: str,
               strides: int = 1,
               atrous_rate: int = 1,
               use_bias: bool = True,
               kernel_init='he_normal',
               **norm_act):
    super().__init__(name=name)
    self._conv = _Conv2D(
        output_channels,
        kernel_size,
        strides=strides,
        padding=self._init_padding(kernel_size, strides, atrous_rate),
        use_bias=use_bias,
        dilation_rate=atrous_rate,
        kernel_initializer=kernel_init,
        name='conv')
    self._init_tail(use_bias, **norm_act)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    return self._conv_tail(self._pad(inputs), self._conv, training)


class DepthwiseConv2DSame(_ConvNormAct):
  """Depthwise 2-D convolution with symmetric padding (`norm_act` as in
  `Conv2DSame`)."""

  def __init__(self,
               kernel_size: int,
               name: str,
               strides: int = 1,
               atrous_rate: int = 1,
               use_bias: bool = True,
               **norm_act):
    super().__init__(name=name)
    self._depthwise_conv = tf_keras.layers.DepthwiseConv2D(
        kernel_size=kernel_size,
        strides=strides,
        padding=self._init_padding(kernel_size, strides, atrous_rate),
        use_bias=use_bias,
        dilation_rate=atrous_rate,
        name='depthwise_conv')
    self._init_tail(use_bias, **norm_act)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    return self._conv_tail(self._pad(inputs), self._depthwise_conv,
                           training)

  def _folded_conv(self, x: tf.Tensor) -> tf.Tensor:
    conv = self._depthwise_conv
    in_channels, multiplier = conv.depthwise_kernel.shape[2:]
    kernel, bias = bn_folding.fold(conv.depthwise_kernel, None,
                                   self._batch_norm,
                                   (in_channels, multiplier))
    y = tf_keras.backend.depthwise_conv2d(
        x, tf.cast(kernel, x.dtype), strides=conv.strides,
        padding=conv.padding, data_format=conv.data_format,
        dilation_rate=conv.dilation_rate)
    return bn_folding.add_offset(y, bias, self._act is not None)


class SeparableConv2DSame(tf_keras.layers.Layer):
  """Depthwise then pointwise convolution, each with its own norm + act.

  `conv_options` are `DepthwiseConv2DSame`'s; all but strides and
  atrous_rate also go to the pointwise convolution.
  """

  def __init__(self, output_channels: int, kernel_size: int, name: str,
               **conv_options):
    super().__init__(name=name)
    self._depthwise = DepthwiseConv2DSame(kernel_size, name='depthwise',
                                          **conv_options)
    pointwise_options = {key: value for key, value in conv_options.items()
                         if key not in ('strides', 'atrous_rate')}
    self._pointwise = Conv2DSame(output_channels, 1, name='pointwise',
                                 **pointwise_options)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    return self._pointwise(self._depthwise(inputs, training=training),
                           training=training)


def conv_bn_act_name(index: int, use_bn: bool,
                     activation: Optional[str]) -> str:
  """Attribute name DeepLab2 gives the index-th conv of a stack.

  For example `_conv1_bn_act`, `_conv2_bn` or `_conv3`; checkpoint keys
  contain these names.
  """
  name = f'_conv{index + 1}'
  if use_bn:
    name += '_bn'
  if activation not in (None, 'none', 'identity'):
    name += '_act'
  return name


class StackedConv2DSame(tf_keras.layers.Layer):
  """A stack of identical (standard or depthwise-separable) convolutions.

  `conv_options` go to every convolution: strides, atrous_rate, use_bias,
  bn_layer (see `Conv2DSame`).
  """

  def __init__(self,
               num_layers: int,
               conv_type: str,
               output_channels: int,
               kernel_size: int,
               name: str,
               use_bn: bool = False,
               activation: Optional[str] = None,
               **conv_options):
    super().__init__(name=name)
    if conv_type == 'standard_conv':
      conv_class = Conv2DSame
    elif conv_type == 'depthwise_separable_conv':
      conv_class = SeparableConv2DSame
    else:
      raise ValueError(f'{name}: conv_type must be "standard_conv" or '
                       f'"depthwise_separable_conv", got {conv_type!r}.')
    self._layer_names = []
    for index in range(num_layers):
      attr = conv_bn_act_name(index, use_bn, activation)
      setattr(self, attr, conv_class(
          output_channels, kernel_size, name=attr.lstrip('_'), use_bn=use_bn,
          activation=activation, **conv_options))
      self._layer_names.append(attr)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    x = inputs
    for attr in self._layer_names:
      x = getattr(self, attr)(x, training=training)
    return x


class Conv1D(_ConvNormAct):
  """Pointwise convolution over [B, L, C] sequences (the centres' MLPs);
  `norm_act` as in `Conv2DSame`."""

  def __init__(self,
               output_channels: int,
               name: str,
               use_bias: bool = True,
               kernel_init='he_normal',
               kernel_size: int = 1,
               padding: str = 'valid',
               **norm_act):
    super().__init__(name=name)
    self._conv = tf_keras.layers.Conv1D(
        output_channels,
        kernel_size=kernel_size,
        padding=padding,
        use_bias=use_bias,
        kernel_initializer=kernel_init,
        name='conv')
    # Inputs are [B, L, C]: channels sit on axis 2.
    self._init_tail(use_bias, bn_axis=2, **norm_act)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    return self._conv_tail(inputs, self._conv, training)

"""Choosing which ground-truth pixels a loss looks at.

Two mechanisms from DeepLab2: the full-resolution ground truth is read on the
prediction's (stride-s) grid by plain striding, and pixel-level losses can be
restricted to k pixels drawn without replacement with the Gumbel-top-k trick,
favouring small masks.
"""

from typing import Optional, Sequence

import tensorflow as tf


def strided_downsample(tensor: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
  """Reads [B, H, W, ...] at the corners of a [h, w] grid: x[:, ::s, ::s].

  The DeepLab crops are `s * (h - 1) + 1` pixels wide, so the stride-s grid
  starts and ends on the crop's border pixels.

  Raises:
    ValueError: if the static sizes are unknown or not related by one integer
      stride shared by both axes.
  """
  in_h, in_w = tensor.shape[1:3]
  out_h, out_w = size
  if None in (in_h, in_w, out_h, out_w):
    raise ValueError('strided_downsample needs static spatial sizes, got '
                     f'{tensor.shape} -> {size}.')
  if (in_h, in_w) == (out_h, out_w):
    return tensor
  if (out_h < 2 or out_w < 2 or (in_h - 1) % (out_h - 1) or
      (in_w - 1) % (out_w - 1)):
    raise ValueError(
        f'Cannot stride ground truth of size {in_h}x{in_w} onto a prediction '
        f'of size {out_h}x{out_w}: expected (H - 1) to be a multiple of '
        '(h - 1) on both axes, as for crop sizes of the form s * k + 1.')
  stride = (in_h - 1) // (out_h - 1)
  if stride != (in_w - 1) // (out_w - 1):
    raise ValueError(f'Height and width strides differ for {in_h}x{in_w} -> '
                     f'{out_h}x{out_w}.')
  return tensor[:, ::stride, ::stride]


def gumbel_top_k(logits: tf.Tensor, k: int,
                 seed: Optional[int] = None) -> tf.Tensor:
  """Draws k indices per row without replacement, P(i) ~ softmax(logits).

  Adding Gumbel(0, 1) noise and keeping the top k is equivalent to sequential
  sampling from the softmax without replacement.

  Args:
    logits: [B, N] float tensor.
    k: Number of indices to draw; must not exceed N.
    seed: Optional op seed for `tf.random.uniform`.

  Returns:
    [B, k] int32 indices, in random order.
  """
  uniform = tf.random.uniform(tf.shape(logits), 0.0, 1.0, dtype=logits.dtype,
                              seed=seed)
  gumbel = -tf.math.log(-tf.math.log(uniform))
  return tf.math.top_k(logits + gumbel, k).indices

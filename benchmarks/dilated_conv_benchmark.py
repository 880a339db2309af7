"""Dilated 3x3 convolutions: tf.nn.convolution vs one Conv2D op.

  python benchmarks/dilated_conv_benchmark.py

Keras' Conv2D calls `tf.nn.convolution`, which runs a dilated convolution as
space-to-batch + convolution + batch-to-space; `convolutions._Conv2D` passes
the rate to the Conv2D op instead. Prints the median milliseconds of both,
forward and forward + backward, for the ASPP branches of COCO kMaX-R50 at
641x641 and 1281x1281 (21x21 / 41x41 maps, 2048 -> 256 channels, rates 6,
12, 18) and the pixel decoder's rate-2 bottlenecks.
"""

import argparse
import platform
import time
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

# (map size, input channels, output channels, rate)
CASES = ((21, 2048, 256, 6), (21, 2048, 256, 12), (21, 2048, 256, 18),
         (41, 2048, 256, 6), (41, 2048, 256, 12), (41, 2048, 256, 18),
         (161, 128, 128, 2), (81, 256, 256, 2))


def _median_ms(fn: Callable, x: tf.Tensor, repeats: int) -> float:
  def run():
    for value in tf.nest.flatten(fn(x)):
      value.numpy()
  run()  # trace
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _with_gradient(op: Callable, kernel: tf.Variable) -> Callable:
  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = op(x)
      loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, [x, kernel])
  return step


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args(argv)
  print(f'{platform.processor() or platform.machine()}, '
        f'{tf.config.threading.get_intra_op_parallelism_threads() or "all"} '
        f'intra-op threads, TensorFlow {tf.__version__}')
  print('size  in->out  rate | forward ms: convolution  conv2d | '
        'fwd+bwd ms: convolution  conv2d')
  rng = np.random.default_rng(0)
  for size, channels, outputs, rate in CASES:
    x = tf.constant(rng.standard_normal([1, size, size, channels]),
                    tf.float32)
    kernel = tf.Variable(
        rng.standard_normal([3, 3, channels, outputs]) * 0.02,
        dtype=tf.float32)

    def space_to_batch(x, kernel=kernel, rate=rate):
      return tf.nn.convolution(x, kernel, padding='SAME',
                               dilations=[rate, rate])

    def one_op(x, kernel=kernel, rate=rate):
      return tf.nn.conv2d(x, kernel, 1, 'SAME', dilations=rate)

    figures = [
        _median_ms(tf.function(space_to_batch), x, args.repeats),
        _median_ms(tf.function(one_op), x, args.repeats),
        _median_ms(_with_gradient(space_to_batch, kernel), x, args.repeats),
        _median_ms(_with_gradient(one_op, kernel), x, args.repeats),
    ]
    print(f'{size:4d}  {channels}->{outputs}  {rate:2d} | '
          f'{figures[0]:8.1f}  {figures[1]:8.1f} | '
          f'{figures[2]:8.1f}  {figures[3]:8.1f}', flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())

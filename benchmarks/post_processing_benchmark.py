r"""Latency of the mask-wise merge and of its two-claimant pass.

  python benchmarks/post_processing_benchmark.py --sizes=641,1281

For each output size and each logit sharpness, the merge runs on synthetic
COCO-like inputs: 128 slots of random mask logits at stride 4 (normal noise
times the sharpness; larger means more confident masks and fewer pixels on
shared borders) and class logits with every slot a confident detection, so
the whole merge runs. Times (median of --repeats calls, tf.function, after
a warm-up call; the three alternate within one process):

  merge:    `maskwise_panoptic_inference`, upsampling to the output size
            included (what inference pays after the network);
  dense:    `top_two_slots` on the full-resolution probabilities (first and
            second slot of every pixel);
  gathered: `claiming_slots`, what the merge uses: the second slot only on
            the pixels where one can claim (threshold < p1 < 1 - threshold).

Also printed: the fraction of pixels in that shared band. Random weights of
a real network give flat masks (sharpness ~1, no pixel in the band); a
trained model gives confident masks with a thin band along their borders.
"""

import argparse
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, List, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, installed or not


def _time_ms(fn: Callable[[], object]) -> float:
  """Milliseconds of one call, until every output is computed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  for value in tf.nest.flatten(fn()):
    value.numpy()
  return 1e3 * (time.perf_counter() - start)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='641,1281')
  parser.add_argument('--sharpness', default='1,8,30')
  parser.add_argument('--slots', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=6)
  args = parser.parse_args(argv)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import post_processing as pp  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.data import dataset_info  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.ops import resize  # pylint: disable=g-import-not-at-top

  info = dataset_info.get_dataset_info('coco_panoptic')
  options = pp.MaskWiseOptions()
  threshold = options.pixel_confidence_threshold
  print(f'{platform.node()} {platform.processor() or platform.machine()}, '
        f'TF {tf.__version__}, {time.strftime("%Y-%m-%d %H:%M")}, '
        f'{args.slots} slots, pixel threshold {threshold:g}')
  rng = np.random.default_rng(0)
  for size in (int(s) for s in args.sizes.split(',')):
    coarse = (size - 1) // 4 + 1
    for sharpness in (float(s) for s in args.sharpness.split(',')):
      mask_logits = tf.constant(sharpness * rng.standard_normal(
          [1, coarse, coarse, args.slots]).astype(np.float32))
      class_logits = rng.standard_normal(
          [1, args.slots, info.label_space.class_head_outputs]).astype(
              np.float32)
      class_logits[..., 0] += 10.0  # every slot a confident detection
      class_logits = tf.constant(class_logits)
      probs = tf.reshape(
          tf.nn.softmax(resize.bilinear(mask_logits, (size, size))),
          [1, size * size, args.slots])
      first = tf.reduce_max(probs, axis=-1).numpy()
      band = np.mean((first > threshold) & (first < 1 - threshold))
      merge = tf.function(lambda m, c, s=size: pp.maskwise_panoptic_inference(
          m, c, (s, s), info.label_space, options))
      dense = tf.function(pp.top_two_slots)
      gathered = tf.function(lambda p: pp.claiming_slots(p, threshold))
      calls = {'merge': lambda: merge(mask_logits, class_logits),
               'dense': lambda: dense(probs),
               'gathered': lambda: gathered(probs)}
      times = {name: [] for name in calls}
      for call in calls.values():
        _time_ms(call)  # trace
      for _ in range(args.repeats):
        for name, call in calls.items():
          times[name].append(_time_ms(call))
      del probs
      ratio = (statistics.median(times['gathered']) /
               statistics.median(times['dense']))
      print(f'{size}x{size} sharpness {sharpness:g}: shared band '
            f'{band:5.1%} | ' + ' | '.join(
                f'{name} {statistics.median(ms):6.0f} ms'
                for name, ms in times.items()) +
            f' | gathered / dense {ratio:.2f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

r"""Side by side with DeepLab2 when the model detects something.

`../shared/bench/side_by_side.py` times both implementations with random
weights. Random class heads are never confident (the largest class
probability is about 1/134 for COCO, against thresholds of 0.7 / 0.5), and
DeepLab2's post-processor then returns empty maps without running its
mask-wise merge; ours always runs its merge. So that benchmark compares our
merge with DeepLab2's shortcut, not with its merge. A trained model detects
things in nearly every image.

This script runs the same jobs through side_by_side's own `build` and
`worker` (same input, same measurement, each run in its own process, the two
implementations alternating) after one change applied identically to both
models: every transformer class head's bias gets +`--class_bias` on one
class (default: the first thing class), so every slot is a confident
detection and both merges run on the random masks.

  python benchmarks/side_by_side_detections.py --crops=641,1281 --rounds=2

Needs `../shared/bench` (DeepLab2 beside the project). Prints one line per
run, the fraction of slots detected in each implementation, and the ratios
ours / DeepLab2 (best median of each; peak RSS).
"""

import argparse
import json
import os
import platform
import subprocess
import sys

_BENCH = os.environ.get('DEEPLAB_KMAX_BENCH', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..',
    'shared', 'bench'))
_CLASS_HEAD_BIAS = 'transformer_class_head/conv/bias'


def _make_confident(model, class_index: int, bias: float) -> int:
  """Adds `bias` to one class of every transformer class head; returns how
  many heads were changed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  changed = 0
  for variable in model.variables:
    if _CLASS_HEAD_BIAS in variable.name:
      value = np.zeros(variable.shape, np.float32)
      value[class_index] = bias
      variable.assign_add(value)
      changed += 1
  if not changed:
    raise RuntimeError(f'No variable named like *{_CLASS_HEAD_BIAS}* in the '
                       f'{type(model).__name__}; cannot make it confident.')
  return changed


def _detected_fraction(model, crop, batch) -> float:
  """Share of slots whose best non-void class passes 0.5 (stuff threshold),
  on the input side_by_side's worker times."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.constant(np.random.default_rng(0).uniform(
      0, 255, [batch] + list(crop) + [3]).astype(np.float32))
  logits = model(x, training=False)['transformer_class_logits']
  probs = tf.nn.softmax(logits, axis=-1)[..., :-1]
  return float(np.mean(tf.reduce_max(probs, axis=-1).numpy() > 0.5))


def _worker(job) -> dict:
  sys.path.insert(0, _BENCH)
  import side_by_side  # pylint: disable=g-import-not-at-top
  original_build = side_by_side.build
  extra = {}

  def build(impl, config, crop, batch):
    model = original_build(impl, config, crop, batch)
    extra['heads_changed'] = _make_confident(model, job['class_index'],
                                             job['class_bias'])
    extra['model'] = model
    return model

  side_by_side.build = build
  result = side_by_side.worker(
      impl=job['impl'], config=job['config'], crop=job['crop'],
      batch=job['batch'], mode='infer', repeats=job['repeats'],
      warmup=job['warmup'])
  # After the timing, so that this eager call does not count in peak RSS.
  result['detected_fraction'] = _detected_fraction(
      extra.pop('model'), job['crop'], job['batch'])
  result.update(extra)
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='coco_kmax_meta_r50_os32',
                      help='a file name (no extension) in '
                      'reference/deeplab2_configs')
  parser.add_argument('--crops', default='641,1281')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--class_index', type=int, default=0,
                      help='class head index made confident (0: COCO person)')
  parser.add_argument('--class_bias', type=float, default=10.0)
  parser.add_argument('--_worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:  # pylint: disable=protected-access
    print(json.dumps(_worker(json.loads(args._worker))))  # pylint: disable=protected-access
    return 0
  if not os.path.isdir(os.path.join(_BENCH, 'deeplab2')):
    print(f'DeepLab2 not found under {_BENCH} (set DEEPLAB_KMAX_BENCH).')
    return 2
  print(f'# machine: {platform.machine()} {platform.processor()} '
        f'cores={os.cpu_count()}; config={args.config}; class '
        f'{args.class_index} bias +{args.class_bias}')
  env = dict(os.environ, TF_USE_LEGACY_KERAS='1', TF_CPP_MIN_LOG_LEVEL='2')
  runs, failed = [], False
  for crop_text in args.crops.split(','):
    crop = ([int(v) for v in crop_text.split('x')] if 'x' in crop_text
            else [int(crop_text)] * 2)
    for round_index in range(args.rounds):
      order = ('ours', 'deeplab2') if round_index % 2 == 0 else (
          'deeplab2', 'ours')
      for impl in order:
        job = dict(impl=impl, config=args.config, crop=crop,
                   batch=args.batch, repeats=args.repeats,
                   warmup=args.warmup, class_index=args.class_index,
                   class_bias=args.class_bias)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), '--_worker',
             json.dumps(job)], capture_output=True, text=True, env=env,
            check=False)
        if proc.returncode:
          print(f'{impl} {crop}: FAILED\n{proc.stderr[-1500:]}', flush=True)
          failed = True
          continue
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"{impl:8s} {'x'.join(map(str, crop))} b{args.batch} infer "
              f"with detections ({run['detected_fraction']:.0%} of slots): "
              f"median {run['median_s']:.3f}s min {run['min_s']:.3f}s "
              f"peak_rss {run['peak_rss_gb']:.2f}GB", flush=True)
  for crop in sorted({tuple(r['crop']) for r in runs}):
    ours = [r for r in runs if tuple(r['crop']) == crop and r['impl'] == 'ours']
    theirs = [r for r in runs
              if tuple(r['crop']) == crop and r['impl'] == 'deeplab2']
    if ours and theirs:
      time_ratio = (min(r['median_s'] for r in ours) /
                    min(r['median_s'] for r in theirs))
      memory_ratio = (max(r['peak_rss_gb'] for r in ours) /
                      max(r['peak_rss_gb'] for r in theirs))
      print(f"ratio ours/deeplab2 {'x'.join(map(str, crop))} infer with "
            f'detections: time {time_ratio:.2f}x  peak memory '
            f'{memory_ratio:.2f}x')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())

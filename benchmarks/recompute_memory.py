"""Peak memory per training image, with and without activation recomputation.

Runs the network's training step (benchmarks/network_steps.py: forward with
training=True and the gradients of every trainable variable, no loss, no
optimizer) once per (batch size, recomputation) setting, each in its own
process, and prints the process's peak resident memory. The model is built
at a small crop (variables do not depend on it), so the peak is the step's.
The memory per training image is the growth of the peak from the smallest
to the largest batch, divided by the added images, which leaves out what
every step holds whatever its batch (weights, gradients, TF runtime).

  python benchmarks/recompute_memory.py \
      --config_file=configs/coco/kmax_meta_r50.textproto --crop=641 \
      --batch_sizes=1,2
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

import network_steps  # benchmarks/, beside this script

_CONFIG = flags.DEFINE_string(
    'config_file', 'configs/coco/kmax_meta_r50.textproto',
    'Experiment config (textproto) naming the model.')
_CROP = flags.DEFINE_integer('crop', 641, 'Square training crop.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '2'],
                                 'Images per step, one process each.')
_REPEATS = flags.DEFINE_integer('repeats', 1,
                                'Timed steps after the first (traced) one.')
_WORKER = flags.DEFINE_string('_worker', '',
                              'Internal: run one setting (json).')
_BUILD_CROP = 129


def _run_one(setting):
  """One process: builds the model, runs the step; returns a result dict."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(setting['config_file'])
  config.trainer_options.recompute_activations = setting['recompute']
  model = model_lib.build_model(config, crop_size=(_BUILD_CROP, _BUILD_CROP))
  crop = setting['crop']
  images = tf.constant(np.random.default_rng(0).uniform(
      0, 255, (setting['batch_size'], crop, crop, 3)).astype(np.float32))
  step = network_steps.train_step(model)
  start = time.perf_counter()
  network_steps.block(step(images))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(setting['repeats']):
    start = time.perf_counter()
    network_steps.block(step(images))
    times.append(time.perf_counter() - start)
  result = dict(setting)
  result['first_step_s'] = first_s
  result['step_s'] = float(np.median(times)) if times else None
  result['peak_rss_bytes'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  return result


def per_image_bytes(results):
  """{recompute: bytes per added image} from the smallest to largest batch."""
  per_image = {}
  for recompute in (False, True):
    runs = sorted((r for r in results if r['recompute'] == recompute),
                  key=lambda r: r['batch_size'])
    if len(runs) >= 2 and runs[-1]['batch_size'] > runs[0]['batch_size']:
      per_image[recompute] = (
          (runs[-1]['peak_rss_bytes'] - runs[0]['peak_rss_bytes']) /
          (runs[-1]['batch_size'] - runs[0]['batch_size']))
  return per_image


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_run_one(json.loads(_WORKER.value))))
    return
  load = os.getloadavg()
  print(f'# {platform.machine()} cores={os.cpu_count()} load={load[0]:.2f} '
        f'config={_CONFIG.value} crop={_CROP.value}')
  results = []
  for batch_size in [int(b) for b in _BATCH_SIZES.value]:
    for recompute in (False, True):
      setting = dict(config_file=_CONFIG.value, crop=_CROP.value,
                     batch_size=batch_size, recompute=recompute,
                     repeats=_REPEATS.value)
      proc = subprocess.run(
          [sys.executable, __file__, f'--_worker={json.dumps(setting)}'],
          capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        print(f'batch={batch_size} recompute={recompute}: FAILED '
              f'(exit {proc.returncode})\n{proc.stderr[-2000:]}')
        continue
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      results.append(r)
      step = f" step={r['step_s']:.1f}s" if r['step_s'] is not None else ''
      print(f"batch={batch_size} recompute={recompute}: "
            f"peak_rss={r['peak_rss_bytes'] / 2**30:.2f}GiB "
            f"({r['peak_rss_bytes'] / r['batch_size'] / 2**30:.2f}GiB per "
            f"image) first_step={r['first_step_s']:.1f}s{step}",
            flush=True)
  for recompute, value in per_image_bytes(results).items():
    print(f'recompute={recompute}: {value / 2**30:.2f}GiB '
          f'({value:.0f} bytes) per added training image')


if __name__ == '__main__':
  app.run(main)

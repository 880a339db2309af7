"""Forward latency and peak memory of a kMaX-DeepLab model.

Each (crop, XLA) setting runs in its own subprocess so that the peak resident
memory reported for it is its own. Prints one line per setting, e.g.

  python benchmarks/model_benchmark.py --config_file=configs/coco/kmax_meta_r50.textproto \
      --crops=641,1281 --repeats=10

Latency is the median over `--repeats` calls after `--warmup` calls, with
post-processing included (what a user of `model(images)` pays).
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

_CONFIG = flags.DEFINE_string('config_file', 'configs/coco/kmax_meta_r50.textproto',
                              'Experiment config (textproto) naming the model.')
_CROPS = flags.DEFINE_list('crops', ['641', '1281'], 'Square input sizes.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per call.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per setting.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls before timing.')
_MODES = flags.DEFINE_list(
    'modes', ['graph', 'xla'],
    'Execution modes: eager (plain call), graph (tf.function), '
    'folded (graph with the batch norms folded into the convolutions, '
    'layers/bn_folding.py), xla (tf.function with jit_compile).')
_DEVICE = flags.DEFINE_string('device', '', 'Device string, e.g. /GPU:0; '
                              'default: TensorFlow placement.')
_WORKER = flags.DEFINE_string('_worker', '', 'Internal: run one setting (json).')


def _run_one(setting):
  """Builds the model and times it; returns a result dict."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(setting['config_file'])
  crop = setting['crop']
  model = model_lib.build_model(config)  # variables at a small size
  images = tf.constant(np.random.default_rng(0).uniform(
      0, 255, (setting['batch_size'], crop, crop, 3)).astype(np.float32))

  def call(x):
    return model(x, training=False)

  mode = setting['mode']
  if mode == 'eager':
    forward = call
  elif mode in ('graph', 'folded', 'xla'):
    if mode == 'folded':
      from deeplab_kmax.layers import bn_folding  # pylint: disable=g-import-not-at-top
      bn_folding.enable(model)
    forward = tf.function(call, jit_compile=(mode == 'xla'))
  else:
    raise ValueError(f'unknown mode {mode!r}; use eager, graph, folded or '
                     'xla.')

  device = setting['device'] or None
  with tf.device(device) if device else _null():
    for _ in range(setting['warmup']):
      _block(forward(images))
    times = []
    for _ in range(setting['repeats']):
      start = time.perf_counter()
      _block(forward(images))
      times.append(time.perf_counter() - start)
  result = dict(setting)
  result['median_ms'] = 1000 * float(np.median(times))
  result['min_ms'] = 1000 * float(np.min(times))
  result['peak_rss_mib'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024
  if tf.config.list_physical_devices('GPU'):
    info = tf.config.experimental.get_memory_info('GPU:0')
    result['gpu_peak_mib'] = info['peak'] / 2**20
  return result


class _null:

  def __enter__(self):
    return self

  def __exit__(self, *args):
    return False


def _block(outputs):
  for value in outputs.values():
    if hasattr(value, 'numpy'):
      value.numpy()


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_run_one(json.loads(_WORKER.value))))
    return
  print(f'# machine: {platform.machine()} {platform.processor() or ""} '
        f'cores={os.cpu_count()} python={platform.python_version()}')
  for crop in [int(c) for c in _CROPS.value]:
    for mode in _MODES.value:
      setting = dict(config_file=_CONFIG.value, crop=crop,
                     batch_size=_BATCH.value, repeats=_REPEATS.value,
                     warmup=_WARMUP.value, mode=mode, device=_DEVICE.value)
      proc = subprocess.run(
          [sys.executable, __file__, f'--_worker={json.dumps(setting)}'],
          capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        print(f'crop={crop} mode={mode}: FAILED\n{proc.stderr[-2000:]}')
        continue
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      gpu = f" gpu_peak={r['gpu_peak_mib']:.0f}MiB" if 'gpu_peak_mib' in r else ''
      print(f"crop={crop} batch={r['batch_size']} mode={mode}: "
            f"median={r['median_ms']:.1f}ms min={r['min_ms']:.1f}ms "
            f"peak_rss={r['peak_rss_mib']:.0f}MiB{gpu}")


if __name__ == '__main__':
  app.run(main)

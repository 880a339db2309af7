r"""Latency of the exported serving SavedModel, per image, per resolution.

  python benchmarks/saved_model_benchmark.py \
      --config_file=configs/coco/kmax_meta_r50.textproto \
      --resolutions=641,1281 --repeats=5

For every resolution R the model is exported with its evaluation crop set to
R x R (random weights unless --checkpoint_path is given; weights do not
change the cost), then loaded in a fresh process and timed on an R x R uint8
image through the `serving_default` signature, i.e. with the in-graph
resize, padding, post-processing and resize back included. Each device
(`cpu`, and `gpu` when TensorFlow sees one) runs in its own process.

Prints one line per (resolution, device): export time, load time, first
call (includes graph optimisation), median and min latency of the following
calls, and the process's peak resident memory.

With --in_process (default), the same serving function is also timed
without export: the serving module is built in a fresh process and its
`serve_image` tf.function (what `serving_default` is traced from) is called
on the same image; the two alternate --rounds times and the last line per
resolution gives SavedModel / in-process (best median of each).
"""

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = flags.DEFINE_string(
    'config_file', 'configs/coco/kmax_meta_r50.textproto',
    'Experiment config (textproto) of the model.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint_path', None, 'Optional checkpoint; random weights otherwise.')
_RESOLUTIONS = flags.DEFINE_list('resolutions', ['641', '1281'],
                                 'Square evaluation crops to benchmark.')
_DEVICES = flags.DEFINE_list('devices', ['cpu', 'gpu'],
                             'Devices to time on (gpu is skipped if absent).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per setting.')
_WARMUP = flags.DEFINE_integer('warmup', 1,
                               'Untimed calls after the first call.')
_IN_PROCESS = flags.DEFINE_boolean(
    'in_process', True,
    'Also time the unexported serving tf.function (same graph, same image) '
    'and print the SavedModel / in-process ratio.')
_ROUNDS = flags.DEFINE_integer(
    'rounds', 1, 'Alternations of SavedModel and in-process timing.')
_WORKER = flags.DEFINE_string('_worker', '', 'Internal: one job (json).')


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serving_module(job):
  """The serving module at the job's resolution, as the exporter builds it."""
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top
  size = job['resolution']
  config = config_lib.load_config(job['config_file'])
  config = config_lib.override(config, {
      'eval_dataset_options.crop_size': [size, size],
      'eval_dataset_options.min_resize_value': [size],
      'eval_dataset_options.max_resize_value': [size],
  })
  return model_loading.build_serving_module_from_checkpoint(
      config, job['checkpoint_path'])


def _export(job):
  """Exports the model at one resolution; returns seconds."""
  from deeplab_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  module = _serving_module(job)
  saved_model.write_saved_model(module, job['saved_model_dir'])
  return {'export_s': time.perf_counter() - start}


def _time(job):
  """Loads the SavedModel and times serving_default on one device."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  device = job['device']
  gpus = tf.config.list_physical_devices('GPU')
  if device == 'gpu' and not gpus:
    return {'skipped': 'no GPU visible to TensorFlow'}
  result = {'device_name': (tf.config.experimental.get_device_details(
      gpus[0]).get('device_name', 'GPU') if device == 'gpu' else
                            platform.processor() or platform.machine())}
  start = time.perf_counter()
  if job['task'] == 'in_process':
    # Held here: a tf.function method keeps its module only weakly.
    module = _serving_module(job)
    function = module.serve_image
  else:
    loaded = tf.saved_model.load(job['saved_model_dir'])
    function = loaded.signatures['serving_default']
  result['load_s'] = time.perf_counter() - start
  size = job['resolution']
  image = tf.constant(np.random.default_rng(0).integers(
      0, 256, (size, size, 3), dtype=np.uint8))

  def call():
    outputs = function(image=image)
    outputs['panoptic_pred'].numpy()  # Waits for the device.

  with tf.device('/GPU:0' if device == 'gpu' else '/CPU:0'):
    start = time.perf_counter()
    call()
    result['first_call_s'] = time.perf_counter() - start
    for _ in range(job['warmup']):
      call()
    times = []
    for _ in range(job['repeats']):
      start = time.perf_counter()
      call()
      times.append(time.perf_counter() - start)
  result['median_ms'] = 1000 * float(np.median(times))
  result['min_ms'] = 1000 * float(np.min(times))
  result['peak_rss_mib'] = _peak_rss_mib()
  if device == 'gpu':
    result['gpu_peak_mib'] = tf.config.experimental.get_memory_info(
        'GPU:0')['peak'] / 2**20
  return result


def _run_worker(job) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  if job.get('device') == 'cpu':
    env['CUDA_VISIBLE_DEVICES'] = ''
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__),
       f'--_worker={json.dumps(job)}'],
      capture_output=True, text=True, check=False, env=env)
  if proc.returncode != 0:
    return {'error': proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _WORKER.value:
    job = json.loads(_WORKER.value)
    print(json.dumps(_export(job) if job['task'] == 'export' else _time(job)))
    return
  print(f'# machine: {platform.machine()} {platform.processor() or ""} '
        f'cores={os.cpu_count()} python={platform.python_version()} '
        f'config={_CONFIG.value}')
  workdir = tempfile.mkdtemp(prefix='kmax_sm_benchmark_')
  try:
    for size in (int(r) for r in _RESOLUTIONS.value):
      job = dict(config_file=_CONFIG.value, resolution=size,
                 checkpoint_path=_CHECKPOINT.value, repeats=_REPEATS.value,
                 warmup=_WARMUP.value,
                 saved_model_dir=os.path.join(workdir, f'r{size}'))
      exported = _run_worker(dict(job, task='export'))
      if 'error' in exported:
        print(f'resolution={size}: export FAILED\n{exported["error"]}')
        continue
      tasks = ['time', 'in_process'] if _IN_PROCESS.value else ['time']
      for device in _DEVICES.value:
        best = {}
        for round_index in range(_ROUNDS.value):
          # Swap the order each round so that drifting load hits both.
          for task in tasks if round_index % 2 == 0 else tasks[::-1]:
            r = _run_worker(dict(job, task=task, device=device))
            what = 'saved_model' if task == 'time' else 'in_process'
            if 'error' in r:
              print(f'resolution={size} device={device} {what}: '
                    f'FAILED\n{r["error"]}')
              continue
            if 'skipped' in r:
              print(f'resolution={size} device={device}: skipped '
                    f'({r["skipped"]})')
              break
            best[what] = min(best.get(what, float('inf')), r['median_ms'])
            gpu = (f" gpu_peak={r['gpu_peak_mib']:.0f}MiB"
                   if 'gpu_peak_mib' in r else '')
            setup = (f"load={r['load_s']:.1f}s "
                     f"export={exported['export_s']:.0f}s"
                     if task == 'time' else f"build={r['load_s']:.1f}s")
            print(f"resolution={size} device={device} ({r['device_name']}) "
                  f"{what}: median={r['median_ms']:.0f}ms "
                  f"min={r['min_ms']:.0f}ms "
                  f"first_call={r['first_call_s']:.1f}s {setup} "
                  f"peak_rss={r['peak_rss_mib']:.0f}MiB{gpu}", flush=True)
        if len(best) == 2:
          print(f'resolution={size} device={device}: SavedModel / in-process '
                f"{best['saved_model'] / best['in_process']:.2f}x "
                '(best median of each)', flush=True)
      shutil.rmtree(job['saved_model_dir'], ignore_errors=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)

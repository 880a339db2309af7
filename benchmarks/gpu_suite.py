"""GPU figures in one go (about 5 minutes on one GPU): images/s and peak memory.

  python benchmarks/gpu_suite.py            # on a machine with a GPU
  python benchmarks/gpu_suite.py --smoke    # tiny demo model, one step, CPU

Settings (COCO kMaX-R50, random weights, random input, tf.function):

  inference at 1281x1281, batch 1, post-processing included:
      float32 | bfloat16 | float32 + XLA
  training step at 641x641, batch 8 (forward + backward of the network,
      gradients of a scalar of its outputs, as ../shared/bench/side_by_side.py
      measures): bfloat16 + XLA

and the same settings for the official DeepLab2 code when
../shared/bench/deeplab2 is present (its model is built as side_by_side.py
builds it, in a separate process with TF_USE_LEGACY_KERAS=1). Each setting
runs in its own process; peak memory is TensorFlow's GPU allocator peak
(`get_memory_info('GPU:0')['peak']` after `reset_memory_stats`), or the peak
resident memory of the process where there is no GPU. A setting that fails
(e.g. DeepLab2 under a bfloat16 policy) prints FAILED and the suite goes on.

Anchor: the kMaX-DeepLab paper reports 22.8 images/s for kMaX-R50 at
1281x1281 on a V100.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import network_steps  # benchmarks/, beside this script
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]
# This checkout, whether or not (or wherever) the package is installed.
sys.path.insert(0, str(REPO))
BENCH = REPO.parent / 'shared' / 'bench'
COCO_R50 = 'coco_kmax_meta_r50_os32'
PAPER_ANCHOR = ('paper (kMaX-DeepLab, ECCV 2022): kMaX-R50 22.8 images/s at '
                '1281x1281 on a V100')
SMOKE_CONFIG = REPO / 'configs' / 'demo' / 'kmax_demo.textproto'
SMOKE_CROP = 33


@dataclasses.dataclass(frozen=True)
class Setting:
  mode: str  # 'infer' or 'train'
  crop: int
  batch: int
  precision: str  # precision_options.TRAINING_PRECISIONS names
  xla: bool

  @property
  def label(self) -> str:
    extra = ' + XLA' if self.xla else ''
    return (f'{self.mode} {self.crop}x{self.crop} b{self.batch} '
            f'{self.precision}{extra}')


SETTINGS = (
    Setting('infer', 1281, 1, 'float32', False),
    Setting('infer', 1281, 1, 'bfloat16', False),
    Setting('infer', 1281, 1, 'float32', True),
    Setting('train', 641, 8, 'bfloat16', True),
)


def _smoke(setting: Setting) -> Setting:
  return dataclasses.replace(setting, crop=SMOKE_CROP, batch=1)


def _build(impl: str, setting: Setting, smoke: bool):
  """The model of `impl` under the setting's precision, built."""
  from deeplab_kmax import precision_options  # pylint: disable=g-import-not-at-top
  crop = [setting.crop] * 2
  if impl == 'deeplab2':
    sys.path.insert(0, str(BENCH))
    import side_by_side  # pylint: disable=g-import-not-at-top,import-error
    tf.keras.mixed_precision.set_global_policy(
        precision_options.KERAS_POLICIES[setting.precision])
    return side_by_side.build('deeplab2', COCO_R50, crop, setting.batch)
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import precision  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.testing import reference  # pylint: disable=g-import-not-at-top
  if smoke:
    path = SMOKE_CONFIG
  else:
    path = reference.reference_dir() / 'deeplab2_configs' / (
        COCO_R50 + '.textproto')
  config = config_lib.load_config(str(path))
  config.model_options.backbone.ClearField('pretrained_weights')
  config.model_options.initial_checkpoint = ''
  with precision.keras_policy(setting.precision):
    if smoke:
      from deeplab_kmax.data import demo_dataset  # pylint: disable=g-import-not-at-top
      return model_lib.build_model(config, demo_dataset.dataset_info(),
                                   crop_size=crop)
    return model_lib.build_model(config, crop_size=crop)


def _step_fn(model, setting: Setting):
  make = (network_steps.infer_step if setting.mode == 'infer'
          else network_steps.train_step)
  return make(model, jit_compile=setting.xla)


def measure(impl: str, setting: Setting, seconds: float,
            smoke: bool) -> Dict[str, Any]:
  """Builds, warms up (compiles) and times one setting in this process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  gpu = bool(tf.config.list_physical_devices('GPU'))
  model = _build(impl, setting, smoke)
  step = _step_fn(model, setting)
  images = tf.constant(np.random.default_rng(0).uniform(
      0, 255, [setting.batch, setting.crop, setting.crop, 3]), tf.float32)
  start = time.perf_counter()
  network_steps.block(step(images))  # Trace (and compile with XLA).
  warmup_s = time.perf_counter() - start
  if gpu:
    tf.config.experimental.reset_memory_stats('GPU:0')
  times = []
  deadline = time.perf_counter() + seconds
  while not times or (time.perf_counter() < deadline and len(times) < 50):
    start = time.perf_counter()
    network_steps.block(step(images))
    times.append(time.perf_counter() - start)
    if smoke:
      break
  result = {'impl': impl, 'setting': setting.label, 'steps': len(times),
            'warmup_s': warmup_s,
            'images_per_s': setting.batch / float(np.median(times))}
  if gpu:
    result['peak_gpu_mib'] = (
        tf.config.experimental.get_memory_info('GPU:0')['peak'] / 2**20)
  else:
    result['peak_rss_mib'] = resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def _describe(result: Dict[str, Any]) -> str:
  memory = (f"peak GPU {result['peak_gpu_mib']:.0f} MiB"
            if 'peak_gpu_mib' in result else
            f"peak RSS {result['peak_rss_mib']:.0f} MiB (no GPU)")
  return (f"{result['impl']:9s} {result['setting']:34s} "
          f"{result['images_per_s']:8.2f} images/s  {memory}  "
          f"(first call {result['warmup_s']:.1f}s, {result['steps']} timed)")


def _run_worker(impl: str, setting: Setting, seconds: float, smoke: bool,
                timeout: float) -> Optional[Dict[str, Any]]:
  job = json.dumps({'impl': impl, 'setting': dataclasses.asdict(setting),
                    'seconds': seconds, 'smoke': smoke})
  # This checkout first, whether or not the package is installed.
  paths = [str(REPO), os.environ.get('PYTHONPATH', '')]
  if impl == 'deeplab2':
    paths.insert(0, str(BENCH))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=os.pathsep.join(p for p in paths if p))
  if impl == 'deeplab2':
    env['TF_USE_LEGACY_KERAS'] = '1'
  try:
    done = subprocess.run([sys.executable, __file__, '--_worker', job],
                          capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f'{impl:9s} {setting.label:34s} FAILED (over {timeout:.0f}s)',
          flush=True)
    return None
  if done.returncode != 0:
    reason = (done.stderr.strip().splitlines() or ['no output'])[-1]
    print(f'{impl:9s} {setting.label:34s} FAILED: {reason[:200]}',
          flush=True)
    return None
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true',
                      help='demo model, 33x33, batch 1, one step, on CPU, '
                      'all settings in this process, ours only')
  parser.add_argument('--seconds', type=float, default=20.0,
                      help='timed seconds per setting after its first call')
  parser.add_argument('--budget', type=float, default=300.0,
                      help='skip settings that would start after this many '
                      'seconds')
  parser.add_argument('--_worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    job = json.loads(args._worker)  # pylint: disable=protected-access
    print(json.dumps(measure(job['impl'], Setting(**job['setting']),
                             job['seconds'], job['smoke'])))
    return 0

  if args.smoke:
    tf.config.set_visible_devices([], 'GPU')
  impls = ['ours']
  if not args.smoke and (BENCH / 'deeplab2').is_dir():
    impls.append('deeplab2')
  elif not args.smoke:
    print(f'DeepLab2 not found at {BENCH / "deeplab2"}: ours only.')
  print(PAPER_ANCHOR)
  start, failures = time.time(), 0
  for setting in SETTINGS:
    if args.smoke:
      setting = _smoke(setting)
    for impl in impls:
      elapsed = time.time() - start
      if elapsed > args.budget and not args.smoke:
        print(f'{impl:9s} {setting.label:34s} skipped (budget of '
              f'{args.budget:.0f}s spent)')
        continue
      if args.smoke:  # One process for all: a quick check, not figures.
        result = measure(impl, setting, args.seconds, smoke=True)
      else:
        result = _run_worker(impl, setting, args.seconds, smoke=False,
                             timeout=max(60.0, args.budget - elapsed + 120))
      if result is None:
        failures += impl == 'ours'
      else:
        print(_describe(result), flush=True)
  print(f'total {time.time() - start:.0f}s')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())

r"""kMaX's pixel-cluster interaction ablation, and the CMT / ClusterFormer
decoders, trained on the demo dataset with one budget (not a test).

Every variant trains from scratch on `configs/demo/kmax_demo.textproto` with
only the clustering-family fields changed (docs/clustering_family.md): same
steps, seed, batch, crop and model width. Each runs in its own process
(`train`, then `eval` of the last checkpoint on the validation split), and
one table is printed:

  variant | PQ | PQ_thing | PQ_stuff | mIoU | steps/s | parameters

  python benchmarks/cluster_ablation.py                # full: --steps=1000
  python benchmarks/cluster_ablation.py --smoke        # 3 steps, tiny data

Budget: the default 1000 steps per variant (demo.sh trains 1100) takes
about 65-80 minutes for the five variants on the project's 2-core CPU
machine (about 1.0-1.3 steps/s at batch 8, plus model building, tracing and
a 64-image evaluation per variant); at 600 steps no variant yet outputs
confident masks, so PQ says little there.
`--smoke` renders 8 + 4 images and trains 3 steps per variant at crop 65
with eager evaluation, only to show that the pipeline works (its numbers
mean nothing). steps/s is the median of
the trainer's per-loop rates after the first loop (which includes tracing),
or the overall rate when there is only one loop; it depends on machine load.
The seed fixes initialisation (`tf_keras.utils.set_random_seed`); the input
pipeline shuffles with its own seeds.
"""

import json
import logging as std_logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax.layers import cluster_options  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, 'configs', 'demo', 'kmax_demo.textproto')
PREFIX = 'model_options.max_deeplab'
# Variant -> clustering-family fields over the base config (the first row is
# the base config itself: kMaX, cluster_argmax).
VARIANTS = {'cluster_argmax (kMaX)': {}, **cluster_options.VARIANTS}
SMOKE_STEPS = 3

_STEPS = flags.DEFINE_integer('steps', 1000, 'Training steps per variant.')
_SMOKE = flags.DEFINE_boolean(
    'smoke', False, f'{SMOKE_STEPS} steps per variant on 8 + 4 images.')
_SEED = flags.DEFINE_integer('seed', 0, 'Initialisation seed (all variants).')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS),
                              'Subset of the variants to run.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where models and the dataset go (default: a '
    'temporary folder).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'An existing demo dataset (data/build_demo_data.py '
    '--output_dir); default: render one into --output_dir.')
_RUN_ONE = flags.DEFINE_string('run_one', None,
                               'Internal: run one variant, write JSON.')
_RESULT = flags.DEFINE_string('result_file', None, 'Internal: JSON output.')

_RATE = re.compile(r'step (\d+): .*?([0-9.]+) steps/s')


def variant_overrides(variant: str, steps: int, data_dir: str,
                      smoke: bool = False) -> dict:
  """Config overrides of one ablation row (`smoke`: crop 65, eager eval)."""
  overrides = {f'{PREFIX}.{key}': value
               for key, value in VARIANTS[variant].items()}
  loop = max(1, min(50, steps))
  overrides.update({
      'trainer_options.solver_options.training_number_of_steps': steps,
      'trainer_options.solver_options.warmup_steps': min(50, steps),
      'trainer_options.steps_per_loop': loop,
      'trainer_options.save_summaries_steps': loop * max(1, 200 // loop),
      'trainer_options.save_checkpoints_steps': steps,
  })
  for split in ('train', 'eval'):
    overrides[f'{split}_dataset_options.dataset_descriptor'] = os.path.join(
        data_dir, 'demo_shapes.json')
    overrides[f'{split}_dataset_options.file_pattern'] = [os.path.join(
        data_dir, 'tfrecord', f'{"train" if split == "train" else "val"}-'
        '*.tfrecord')]
    if smoke:
      overrides[f'{split}_dataset_options.crop_size'] = [65, 65]
      overrides[f'{split}_dataset_options.min_resize_value'] = [65]
      overrides[f'{split}_dataset_options.max_resize_value'] = [65]
  if smoke:
    overrides['evaluator_options.use_tf_function'] = False
  return overrides


class _RateLog(std_logging.Handler):
  """Collects the trainer's per-loop `steps/s` lines."""

  def __init__(self):
    super().__init__()
    self.rates = []

  def emit(self, record):
    match = _RATE.search(record.getMessage())
    if match:
      self.rates.append((int(match.group(1)), float(match.group(2))))


def run_one(variant: str, steps: int, seed: int, data_dir: str,
            model_dir: str, smoke: bool = False) -> dict:
  """Trains and evaluates one variant in this process."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model_summary  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.override(config_lib.load_config(BASE_CONFIG),
                              variant_overrides(variant, steps, data_dir,
                                                smoke))
  strategy = tf.distribute.OneDeviceStrategy('CPU:0')
  tf_keras.utils.set_random_seed(seed)
  rates = _RateLog()
  std_logging.getLogger('absl').addHandler(rates)
  start = time.time()
  train_lib.run_experiment('train', config, model_dir, strategy=strategy)
  train_seconds = time.time() - start
  std_logging.getLogger('absl').removeHandler(rates)
  metrics = train_lib.run_experiment('eval', config, model_dir,
                                     strategy=strategy)
  first_loop_end = rates.rates[0][0] if rates.rates else 0
  later = [rate for step, rate in rates.rates if step > first_loop_end]
  steps_per_second = (statistics.median(later) if later else
                      steps / max(train_seconds, 1e-9))
  tf_keras.backend.clear_session()
  model = train_lib.Builders().model(
      config, train_lib.Builders().dataset_info(config.train_dataset_options),
      [65, 65])
  counts = model_summary.parameter_counts(model)
  return {
      'variant': variant,
      'PQ': float(metrics['evaluation/pq/PQ']),
      'PQ_thing': float(metrics['evaluation/pq/PQ_thing']),
      'PQ_stuff': float(metrics['evaluation/pq/PQ_stuff']),
      'mIoU': float(metrics['evaluation/iou/mIoU']),
      'steps_per_second': steps_per_second,
      'train_seconds': train_seconds,
      'parameters': int(counts.trainable_parameters),
  }


def format_table(rows) -> str:
  lines = ['| variant | PQ | PQ_thing | PQ_stuff | mIoU | steps/s | '
           'parameters |', '|---|---|---|---|---|---|---|']
  for row in rows:
    lines.append(
        f'| {row["variant"]} | {100 * row["PQ"]:.1f} | '
        f'{100 * row["PQ_thing"]:.1f} | {100 * row["PQ_stuff"]:.1f} | '
        f'{100 * row["mIoU"]:.1f} | {row["steps_per_second"]:.2f} | '
        f'{row["parameters"] / 1e6:.2f}M |')
  return '\n'.join(lines)


def _ensure_data(output_dir: str) -> str:
  if _DATA_DIR.value:
    return _DATA_DIR.value
  data_dir = os.path.join(output_dir, 'data')
  if not os.path.exists(os.path.join(data_dir, 'demo_shapes.json')):
    from deeplab_kmax.data import demo_dataset  # pylint: disable=g-import-not-at-top
    sizes = dict(num_train=8, num_val=4, num_shards=1) if _SMOKE.value else {}
    print(f'rendering the demo dataset into {data_dir} ...', flush=True)
    demo_dataset.build(data_dir, seed=0, **sizes)
  return data_dir


def main(argv):
  del argv
  if _RUN_ONE.value:
    result = run_one(_RUN_ONE.value, _STEPS.value, _SEED.value,
                     _DATA_DIR.value, _OUTPUT_DIR.value, _SMOKE.value)
    with open(_RESULT.value + '.tmp', 'w') as f:
      json.dump(result, f)
    os.replace(_RESULT.value + '.tmp', _RESULT.value)
    return
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; expected some of '
                         f'{list(VARIANTS)}.')
  steps = SMOKE_STEPS if _SMOKE.value else _STEPS.value
  output_dir = _OUTPUT_DIR.value or tempfile.mkdtemp(prefix='cluster_ablation_')
  data_dir = _ensure_data(output_dir)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  rows = []
  start = time.time()
  for variant in _VARIANTS.value:
    slug = re.sub(r'\W+', '_', variant).strip('_')
    model_dir = os.path.join(output_dir, 'models', slug)
    result_file = os.path.join(output_dir, f'{slug}.json')
    print(f'== {variant}: {steps} steps -> {model_dir}', flush=True)
    command = [sys.executable, os.path.abspath(__file__),
               f'--run_one={variant}', f'--steps={steps}',
               f'--seed={_SEED.value}', f'--data_dir={data_dir}',
               f'--output_dir={model_dir}', f'--result_file={result_file}',
               f'--smoke={_SMOKE.value}']
    process = subprocess.run(command, env=env, cwd=REPO, check=False,
                             capture_output=True, text=True)
    if process.returncode != 0:
      sys.stderr.write(process.stderr[-5000:])
      raise RuntimeError(f'variant {variant!r} failed '
                         f'({process.returncode}); see above.')
    with open(result_file) as f:
      rows.append(json.load(f))
    print(f'   done in {time.time() - start:.0f} s', flush=True)
  print(f'\nClustering-family ablation on demo_shapes, {steps} steps per '
        f'variant, seed {_SEED.value}{" (smoke run)" if _SMOKE.value else ""}'
        f', total {time.time() - start:.0f} s:\n')
  print(format_table(rows))


if __name__ == '__main__':
  app.run(main)

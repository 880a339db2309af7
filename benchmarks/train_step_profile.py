r"""Where one training step of a config spends its time, part by part.

  DEMO_DIR=demo_output/data python benchmarks/train_step_profile.py \
      --config_file=configs/demo/kmax_demo.textproto --repeats=20

Times, each as the median of `--repeats` calls of its own tf.function on one
fixed batch (after warm-up):

  input       next batch from the training input pipeline (decode, augment,
              kMaX targets), measured by draining the iterator
  forward     the network in training mode
  network     forward + backward of the network alone (gradient of the sum
              of its outputs, no loss)
  loss        forward + loss, Hungarian matching included (no backward)
  gradients   forward + loss + backward
  step        the trainer's whole step (gradients + AdamW updates)

and the share of `step` that each difference accounts for. The input pipeline
runs in parallel with the step during training (prefetch), so it costs time
only where it is slower than the step. Prints one table; the numbers are
this machine's at this moment -- compare shares, not absolute times.
"""

import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = flags.DEFINE_string('config_file', 'configs/demo/kmax_demo.textproto',
                              'Experiment config (textproto).')
_OVERRIDES = flags.DEFINE_multi_string(
    'config_override', [], 'FIELD=VALUE overrides of the config.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per part.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls per part.')


def _median_seconds(fn, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import keys  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.data import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.losses import kmax_loss  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(_CONFIG.value)
  if _OVERRIDES.value:
    config = config_lib.override(
        config, config_lib.parse_override_flags(_OVERRIDES.value))
  config = config_lib.expand_environment_variables(config, 'train')
  options = config.train_dataset_options
  info = dataset_info_lib.get_dataset_info(options)
  crop = list(options.crop_size)
  model = model_lib.build_model(config, info, crop_size=crop)
  model(tf.zeros([1] + crop + [3]), training=False)
  loss = kmax_loss.KMaXLoss.from_config(
      config.trainer_options.loss_options, config.model_options, info,
      auxiliary_output_number=model.auxiliary_output_number)
  optimizers = optimizer_lib.build_optimizers(config.trainer_options
                                              .solver_options)
  dataset = input_pipeline.create_dataset(options, is_training=True)
  iterator = iter(dataset)
  batch = next(iterator)
  variables = model.trainable_variables
  backbone = {v.ref() for v in model.backbone_variables}

  @tf.function
  def forward():
    return model(batch['image'], training=True)

  @tf.function
  def network():
    with tf.GradientTape() as tape:
      outputs = model(batch['image'], training=True)
      total = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32))
                        for v in tf.nest.flatten(outputs)
                        if v.dtype.is_floating])
    return tape.gradient(total, variables)

  @tf.function
  def forward_and_loss():
    return loss(batch, model(batch['image'], training=True))

  def _gradients():
    with tf.GradientTape() as tape:
      per_example = loss(batch, model(batch['image'], training=True))
      total = tf.reduce_mean(per_example[keys.TOTAL_LOSS])
    return tape.gradient(total, variables)

  gradients = tf.function(_gradients)

  @tf.function
  def step():
    pairs = [(g, v) for g, v in zip(_gradients(), variables) if g is not None]
    main = [p for p in pairs if p[1].ref() not in backbone]
    rest = [p for p in pairs if p[1].ref() in backbone]
    optimizers.main.apply_gradients(main)
    (optimizers.backbone or optimizers.main).apply_gradients(rest)

  def next_batch():
    tf.nest.map_structure(lambda t: t.numpy(), next(iterator))

  parts = [('input', next_batch), ('forward', forward), ('network', network),
           ('loss', forward_and_loss), ('gradients', gradients),
           ('step', step)]
  seconds = {}
  for name, fn in parts:
    seconds[name] = _median_seconds(fn, _REPEATS.value, _WARMUP.value)
    print(f'  measured {name}: {seconds[name] * 1000:.0f} ms', flush=True)

  total = seconds['step']
  rows = [
      ('network forward', seconds['forward']),
      ('network backward', seconds['network'] - seconds['forward']),
      ('loss + matching (forward)', seconds['loss'] - seconds['forward']),
      ('loss backward', seconds['gradients'] - seconds['loss'] -
       (seconds['network'] - seconds['forward'])),
      ('optimizer updates', seconds['step'] - seconds['gradients']),
  ]
  print(f'\n{_CONFIG.value}: batch {options.batch_size}, crop '
        f'{crop[0]}x{crop[1]}; {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, '
        f'{time.strftime("%Y-%m-%d %H:%M")}')
  print(f'| part | ms per step | share of step |\n|---|---|---|')
  for name, value in rows:
    print(f'| {name} | {value * 1000:.0f} | {100 * value / total:.0f}% |')
  print(f'| **whole step** | {total * 1000:.0f} | 100% ({1 / total:.2f} '
        'steps/s) |')
  print(f'| input pipeline (overlapped) | {seconds["input"] * 1000:.0f} | '
        f'{100 * seconds["input"] / total:.0f}% |')


if __name__ == '__main__':
  app.run(main)

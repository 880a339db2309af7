r"""Size and CPU latency of the TFLite export, per quantization.

  DEMO_DIR=demo_output/data python benchmarks/tflite_benchmark.py \
      --config_file=demo/kmax_demo \
      --quantizations=none,float16,dynamic_range --runs=10

(the demo config reads its dataset descriptor from $DEMO_DIR: the folder
`data/build_demo_data.py` or `bash demo.sh` wrote, or any folder holding
`demo_dataset.dataset_info().save(...)`'s demo_shapes.json).

Converts the model of the config (restored from --checkpoint_path, or with
its initial random weights: latency does not depend on the values) with the
network and the mask-wise merge inside the graph, then times
`tf.lite.Interpreter` on one padded crop: median of --runs calls after
--warmup calls. Prints one row per quantization, and the machine.
"""

import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplab_kmax.export import tflite_export  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG_FILE = flags.DEFINE_string('config_file', 'demo/kmax_demo',
                                   'Experiment config (path or shipped name).')
_CHECKPOINT = flags.DEFINE_string('checkpoint_path', None,
                                  'Checkpoint; default: initial weights.')
_SIZE = flags.DEFINE_string('size', None, 'HxW crop; default: eval crop.')
_QUANTIZATIONS = flags.DEFINE_list('quantizations',
                                   list(tflite_export.QUANTIZATIONS),
                                   'Quantizations to convert and time.')
_RUNS = flags.DEFINE_integer('runs', 10, 'Timed calls per model.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls first.')
_THREADS = flags.DEFINE_integer('num_threads', None,
                                'Interpreter threads (default: TFLite\'s).')
_OVERRIDES = flags.DEFINE_multi_string('config_override', [],
                                       'FIELD.PATH=VALUE overrides.')


def main(argv):
  del argv
  config = config_lib.load_experiment(_CONFIG_FILE.value,
                                     _OVERRIDES.value or (),
                                     mode=config_lib.INFERENCE)
  module = model_loading.build_serving_module_from_checkpoint(
      config, _CHECKPOINT.value)
  size = tflite_export.parse_size(_SIZE.value) if _SIZE.value else None
  print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs, '
        f'{platform.platform()}; threads: {_THREADS.value or "default"}')
  print(f'{"quantization":<14} {"size MB":>8} {"convert s":>10} '
        f'{"median ms":>10} {"min ms":>8}')
  with tempfile.TemporaryDirectory() as directory:
    for quantization in _QUANTIZATIONS.value:
      path = os.path.join(directory, f'{quantization}.tflite')
      start = time.perf_counter()
      tflite_export.export(module, path, size, quantization)
      convert_seconds = time.perf_counter() - start
      runner = tflite_export.TFLitePanopticPredictor(
          path, num_threads=_THREADS.value)
      crop = np.random.default_rng(0).uniform(
          0, 255, (1,) + runner.crop_size + (3,)).astype(np.float32)
      for _ in range(_WARMUP.value):
        runner.run_crop(crop)
      times = []
      for _ in range(_RUNS.value):
        start = time.perf_counter()
        runner.run_crop(crop)
        times.append(1000 * (time.perf_counter() - start))
      print(f'{quantization:<14} {os.path.getsize(path) / 2**20:8.2f} '
            f'{convert_seconds:10.1f} {statistics.median(times):10.1f} '
            f'{min(times):8.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)

r"""Images per second of the kMaX training input pipeline (not a test).

Runs the COCO kMaX-DeepLab training recipe (range resize to the crop, random
scale 0.3-1.7 step 0.1, simple_classification_policy AutoAugment, panoptic
copy-paste, crop, flip, thing-id mask targets) on a limited number of CPU
cores and prints images/second:

  python benchmarks/input_pipeline_benchmark.py --crop=641 --cores=2

Without --file_pattern it renders demo scenes at COCO-like size (480x640)
into a temporary folder first; with --file_pattern (and --dataset or
--dataset_descriptor) it reads existing DeepLab2-format TFRecords.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CROP = flags.DEFINE_integer('crop', 641, 'Square crop size.')
_CORES = flags.DEFINE_integer('cores', 2, 'CPU cores the pipeline may use.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per batch.')
_BATCHES = flags.DEFINE_integer('num_batches', 15, 'Timed batches.')
_WARMUP = flags.DEFINE_integer('warmup_batches', 3, 'Untimed batches.')
_FILE_PATTERN = flags.DEFINE_string('file_pattern', None,
                                    'TFRecords to read; default: demo data.')
_DATASET = flags.DEFINE_string('dataset', 'coco_panoptic',
                               'Dataset name for --file_pattern.')
_DESCRIPTOR = flags.DEFINE_string('dataset_descriptor', None,
                                  'Descriptor for --file_pattern.')
_DEMO_IMAGES = flags.DEFINE_integer('demo_images', 32,
                                    'Demo scenes to render.')
_COPY_PASTE = flags.DEFINE_boolean('copy_paste', True,
                                   'Use panoptic copy-paste.')
_AUTOAUGMENT = flags.DEFINE_boolean('autoaugment', True, 'Use AutoAugment.')


def _limit_cores(cores: int) -> None:
  if hasattr(os, 'sched_setaffinity'):
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[:cores])


def main(argv):
  del argv
  _limit_cores(_CORES.value)
  import tensorflow as tf
  from deeplab_kmax.config import dataset_pb2
  from deeplab_kmax.data import demo_dataset
  from deeplab_kmax.data import input_pipeline
  tf.config.threading.set_intra_op_parallelism_threads(_CORES.value)
  tf.config.threading.set_inter_op_parallelism_threads(_CORES.value)

  options = dataset_pb2.DatasetOptions(
      batch_size=_BATCH.value, crop_size=[_CROP.value] * 2,
      min_resize_value=[_CROP.value], max_resize_value=[_CROP.value],
      thing_id_mask_annotations=True, max_thing_id=128)
  temp = None
  if _FILE_PATTERN.value:
    options.file_pattern.append(_FILE_PATTERN.value)
    options.dataset = _DATASET.value
    if _DESCRIPTOR.value:
      options.dataset_descriptor = _DESCRIPTOR.value
    source = _FILE_PATTERN.value
  else:
    temp = tempfile.TemporaryDirectory()
    start = time.time()
    paths = demo_dataset.build(temp.name, num_train=_DEMO_IMAGES.value,
                               num_val=0, height=480, width=640,
                               num_shards=4)
    print(f'Rendered {_DEMO_IMAGES.value} demo scenes (480x640) in '
          f'{time.time() - start:.1f}s.')
    options.file_pattern.append(paths['train_pattern'])
    options.dataset_descriptor = paths['descriptor']
    source = 'demo scenes 480x640'
  augment = options.augmentations
  augment.min_scale_factor = 0.3
  augment.max_scale_factor = 1.7
  augment.scale_factor_step_size = 0.1
  if _AUTOAUGMENT.value:
    augment.autoaugment_policy_name = 'simple_classification_policy'
  if _COPY_PASTE.value:
    paste = augment.panoptic_copy_paste
    paste.panoptic_copy_paste_scale = 0.5
    paste.panoptic_copy_paste_thing_option = 'all'
    paste.panoptic_copy_paste_stuff_option = 'random'
    paste.panoptic_copy_paste_void_option = 'none'

  dataset = input_pipeline.create_dataset(options, is_training=True)
  threading = tf.data.Options()
  threading.threading.private_threadpool_size = _CORES.value
  dataset = dataset.with_options(threading)
  batches = iter(dataset)
  for _ in range(_WARMUP.value):
    next(batches)
  start = time.time()
  for _ in range(_BATCHES.value):
    batch = next(batches)
  batch['image'].numpy()
  elapsed = time.time() - start
  images = _BATCHES.value * _BATCH.value
  result = {
      'images_per_second': round(images / elapsed, 2),
      'crop': _CROP.value, 'cores': _CORES.value,
      'batch_size': _BATCH.value, 'timed_images': images,
      'autoaugment': _AUTOAUGMENT.value, 'copy_paste': _COPY_PASTE.value,
      'source': source,
  }
  print(json.dumps(result))
  if temp is not None:
    temp.cleanup()


if __name__ == '__main__':
  app.run(main)

"""One exported test model, shared by the export and predict tests.

Building, checkpointing and exporting the full COCO ResNet-50 model costs
about two minutes on two cores, so it happens once per test process
(`bundle()` is cached) in a temporary directory removed at exit.

The weights follow a deterministic rule keyed by checkpoint key (like the
reference fill, but with identity batch-norm statistics, which keeps the
k-means assignments from collapsing), and the class head is scaled up so that
masks are confident: the panoptic output then has real segments and void, and
the same weights (hence the same documented REST example) come out in every
run.
"""

import atexit
import dataclasses
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from deeplab_kmax import checkpoint_io
from deeplab_kmax import config as config_lib
from deeplab_kmax import model as model_lib
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import preprocessing
from deeplab_kmax.export import serving

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILE = REPO / 'configs' / 'coco' / 'kmax_meta_r50.textproto'
CROP = 129
# Small crop (fast); no area limits, so small test images keep segments.
OVERRIDES = (
    f'train_dataset_options.crop_size=[{CROP},{CROP}]',
    f'eval_dataset_options.crop_size=[{CROP},{CROP}]',
    f'eval_dataset_options.min_resize_value=[{CROP}]',
    f'eval_dataset_options.max_resize_value=[{CROP}]',
    'evaluator_options.thing_area_limit=0',
    'evaluator_options.stuff_area_limit=0',
)
CLASS_HEAD_SCALE = 10.0
SUBPROCESS_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                      PYTHONPATH=str(REPO))


def make_config():
  config = config_lib.load_config(CONFIG_FILE)
  return config_lib.override(config, config_lib.parse_override_flags(OVERRIDES))


def keyed_value(key: str, shape) -> np.ndarray:
  """Deterministic weight for a checkpoint key (identity batch norms)."""
  name = key.split('/.ATTRIBUTES')[0].split('/')[-1]
  shape = tuple(int(d) for d in shape)
  if name in ('gamma', 'moving_variance'):
    return np.ones(shape, np.float32)
  if name in ('beta', 'bias', 'moving_mean'):
    return np.zeros(shape, np.float32)
  rng = np.random.default_rng(zlib.crc32(key.encode('utf-8')))
  fan_in = max(int(np.prod(shape[:-1])) if len(shape) > 1 else 1, 1)
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def set_test_weights(model) -> None:
  variables = checkpoint_io.variables_by_key(model.checkpoint_items)
  for key, variable in variables.items():
    value = keyed_value(key, variable.shape)
    if key.startswith('transformer_class_head/') and 'kernel' in key:
      value = value * CLASS_HEAD_SCALE
    variable.assign(value)


def sample_image() -> np.ndarray:
  """uint8 [65, 97, 3]: gradients with three solid rectangles."""
  rows, cols = np.mgrid[0:65, 0:97]
  image = np.stack([(rows * 4) % 256, (cols * 3) % 256,
                    ((rows + cols) * 2) % 256], axis=-1).astype(np.uint8)
  image[5:30, 10:60] = (250, 20, 20)
  image[35:60, 30:90] = (20, 20, 250)
  image[15:50, 2:25] = (20, 220, 20)
  return image


def doc_image() -> np.ndarray:
  """uint8 [3, 4, 3]: the tiny image of the documented REST example."""
  image = np.zeros((3, 4, 3), np.uint8)
  image[:, :2] = (200, 30, 30)
  image[:, 2:] = (20, 40, 220)
  image[2] = (90, 200, 60)
  return image


def keras_reference(model, config, image: np.ndarray) -> Dict[str, np.ndarray]:
  """The eval recipe by hand: data-pipeline preprocessing, eager Keras model,
  then DeepLab2's crop-and-resize of the predictions."""
  options = config.eval_dataset_options
  resized, padded, _ = preprocessing.preprocess(
      tf.constant(image), None, crop_size=tuple(options.crop_size),
      is_training=False, label_pad_value=0,
      min_resize_value=tuple(options.min_resize_value),
      max_resize_value=tuple(options.max_resize_value))
  outputs = model(padded[tf.newaxis], training=False)
  height, width = resized.shape[:2]
  maps = {}
  for key in serving.NEAREST_OUTPUTS:
    part = outputs[key][:, :height, :width, tf.newaxis]
    maps[key] = tf.compat.v1.image.resize(
        part, image.shape[:2],
        method=tf.compat.v1.image.ResizeMethod.NEAREST_NEIGHBOR,
        align_corners=True)[0, ..., 0].numpy()
  return maps


@dataclasses.dataclass
class Bundle:
  workdir: pathlib.Path
  config: object
  model: object
  checkpoint_path: str
  saved_model_dir: str
  export_seconds: float
  onnx_path: Optional[str] = None  # With bundle(onnx=True): the ONNX file.

  @property
  def info(self) -> dataset_info_lib.DatasetInfo:
    return dataset_info_lib.get_dataset_info(self.config.eval_dataset_options)

  @functools.cached_property
  def keras_maps(self) -> Dict[str, np.ndarray]:
    return keras_reference(self.model, self.config, sample_image())


def _workdir() -> pathlib.Path:
  path = pathlib.Path(tempfile.mkdtemp(prefix='kmax_export_test_'))
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def run_command(args: List[str], timeout: float = 900
                ) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, env=SUBPROCESS_ENV, timeout=timeout,
                        capture_output=True, text=True, check=False)


def export_command(checkpoint_path: str, output_path: str,
                   *extra: str) -> List[str]:
  return ([sys.executable, str(REPO / 'trainer' / 'export_model.py'),
           f'--config_file={CONFIG_FILE}',
           f'--checkpoint_path={checkpoint_path}',
           f'--output_path={output_path}'] +
          [f'--config_override={o}' for o in OVERRIDES] + list(extra))


_BUNDLE: List[Bundle] = []  # The one bundle of this process, once built.


def bundle(onnx: bool = False) -> Bundle:
  """Builds the test model, writes a DeepLab2-layout checkpoint, exports it
  with the CLI (once per process).

  With `onnx`, the export also writes `Bundle.onnx_path` (--onnx_path). The
  first caller decides: built with ONNX, one CLI run serves every test;
  built without, a later `onnx` caller pays a second export run. The ONNX
  tests come first in collection order (tests/export/test_onnx.py), and
  conftest keeps every user of the bundle on one xdist worker.
  """
  if not _BUNDLE:
    _BUNDLE.append(_build_bundle(onnx))
  built = _BUNDLE[0]
  if onnx and built.onnx_path is None:
    built.onnx_path = str(built.workdir / 'onnx' / 'kmax.onnx')
    _export(built.checkpoint_path, str(built.workdir / 'onnx' / 'saved_model'),
            f'--onnx_path={built.onnx_path}')
  return built


def _export(checkpoint_path: str, output_path: str, *extra: str) -> None:
  result = run_command(export_command(checkpoint_path, output_path, *extra))
  if result.returncode != 0:
    raise RuntimeError(f'export_model.py failed ({result.returncode}):\n'
                       f'{result.stdout}\n{result.stderr[-5000:]}')


def _build_bundle(onnx: bool) -> Bundle:
  import time  # pylint: disable=g-import-not-at-top
  workdir = _workdir()
  config = make_config()
  model = model_lib.build_model(config, crop_size=(CROP, CROP))
  set_test_weights(model)
  # Exactly what DeepLab2 writes: the model items at the top level.
  checkpoint_path = tf.train.Checkpoint(**model.checkpoint_items).write(
      str(workdir / 'deeplab2_ckpt' / 'ckpt'))
  saved_model_dir = str(workdir / 'saved_model' / '1')
  onnx_path = str(workdir / 'onnx' / 'kmax.onnx') if onnx else None
  start = time.time()
  _export(checkpoint_path, saved_model_dir,
          *([f'--onnx_path={onnx_path}'] if onnx else []))
  return Bundle(workdir, config, model, checkpoint_path, saved_model_dir,
                time.time() - start, onnx_path)


def probe(saved_model_dir: str, requests_path: str = '') -> Tuple[dict, dict]:
  """Runs saved_model_probe.py in a fresh process; returns (arrays, json)."""
  out = tempfile.mkdtemp(prefix='kmax_probe_', dir=bundle().workdir)
  image_path = os.path.join(out, 'image.npy')
  np.save(image_path, sample_image())
  result = run_command([
      sys.executable, str(REPO / 'tests' / 'export' / 'saved_model_probe.py'),
      saved_model_dir, image_path, requests_path, out])
  if result.returncode != 0:
    raise RuntimeError(f'saved_model_probe.py failed:\n{result.stdout}\n'
                       f'{result.stderr[-5000:]}')
  import json  # pylint: disable=g-import-not-at-top
  arrays = dict(np.load(os.path.join(out, 'arrays.npz')))
  with open(os.path.join(out, 'results.json')) as f:
    return arrays, json.load(f)

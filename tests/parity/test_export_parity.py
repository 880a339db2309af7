"""DeepLab2's export_model.py and our trainer/export_model.py, one checkpoint.

Both SavedModels are made from the same DeepLab2-layout checkpoint (the
export tests' model: deterministic weights with confident masks, so the
panoptic maps have real segments; COCO R50, eval crop 129). Both are loaded
and run (deeplab2_export_probe.py) in the fresh DeepLab2 process that wrote
DeepLab2's export, one that never imports this package. On images of several sizes,
smaller and larger than the crop, the panoptic, semantic and instance maps
must be equal, pixel for pixel. DeepLab2's export takes one uint8 [H, W, 3]
image; ours must give the same maps for what DeepLab2's refuses: a batch
(serving_batch) and encoded image bytes (serving_encoded).
"""

import io
import json
import time

import numpy as np
from PIL import Image
import pytest

from tests.export import helpers
from tests.parity import deeplab2_ckpt_export_support as support

pytestmark = pytest.mark.slow

# The maps both exports return, compared exactly.
DISCRETE_KEYS = ('panoptic_pred', 'semantic_pred', 'instance_pred')
# Float maps both return: probabilities in [0, 1], nearest-neighbour
# resampled. The two networks agree to float rounding, not bit for bit (the
# numerics tests: ~1e-6 relative per block); through the whole decoder and
# the softmaxes the largest difference seen here was 2.2e-5 (instance_scores
# of the 200x150 image; semantic_scores 1.8e-5), hence the margin.
SCORE_KEYS = ('instance_scores', 'semantic_scores')
SCORE_ATOL = 1e-4


def _png(image: np.ndarray) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return np.frombuffer(buffer.getvalue(), np.uint8)


def _images():
  """Sizes below, at odd ratios to, and above the 129 crop."""
  base = helpers.sample_image()  # [65, 97, 3]
  return {
      'a_65x97': base,
      'b_65x97': np.ascontiguousarray(base[::-1, ::-1]),
      'c_200x150': np.asarray(Image.fromarray(base).resize(
          (150, 200), Image.BILINEAR)),
      'd_40x56': np.ascontiguousarray(base[10:50, 5:61]),
  }


def _read_probe(out):
  with open(f'{out}.json') as f:
    report = json.load(f)
  with np.load(f'{out}.npz') as arrays:
    return dict(arrays), report


def _assert_same_maps(ours, theirs, where):
  for key in DISCRETE_KEYS:
    mismatch = np.count_nonzero(ours[key] != theirs[key])
    assert ours[key].shape == theirs[key].shape, (where, key)
    assert mismatch == 0, f'{where} {key}: {mismatch} pixels differ'
  for key in SCORE_KEYS:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=0,
                               atol=SCORE_ATOL, err_msg=f'{where} {key}')


def test_exports_agree(tmp_path):
  bench = support.require_deeplab2()
  timings = {}
  start = time.time()
  bundle = helpers.bundle()  # Checkpoint + our export (trainer/export_model.py).
  timings['ours: build, checkpoint, export'] = time.time() - start

  images = _images()
  entries = {f'single/{name}': image for name, image in images.items()}
  entries['batch/ab'] = np.stack([images['a_65x97'], images['b_65x97']])
  entries['encoded/a'] = _png(images['a_65x97'])
  entries['encoded/c'] = _png(images['c_200x150'])
  inputs = tmp_path / 'inputs.npz'
  np.savez(inputs, **entries)

  start = time.time()
  config_path = support.write_deeplab2_config(helpers.make_config(),
                                              tmp_path / 'config.textproto')
  theirs_dir = tmp_path / 'deeplab2_saved_model'
  # DeepLab2's export_model.main (without Keras layer traces, see there),
  # then, in the same fresh process, both SavedModels loaded and run.
  support.run_python([support.HERE / 'deeplab2_export_model.py',
                      f'--experiment_option_path={config_path}',
                      f'--checkpoint_path={bundle.checkpoint_path}',
                      f'--output_path={theirs_dir}',
                      f'--probe_inputs={inputs}',
                      f'--probe_out={tmp_path / "deeplab2"}',
                      f'--probe_saved_model={bundle.saved_model_dir}',
                      f'--probe_saved_model_out={tmp_path / "ours"}'],
                     support.deeplab2_env(bench))
  timings['deeplab2: export; both: load and run'] = time.time() - start
  theirs, their_report = _read_probe(tmp_path / 'deeplab2')
  ours, our_report = _read_probe(tmp_path / 'ours')
  print('timings (s):', {k: round(v) for k, v in timings.items()})
  print('deeplab2 signatures:', json.dumps(their_report['signatures']))

  # DeepLab2's export serves one raw image; batches and bytes are refused.
  assert sorted(their_report['errors']) == ['batch/ab', 'encoded/a',
                                            'encoded/c']
  assert not our_report['errors'], our_report['errors']

  def theirs_for(name):  # DeepLab2 keeps a batch dimension of 1.
    return {key: theirs[f'single/{name}/{key}'][0]
            for key in DISCRETE_KEYS + SCORE_KEYS}

  def ours_for(entry, index=None):
    return {key: (ours[f'{entry}/{key}'] if index is None else
                  ours[f'{entry}/{key}'][index])
            for key in DISCRETE_KEYS + SCORE_KEYS}

  segments = 0
  for name, image in images.items():
    expected = theirs_for(name)
    assert expected['panoptic_pred'].shape == image.shape[:2], name
    _assert_same_maps(ours_for(f'single/{name}'), expected, name)
    segments += len(np.unique(expected['panoptic_pred']))
  # Not a trivial (all-void) prediction: real segments in every image.
  assert segments >= 2 * len(images), segments
  for index, name in enumerate(('a_65x97', 'b_65x97')):
    _assert_same_maps(ours_for('batch/ab', index), theirs_for(name),
                      f'serving_batch[{index}]')
  _assert_same_maps(ours_for('encoded/a'), theirs_for('a_65x97'),
                    'serving_encoded(a)')
  _assert_same_maps(ours_for('encoded/c'), theirs_for('c_200x150'),
                    'serving_encoded(c)')

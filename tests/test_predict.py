"""Tests for the inference CLI (`python -m deeplab_kmax.predict`)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax import keys
from deeplab_kmax import predict
from deeplab_kmax import temp_files
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info
from deeplab_kmax.export import serving
from tests.export import helpers

COCO = dataset_info.COCO_PANOPTIC


# ---------------------------------------------------------------------------
# Reading images.
# ---------------------------------------------------------------------------


def test_as_rgb_uint8_conversions():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(predict.as_rgb_uint8(gray),
                                np.repeat(gray[..., None], 3, -1))
  rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), np.uint8)
  np.testing.assert_array_equal(predict.as_rgb_uint8(rgba), rgba[..., :3])
  gray_alpha = np.stack([gray, gray + 1], -1)
  np.testing.assert_array_equal(predict.as_rgb_uint8(gray_alpha),
                                np.repeat(gray[..., None], 3, -1))


@pytest.mark.parametrize('image,message', [
    (np.zeros((3, 4, 3), np.float32), 'uint8'),
    (np.zeros((0, 4, 3), np.uint8), 'empty'),
    (np.zeros((3, 4, 5), np.uint8), r'\[H, W, 1\|2\|3\|4\]'),
    (np.zeros((2, 3, 4, 3), np.uint8), 'shape'),
])
def test_as_rgb_uint8_rejects_bad_input(image, message):
  with pytest.raises(ValueError, match=message):
    predict.as_rgb_uint8(image)


def _save(tmp_path, name, array):
  path = tmp_path / name
  Image.fromarray(array).save(path)
  return str(path)


def test_load_image_converts_to_rgb(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), np.uint8)
  np.testing.assert_array_equal(
      predict.load_image(_save(tmp_path, 'rgb.png', rgb)), rgb)
  gray = rgb[..., 0]
  np.testing.assert_array_equal(
      predict.load_image(_save(tmp_path, 'gray.png', gray)),
      np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((5, 7, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(
      predict.load_image(_save(tmp_path, 'rgba.png', rgba)), rgb)
  deep = (gray.astype(np.uint16) * 257)
  path = tmp_path / 'deep.png'
  Image.fromarray(deep).save(path)
  np.testing.assert_array_equal(predict.load_image(str(path)),
                                np.repeat(gray[..., None], 3, -1))
  palette = Image.fromarray(rgb).convert('P')
  palette.save(tmp_path / 'palette.png')
  loaded = predict.load_image(str(tmp_path / 'palette.png'))
  assert loaded.shape == (5, 7, 3) and loaded.dtype == np.uint8


def test_load_image_keeps_the_stored_orientation(tmp_path):
  """As serving_encoded does (see tests/export/test_any_image.py)."""
  rgb = np.zeros((4, 6, 3), np.uint8)
  rgb[0, 0] = 255
  picture = Image.fromarray(rgb)
  exif = picture.getexif()
  exif[0x0112] = 6  # Rotated: displayed 90 degrees clockwise.
  path = tmp_path / 'rotated.png'
  picture.save(path, exif=exif)
  np.testing.assert_array_equal(predict.load_image(str(path)), rgb)


def test_unreadable_files_raise_image_read_error(tmp_path):
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not an image')
  empty = tmp_path / 'empty.png'
  empty.write_bytes(b'')
  for path in (broken, empty, tmp_path / 'missing.png'):
    with pytest.raises(predict.ImageReadError, match='not a readable image'):
      predict.load_image(str(path))


# ---------------------------------------------------------------------------
# COCO panoptic output.
# ---------------------------------------------------------------------------


def _fake_predictor():
  """Maps with a thing on the left half and stuff on the right."""

  def run(image):
    height, width = image.shape[:2]
    panoptic = np.full((height, width), 81 * 256, np.int32)
    panoptic[:, : width // 2] = 1 * 256 + 1
    panoptic[0, -1] = 0
    maps = {key: np.zeros((height, width), np.float32)
            for key in serving.OUTPUT_KEYS}
    maps[keys.PANOPTIC_PRED] = panoptic
    maps[keys.SEMANTIC_SCORES] = np.full((height, width), 0.75, np.float32)
    return maps

  return predict.Predictor(run, COCO, 'fake')


def test_predict_files_writes_png_json_overlay_and_reports_failures(tmp_path):
  inputs = tmp_path / 'in'
  (inputs / 'a').mkdir(parents=True)
  (inputs / 'b').mkdir()
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(
      inputs / 'a' / 'x.jpg')
  Image.fromarray(rng.integers(0, 256, (30, 20), np.uint8)).save(
      inputs / 'b' / 'x.png')  # Same stem, grayscale.
  (inputs / 'b' / 'bad.jpg').write_bytes(b'\x00' * 10)
  files = predict.expand_inputs([str(inputs / '**' / '*.*')])
  assert len(files) == 3
  assert predict.expand_inputs([str(inputs / 'b')]) == sorted(
      [str(inputs / 'b' / 'bad.jpg'), str(inputs / 'b' / 'x.png')])
  out = tmp_path / 'out'
  written, failed = predict.predict_files(_fake_predictor(), files, str(out),
                                          progress=False)
  assert written == 2 and failed == [str(inputs / 'b' / 'bad.jpg')]
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted(['x_panoptic.png', 'x_segments.json',
                          'x_overlay.png', 'x_2_panoptic.png',
                          'x_2_segments.json', 'x_2_overlay.png',
                          'predictions.json'])
  segment_ids = coco_panoptic.decode_segment_ids(
      np.asarray(Image.open(out / 'x_panoptic.png')))
  assert segment_ids.shape == (40, 50)
  annotation = json.loads((out / 'x_segments.json').read_text())
  assert annotation['file_name'] == 'x_panoptic.png'
  areas = {s['id']: s['area'] for s in annotation['segments_info']}
  assert areas == {i: int((segment_ids == i).sum()) for i in areas}
  assert (segment_ids == 0).sum() == 1
  assert all(s['score'] == 0.75 for s in annotation['segments_info'])
  overlay = np.asarray(Image.open(out / 'x_2_overlay.png'))
  assert overlay.shape == (30, 20, 3)
  results = json.loads((out / 'predictions.json').read_text())
  assert [a['file_name'] for a in results['annotations']] == [
      'x_panoptic.png', 'x_2_panoptic.png']
  assert results['failed'] == failed
  assert {c['id'] for c in results['categories']} >= {1, 92}


# Run in a child process: predicts a.png, b.png with the fake predictor and
# kills itself with SIGKILL halfway through writing b's overlay.
_KILLED_RUN = """
import os, signal, sys
from PIL import Image
from deeplab_kmax import predict
from tests import test_predict
calls = [0]
original = Image.Image.save
def save(self, fp, *args, **kwargs):
  calls[0] += 1
  if calls[0] == 4:  # a's PNG, a's overlay, b's PNG, b's overlay.
    if hasattr(fp, 'write'):
      fp.write(b'half a file'); fp.flush()
    else:
      open(fp, 'wb').write(b'half a file')
    os.kill(os.getpid(), signal.SIGKILL)
  return original(self, fp, *args, **kwargs)
Image.Image.save = save
predict.predict_files(test_predict._fake_predictor(), sys.argv[2:],
                      sys.argv[1], progress=False)
"""


def _complete_files(out, stem):
  return all((out / f'{stem}{suffix}').exists() for suffix in (
      predict.PANOPTIC_SUFFIX, predict.OVERLAY_SUFFIX,
      predict.SEGMENTS_SUFFIX))


def test_kill_during_predict_then_rerun_leaves_a_consistent_folder(
    tmp_path, monkeypatch):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rng = np.random.default_rng(3)
  for name in ('a', 'b', 'c'):
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).save(
        inputs / f'{name}.png')
  out = tmp_path / 'out'
  first = [str(inputs / 'a.png'), str(inputs / 'b.png')]
  predict.predict_files(_fake_predictor(), first, str(out), progress=False)
  assert (out / 'predictions.json').exists()

  killed = subprocess.run(
      [sys.executable, '-c', _KILLED_RUN, str(out)] + first,
      capture_output=True, text=True, env=helpers.SUBPROCESS_ENV,
      cwd=helpers.REPO, check=False, timeout=300)
  assert killed.returncode == -9, killed.stderr[-3000:]
  # No summary of the earlier run survives a run that did not finish, and
  # b (killed between its files) has no segments file beside a mixed set.
  assert not (out / 'predictions.json').exists()
  assert not (out / 'b_segments.json').exists()
  assert _complete_files(out, 'a')
  leftovers = [p.name for p in out.iterdir() if p.name.startswith('.')]
  assert leftovers, 'the killed write should leave its temporary file'

  # A later process reruns into the same folder with other images.
  (out / '.c_overlay.png.tmp-1-0123abcd').write_bytes(b'being written')
  future = os.path.getmtime(out / 'a_panoptic.png') + 3600
  os.utime(out / '.c_overlay.png.tmp-1-0123abcd', (future, future))
  monkeypatch.setattr(temp_files, 'PROCESS_START', future - 60)
  second = [str(inputs / 'a.png'), str(inputs / 'c.png')]
  predict.predict_files(_fake_predictor(), second, str(out), progress=False)
  results = json.loads((out / 'predictions.json').read_text())
  assert [a['image_id'] for a in results['annotations']] == ['a', 'c']
  for stem in ('a', 'c'):
    assert _complete_files(out, stem)
  hidden = sorted(p.name for p in out.iterdir() if p.name.startswith('.'))
  # The killed run's temporary is gone; a newer one (another writer's) stays.
  assert hidden == ['.c_overlay.png.tmp-1-0123abcd']


def test_failed_image_leaves_no_files_of_an_earlier_run(tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / 'x.png')
  out = tmp_path / 'out'
  predict.predict_files(_fake_predictor(), [str(inputs / 'x.png')], str(out),
                        progress=False)
  assert _complete_files(out, 'x')
  (inputs / 'x.png').write_bytes(b'now broken')
  written, failed = predict.predict_files(
      _fake_predictor(), [str(inputs / 'x.png')], str(out), progress=False)
  assert (written, len(failed)) == (0, 1)
  assert sorted(p.name for p in out.iterdir()) == ['predictions.json']


# ---------------------------------------------------------------------------
# End to end with the exported test model.
# ---------------------------------------------------------------------------


def _panoptic_from_outputs(out_dir, stem):
  """Panoptic ids recovered from the PNG + JSON the CLI wrote."""
  segment_ids = coco_panoptic.decode_segment_ids(
      np.asarray(Image.open(out_dir / f'{stem}_panoptic.png')))
  annotation = json.loads((out_dir / f'{stem}_segments.json').read_text())
  panoptic = np.zeros(segment_ids.shape, np.int64)  # void = 0 for COCO
  for segment in annotation['segments_info']:
    panoptic[segment_ids == segment['id']] = segment['panoptic_id']
    assert segment['panoptic_id'] == (segment['semantic_id'] * 256 +
                                      segment['instance_id'])
  return panoptic


@pytest.mark.slow
def test_cli_with_saved_model(tmp_path):
  bundle = helpers.bundle()
  inputs = tmp_path / 'images'
  inputs.mkdir()
  image = helpers.sample_image()
  Image.fromarray(image).save(inputs / 'sample.png')
  rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 9, np.uint8)],
                        -1)
  Image.fromarray(rgba).save(inputs / 'sample_rgba.png')
  (inputs / 'corrupt.jpg').write_bytes(b'garbage')
  out = tmp_path / 'out'
  result = helpers.run_command([
      sys.executable, '-m', 'deeplab_kmax.predict',
      f'--saved_model={bundle.saved_model_dir}',
      f'--inputs={inputs}/*.png,{inputs}/*.jpg', f'--output_dir={out}',
      '--save_raw_predictions'])
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'corrupt.jpg' in result.stderr
  assert 'Wrote predictions for 2 of 3 images' in result.stdout
  expected = bundle.keras_maps[keys.PANOPTIC_PRED]
  for stem in ('sample', 'sample_rgba'):
    np.testing.assert_array_equal(_panoptic_from_outputs(out, stem), expected)
    raw = np.load(out / f'{stem}_raw.npz')
    np.testing.assert_array_equal(raw[keys.SEMANTIC_PRED],
                                  bundle.keras_maps[keys.SEMANTIC_PRED])
  overlay = np.asarray(Image.open(out / 'sample_overlay.png'))
  # The CLI enlarges overlays by a whole factor to >= 512 px on the long
  # side (--overlay_min_size); the panoptic PNG keeps the image's size.
  factor = -(-512 // max(image.shape[:2]))
  assert overlay.shape == (image.shape[0] * factor, image.shape[1] * factor,
                           3)


def test_cli_reports_usage_errors(tmp_path):
  no_match = subprocess.run(
      [sys.executable, '-m', 'deeplab_kmax.predict', '--saved_model=x',
       f'--inputs={tmp_path}/*.jpg', f'--output_dir={tmp_path}/out'],
      capture_output=True, text=True, env=helpers.SUBPROCESS_ENV,
      cwd=helpers.REPO, check=False)
  assert no_match.returncode == 1
  assert 'No file matches' in no_match.stderr


@pytest.mark.slow
def test_checkpoint_predictor_matches_keras():
  """--config_file + --checkpoint_path serves the checkpoint in-process."""
  bundle = helpers.bundle()
  predictor = predict.checkpoint_predictor(bundle.config,
                                           bundle.checkpoint_path)
  maps = predictor(helpers.sample_image())
  for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED,
              keys.INSTANCE_PRED):
    np.testing.assert_array_equal(maps[key], bundle.keras_maps[key],
                                  err_msg=key)
  assert predictor.info.name == 'coco_panoptic'

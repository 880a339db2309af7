"""Converters on awkward input and interrupted runs (issue 15, data side)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import psutil
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.config import dataset_pb2
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.data import input_pipeline
from deeplab_kmax.data import panoptic_conversion
from deeplab_kmax.data import shard_files

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_SKY = 21  # Source category id of a stuff class of the demo descriptor.
_ENV = {**os.environ, 'PYTHONPATH': _REPO, 'TF_CPP_MIN_LOG_LEVEL': '2'}


def _write_coco_val(root, images):
  """COCO layout, split val: {stem: PIL image}, one sky segment per image."""
  image_dir = root / 'val2017'
  png_dir = root / 'annotations' / 'panoptic_val2017'
  image_dir.mkdir(parents=True)
  png_dir.mkdir(parents=True)
  annotations = []
  for stem, image in images.items():
    image.save(image_dir / f'{stem}.jpg', 'JPEG', quality=95)
    width, height = image.size
    Image.fromarray(np.full((height, width, 3), [1, 0, 0], np.uint8)).save(
        png_dir / f'{stem}.png')
    annotations.append({'image_id': stem, 'file_name': f'{stem}.png',
                        'segments_info': [{'id': 1, 'category_id': _SKY,
                                           'iscrowd': 0,
                                           'area': height * width}]})
  (root / 'annotations' / 'panoptic_val2017.json').write_text(
      json.dumps({'annotations': annotations}))


def _convert(root, out, num_shards=1, **kwargs):
  return panoptic_conversion.convert_coco_panoptic(
      str(root), str(out), ['val'], num_shards, demo_dataset.dataset_info(),
      show_progress=False, **kwargs)


def _noise(height, width, seed=0):
  return (np.random.default_rng(seed).random((height, width, 3)) * 255
          ).astype(np.uint8)


def test_empty_split_is_refused_and_writes_nothing(tmp_path):
  _write_coco_val(tmp_path / 'coco', {})
  out = tmp_path / 'out'
  with pytest.raises(panoptic_conversion.ConversionError,
                     match='val2017 holds no .*nothing to convert'):
    _convert(tmp_path / 'coco', out)
  assert not out.exists() or os.listdir(out) == []


def test_converter_cli_reports_bad_input_without_traceback(tmp_path):
  _write_coco_val(tmp_path / 'coco', {})
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'data', 'build_coco_data.py'),
       f'--coco_root={tmp_path / "coco"}', f'--output_dir={out}',
       '--splits=val', '--num_shards=2', '--num_workers=1'],
      capture_output=True, text=True, timeout=240, check=False, env=_ENV)
  assert result.returncode != 0
  assert 'nothing to convert' in result.stderr
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert not out.exists() or os.listdir(out) == []


def test_grayscale_and_cmyk_jpegs_convert_and_decode_with_3_channels(
    tmp_path):
  rgb = _noise(10, 14)
  images = {'rgb': Image.fromarray(rgb),
            'gray': Image.fromarray(rgb).convert('L'),
            'cmyk': Image.fromarray(rgb).convert('CMYK')}
  _write_coco_val(tmp_path / 'coco', images)
  shards = _convert(tmp_path / 'coco', tmp_path / 'out')['val']
  # The JPEG bytes are stored unchanged.
  stored = [tf.train.Example.FromString(r.numpy()).features.feature[
      'image/encoded'].bytes_list.value[0]
            for r in tf.data.TFRecordDataset(shards)]
  stems = sorted(images)
  assert stored == [(tmp_path / 'coco' / 'val2017' / f'{s}.jpg').read_bytes()
                    for s in stems]
  descriptor = tmp_path / 'demo.json'
  demo_dataset.dataset_info().save(str(descriptor))
  options = dataset_pb2.DatasetOptions(
      dataset=demo_dataset.NAME, dataset_descriptor=str(descriptor),
      file_pattern=shards, batch_size=1, crop_size=[17, 17])
  samples = list(input_pipeline.create_dataset(options, is_training=False))
  assert [s[keys.IMAGE_NAME][0].numpy().decode() for s in samples] == stems
  for stem, sample in zip(stems, samples):
    assert sample[keys.IMAGE].shape == (1, 17, 17, 3)
    assert sample[keys.GT_SIZE_RAW][0].numpy().tolist() == [10, 14]
    decoded = sample[keys.IMAGE][0, :10, :14].numpy().astype(np.float32)
    expected = np.asarray(Image.open(
        tmp_path / 'coco' / 'val2017' / f'{stem}.jpg').convert('RGB'),
                          np.float32)
    # Same JPEG, two decoders (PIL, TF: other IDCT, chroma upsampling and
    # CMYK formula): measured max 9, mean 2.0 levels on this noise; a wrong
    # channel order or an inverted CMYK would be off by ~100 on average.
    difference = np.abs(decoded - expected)
    assert difference.max() <= 16 and difference.mean() <= 3, stem
    if stem == 'gray':
      assert (decoded[..., 0] == decoded[..., 2]).all()


def test_rerun_with_other_num_shards_replaces_the_split(tmp_path):
  images = {f'{i:03d}': Image.fromarray(_noise(6, 5, i)) for i in range(3)}
  _write_coco_val(tmp_path / 'coco', images)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'train-00000-of-00001.tfrecord').write_bytes(b'')  # Another split.
  _convert(tmp_path / 'coco', out, num_shards=3)
  assert shard_files.split_shards(str(out), 'val') == [
      f'val-0000{i}-of-00003.tfrecord' for i in range(3)]
  _convert(tmp_path / 'coco', out, num_shards=2)
  assert sorted(os.listdir(out)) == [
      'train-00000-of-00001.tfrecord', 'val-00000-of-00002.tfrecord',
      'val-00001-of-00002.tfrecord']
  records = list(tf.data.TFRecordDataset(
      [str(out / n) for n in shard_files.split_shards(str(out), 'val')]))
  assert len(records) == 3
  # A failing re-run keeps the complete old set.
  os.remove(tmp_path / 'coco' / 'annotations' / 'panoptic_val2017' /
            '002.png')
  with pytest.raises(panoptic_conversion.ConversionError, match='002.png'):
    _convert(tmp_path / 'coco', out, num_shards=1)
  assert shard_files.split_shards(str(out), 'val') == [
      'val-00000-of-00002.tfrecord', 'val-00001-of-00002.tfrecord']


def _dead_pid():
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def test_stale_partial_shards_are_removed_by_the_next_run(tmp_path):
  images = {'a': Image.fromarray(_noise(4, 4))}
  _write_coco_val(tmp_path / 'coco', images)
  out = tmp_path / 'out'
  out.mkdir()
  sleeper = subprocess.Popen(['sleep', '60'])
  try:
    stale = ['.val-00000-of-00004.tfrecord.partial',  # Older naming.
             f'.val-00003-of-00004.tfrecord.{_dead_pid()}.partial']
    kept = [f'.val-00001-of-00004.tfrecord.{sleeper.pid}.partial',  # Running.
            '.train-00000-of-00004.tfrecord.partial',  # Another split.
            '.notes.partial', 'val-notes.txt']  # Not ours.
    for name in stale + kept:
      (out / name).write_bytes(b'x')
    _convert(tmp_path / 'coco', out)
  finally:
    sleeper.kill()
    sleeper.wait()
  assert sorted(os.listdir(out)) == sorted(kept +
                                           ['val-00000-of-00001.tfrecord'])


def _descendants(pid):
  try:
    return psutil.Process(pid).children(recursive=True)
  except psutil.NoSuchProcess:
    return []


def _alive(process):
  try:
    return process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def test_workers_die_with_a_killed_converter(tmp_path):
  """kill -9 of the converter must not leave its worker processes running."""
  root = tmp_path / 'coco'
  count = 400
  _write_coco_val(root, {'000': Image.fromarray(_noise(128, 128))})
  json_path = root / 'annotations' / 'panoptic_val2017.json'
  content = json.loads(json_path.read_text())
  template = content['annotations'][0]
  for i in range(1, count):  # Copies of the one image: cheap to make.
    stem = f'{i:03d}'
    for folder, suffix in (('val2017', '.jpg'),
                           ('annotations/panoptic_val2017', '.png')):
      os.link(root / folder / f'000{suffix}', root / folder / f'{stem}{suffix}')
    content['annotations'].append({**template, 'image_id': stem,
                                   'file_name': f'{stem}.png'})
  json_path.write_text(json.dumps(content))
  converter = subprocess.Popen(
      [sys.executable, os.path.join(_REPO, 'data', 'build_coco_data.py'),
       f'--coco_root={root}', f'--output_dir={tmp_path / "out"}',
       f'--dataset_descriptor={_descriptor(tmp_path)}', '--splits=val',
       '--num_shards=2', '--num_workers=2'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ENV)
  workers = []
  try:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and converter.poll() is None:
      workers = [p for p in _descendants(converter.pid)
                 if 'resource_tracker' not in ' '.join(_cmdline(p))]
      if len(workers) >= 2:
        break
      time.sleep(0.05)
    assert len(workers) >= 2, 'the converter started no worker processes'
    time.sleep(0.5)  # Let them pick up work.
    assert converter.poll() is None, 'conversion ended before the kill'
    os.kill(converter.pid, signal.SIGKILL)
    converter.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(_alive, workers)):
      time.sleep(0.1)
    assert not any(map(_alive, workers)), [w.pid for w in workers]
  finally:
    for process in workers:
      try:
        process.kill()
      except psutil.NoSuchProcess:
        pass
    if converter.poll() is None:
      converter.kill()
      converter.wait()


def _cmdline(process):
  try:
    return process.cmdline()
  except psutil.Error:
    return []


def _descriptor(tmp_path):
  path = tmp_path / 'demo.json'
  demo_dataset.dataset_info().save(str(path))
  return path


_ORPHAN_SCRIPT = '''
import os, subprocess, sys, time
if sys.argv[1] == 'parent':  # Starts a worker and exits at once.
  worker = subprocess.Popen([sys.executable, '-c', sys.argv[2], 'worker',
                             str(os.getpid()), sys.argv[3]])
  print(worker.pid, flush=True)
  time.sleep(1)  # Let it arm itself while we are alive.
else:
  if sys.argv[3] == 'poll':  # Pretend prctl is unavailable.
    sys.platform = 'other'
  from deeplab_kmax.data import panoptic_conversion
  panoptic_conversion.exit_with_parent(int(sys.argv[2]))
  time.sleep(60)
'''


@pytest.mark.parametrize('mode', ['prctl', 'poll'])
def test_worker_initializer_ends_orphans(mode):
  """The pool initializer alone: the worker ends soon after its parent."""
  parent = subprocess.run(
      [sys.executable, '-c', _ORPHAN_SCRIPT, 'parent', _ORPHAN_SCRIPT, mode],
      capture_output=True, text=True, timeout=60, check=True, env=_ENV)
  worker = psutil.Process(int(parent.stdout.split()[0]))
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and _alive(worker):
    time.sleep(0.1)
  alive = _alive(worker)
  if alive:
    worker.kill()
  assert not alive


def test_worker_initializer_exits_if_the_parent_is_already_gone():
  result = subprocess.run(
      [sys.executable, '-c',
       'import os; from deeplab_kmax.data import panoptic_conversion as p; '
       'p.exit_with_parent(os.getppid() + 1); print("survived")'],
      capture_output=True, text=True, timeout=60, check=False, env=_ENV)
  assert result.returncode == 1 and 'survived' not in result.stdout

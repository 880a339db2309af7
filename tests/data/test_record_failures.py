"""Empty, corrupt and truncated TFRecords; interrupted demo builds (issue 15)."""

import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from deeplab_kmax.config import dataset_pb2
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.data import input_pipeline
from deeplab_kmax.data import panoptic_conversion
from deeplab_kmax.data import tfrecord_check

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_ENV = {**os.environ, 'PYTHONPATH': _REPO, 'TF_CPP_MIN_LOG_LEVEL': '2'}


def _options(descriptor, pattern, batch_size=2):
  return dataset_pb2.DatasetOptions(
      dataset=demo_dataset.NAME, dataset_descriptor=descriptor,
      file_pattern=[pattern], batch_size=batch_size, crop_size=[33, 33],
      thing_id_mask_annotations=True)


def _empty_shards(folder, count=2):
  for i in range(count):
    with tf.io.TFRecordWriter(os.path.join(
        folder, f'train-{i:05d}-of-{count:05d}.tfrecord')):
      pass


def test_files_without_records_fail_at_dataset_creation(demo_data, tmp_path):
  _empty_shards(str(tmp_path))
  pattern = str(tmp_path / 'train-*.tfrecord')
  for is_training in (True, False):
    with pytest.raises(input_pipeline.EmptyDatasetError,
                       match=r'train-\*\.tfrecord.*hold no record'):
      input_pipeline.create_dataset(
          _options(demo_data['descriptor'], pattern), is_training)


def test_an_input_pipeline_whose_files_are_all_empty_fails(demo_data,
                                                           tmp_path):
  """Under tf.distribute each pipeline reads its share of the files."""
  shutil.copy(os.path.join(demo_data['tfrecord_dir'],
                           'train-00000-of-00002.tfrecord'),
              tmp_path / 'train-00000-of-00002.tfrecord')
  with tf.io.TFRecordWriter(str(tmp_path / 'train-00001-of-00002.tfrecord')):
    pass
  options = _options(demo_data['descriptor'], str(tmp_path / 'train-*'))
  first = tf.distribute.InputContext(2, 0, 2)
  input_pipeline.create_dataset(options, True, first)
  with pytest.raises(input_pipeline.EmptyDatasetError,
                     match='input pipeline 1 of 2'):
    input_pipeline.create_dataset(options, True,
                                  tf.distribute.InputContext(2, 1, 2))


def _damage(path, how):
  data = bytearray(open(path, 'rb').read())
  first_length = int.from_bytes(data[:8], 'little')
  second = first_length + 16  # Offset of the second record.
  if how == 'bit_flip':  # Inside the data of the second record.
    data[second + 12 + 100] ^= 0x10
  elif how == 'truncated':  # In the middle of the last record's data.
    data = data[:-100]
  elif how == 'cut_header':  # After whole records, 5 bytes of a header.
    data = data[:second + 5]
  else:
    raise ValueError(how)
  with open(path, 'wb') as f:
    f.write(bytes(data))


@pytest.fixture
def damaged_copy(demo_data, tmp_path):
  """The demo train shards, copied; shard 1 of 2 damaged by `how`."""
  def make(how):
    folder = tmp_path / how
    shutil.copytree(demo_data['tfrecord_dir'], folder)
    bad = folder / 'train-00001-of-00002.tfrecord'
    _damage(bad, how)
    return str(folder / 'train-*.tfrecord'), str(bad)
  return make


@pytest.mark.parametrize('how', ['bit_flip', 'truncated', 'cut_header'])
def test_damaged_shard_is_named_when_reached(demo_data, damaged_copy, how):
  pattern, bad = damaged_copy(how)
  dataset = input_pipeline.create_dataset(
      _options(demo_data['descriptor'], pattern), is_training=False)
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    for _ in dataset:
      pass
  assert bad in error.value.message
  assert input_pipeline.CORRUPT_SHARD_MESSAGE in error.value.message


def test_damaged_shard_is_named_in_training(demo_data, damaged_copy):
  pattern, bad = damaged_copy('bit_flip')
  dataset = input_pipeline.create_dataset(
      _options(demo_data['descriptor'], pattern), is_training=True,
      shuffle_buffer_size=4)
  with pytest.raises(tf.errors.InvalidArgumentError, match=bad):
    for _, _ in zip(range(20), dataset):
      pass


def test_intact_shards_read_every_record(demo_data):
  options = _options(demo_data['descriptor'], demo_data['train_pattern'],
                     batch_size=1)
  names = [b['image_name'][0].numpy() for b in
           input_pipeline.create_dataset(options, is_training=False)]
  assert len(names) == 8 and len(set(names)) == 8


def test_check_tfrecords_reports_each_damaged_shard(demo_data, tmp_path):
  folder = tmp_path / 'shards'
  folder.mkdir()
  source = os.path.join(demo_data['tfrecord_dir'],
                        'train-00000-of-00002.tfrecord')
  for how in ('good', 'bit_flip', 'truncated', 'cut_header'):
    shutil.copy(source, folder / f'{how}.tfrecord')
    if how != 'good':
      _damage(folder / f'{how}.tfrecord', how)
  reports = {os.path.basename(r.path)[:-len('.tfrecord')]: r
             for r in tfrecord_check.check_files(
                 tfrecord_check.match_files([str(folder / '*.tfrecord')]))}
  assert reports['good'].ok and reports['good'].num_records == 4
  assert 'corrupted record' in reports['bit_flip'].error
  assert 'DataLossError' in reports['bit_flip'].error
  assert 'truncated' in reports['truncated'].error
  assert reports['cut_header'].error.startswith('truncated: 1 whole records')

  def run(*patterns):
    return subprocess.run(
        [sys.executable, os.path.join(_REPO, 'data', 'check_tfrecords.py'),
         *patterns], capture_output=True, text=True, timeout=240,
        check=False, env=_ENV)

  result = run(str(folder / '*.tfrecord'))
  assert result.returncode == 1, result.stderr[-2000:]
  bad_lines = sorted(l for l in result.stdout.splitlines()
                     if l.startswith('BAD '))
  assert [l.split(':')[0] for l in bad_lines] == [
      f'BAD {folder / name}.tfrecord'
      for name in ('bit_flip', 'cut_header', 'truncated')]
  assert 'Checked 4 files, 5 records: 3 bad' in result.stdout  # good + cut


def test_interrupted_demo_build_is_redone(tmp_path, monkeypatch):
  output = tmp_path / 'demo'
  args = dict(num_train=2, num_val=1, num_shards=1)

  def interrupted(*unused_args, **unused_kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(panoptic_conversion, 'convert_coco_panoptic', interrupted)
    with pytest.raises(KeyboardInterrupt):
      demo_dataset.build(str(output), **args)
  assert not (output / demo_dataset.DESCRIPTOR_FILE).exists()
  assert not demo_dataset.is_complete(str(output))
  stale = output / 'tfrecord' / '.train-00000-of-00001.tfrecord.partial'
  stale.parent.mkdir()
  stale.write_bytes(b'x')

  demo_dataset.build(str(output), **args)
  assert demo_dataset.is_complete(str(output))
  assert not stale.exists()
  # What demo.sh runs: a complete build is kept.
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'data', 'build_demo_data.py'),
       f'--output_dir={output}', '--num_train=2', '--num_val=1',
       '--num_shards=1', '--reuse_existing'],
      capture_output=True, text=True, timeout=240, check=False, env=_ENV)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'already complete' in result.stdout
  # A lost shard makes the build incomplete again.
  os.remove(output / 'tfrecord' / 'val-00000-of-00001.tfrecord')
  assert not demo_dataset.is_complete(str(output))

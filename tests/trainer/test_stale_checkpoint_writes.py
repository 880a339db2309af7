"""Checkpoint writes cut short by a killed run are removed by the next run."""

import os

import tensorflow as tf

from deeplab_kmax.trainer import train_lib
from tests.trainer import standins


def _touch(path, age_seconds):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'x')
  stamp = os.path.getmtime(path) - age_seconds
  os.utime(path, (stamp, stamp))
  parent = os.path.dirname(path)
  os.utime(parent, (stamp, stamp))


def test_next_run_removes_stale_checkpoint_temporaries(tmp_path,
                                                       reference_dir):
  model_dir = tmp_path / 'run'
  # What a run killed while writing checkpoint 3 leaves: TensorFlow's shard
  # folder and the temporary of the `checkpoint` state file.
  _touch(str(model_dir / 'ckpt-3_temp' / 'part-00000-of-00001.index'), 3600)
  state_temp = model_dir / ('checkpoint.tmp' + 'a1' * 16)
  _touch(str(state_temp), 3600)
  # Not ours, or not stale: kept.
  _touch(str(model_dir / 'ckpt-3_temp_notes.txt'), 3600)
  _touch(str(model_dir / 'my-ckpt-3_temp' / 'x'), 3600)
  fresh = model_dir / 'ckpt-9_temp' / 'part-00000-of-00001.index'
  _touch(str(fresh), -3600)  # Being written by a run that started later.

  config = standins.experiment_config(reference_dir, total_steps=2,
                                      checkpoint_every=2, steps_per_loop=2)
  train_lib.run_experiment('train', config, str(model_dir),
                           strategy=tf.distribute.OneDeviceStrategy('CPU:0'),
                           builders=standins.builders())
  names = set(os.listdir(model_dir))
  assert 'ckpt-3_temp' not in names
  assert state_temp.name not in names
  assert {'ckpt-3_temp_notes.txt', 'my-ckpt-3_temp', 'ckpt-9_temp'} <= names
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('ckpt-2')

"""The training command line: flags that act before the experiment runs."""

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from deeplab_kmax.data import demo_dataset
from deeplab_kmax.trainer import train as train_cli
from deeplab_kmax.trainer import train_lib

DEMO_CONFIG = 'configs/demo/kmax_demo.textproto'


def _draws_of_a_run(monkeypatch, tmp_path, seed):
  """Runs the CLI's main with the experiment replaced by random draws."""
  draws = {}

  def fake_run(mode, config, model_dir, strategy):
    del mode, config, model_dir, strategy
    draws['tf'] = tf.random.uniform([4]).numpy()
    draws['np'] = np.random.rand(4)

  monkeypatch.setattr(train_lib, 'run_prepared', fake_run)
  # The config is validated before the run: its data files must exist.
  (tmp_path / 'tfrecord').mkdir(exist_ok=True)
  for split in ('train', 'val'):
    (tmp_path / 'tfrecord' / f'{split}-0.tfrecord').touch()
  demo_dataset.dataset_info().save(str(tmp_path / demo_dataset.DESCRIPTOR_FILE))
  monkeypatch.setenv('DEMO_DIR', str(tmp_path))
  with flagsaver.flagsaver(config_file=DEMO_CONFIG, mode='train',
                           model_dir=str(tmp_path), seed=seed):
    train_cli.main([])
  return draws


@pytest.fixture(autouse=True)
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['test'])


def test_seed_makes_initialisation_repeatable(monkeypatch, tmp_path):
  first = _draws_of_a_run(monkeypatch, tmp_path, seed=7)
  again = _draws_of_a_run(monkeypatch, tmp_path, seed=7)
  other = _draws_of_a_run(monkeypatch, tmp_path, seed=8)
  for source in ('tf', 'np'):
    np.testing.assert_array_equal(first[source], again[source])
    assert not np.array_equal(first[source], other[source])

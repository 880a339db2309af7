"""Fixtures for the data tests: a small demo dataset and option messages."""

import shutil

import pytest

from deeplab_kmax.data import demo_dataset


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
  """8 train + 4 val demo images converted to 2 shards per split."""
  root = tmp_path_factory.mktemp('demo')
  return demo_dataset.build(str(root), num_train=8, num_val=4, seed=0,
                            num_shards=2)


@pytest.fixture
def coco_synth_copy(reference_dir, tmp_path):
  """A writable copy of the reference COCO-format dataset (for corruption)."""
  root = tmp_path / 'coco_synth'
  shutil.copytree(reference_dir / 'tfrecord' / 'coco_synth', root)
  return root

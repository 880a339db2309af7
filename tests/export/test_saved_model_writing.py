"""All-or-nothing SavedModel writing, with a tiny stand-in serving module."""

import json
import os

import pytest
import tensorflow as tf

from deeplab_kmax.export import saved_model


class _TinyModule(tf.Module):
  """Has what `write_saved_model` uses: signatures() and metadata_json()."""

  def __init__(self, scale: float, broken: bool = False):
    super().__init__()
    self.scale = tf.Variable(scale)
    self._broken = broken

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name='x')])
  def serve(self, x):
    return {'y': x * self.scale}

  def signatures(self):
    if self._broken:
      raise RuntimeError('tracing failed')
    return {'serving_default': self.serve.get_concrete_function()}

  def metadata_json(self):
    return json.dumps({'scale': float(self.scale.numpy())})


def _entries(directory):
  return sorted(os.listdir(directory))


def _served_scale(path):
  loaded = tf.saved_model.load(path)
  return float(loaded.signatures['serving_default'](
      x=tf.constant([1.0]))['y'].numpy()[0])


def test_writes_complete_savedmodel_and_metadata(tmp_path):
  target = str(tmp_path / 'model' / '1')
  assert saved_model.write_saved_model(_TinyModule(2.0), target) == target
  assert _served_scale(target) == 2.0
  assert saved_model.load_metadata(target) == {'scale': 2.0}
  assert _entries(tmp_path / 'model') == ['1']  # No temporary leftovers.


def test_existing_output_is_kept_without_overwrite(tmp_path):
  target = str(tmp_path / 'model')
  saved_model.write_saved_model(_TinyModule(2.0), target)
  with pytest.raises(FileExistsError, match='overwrite'):
    saved_model.write_saved_model(_TinyModule(3.0), target)
  assert _served_scale(target) == 2.0
  saved_model.write_saved_model(_TinyModule(3.0), target, overwrite=True)
  assert _served_scale(target) == 3.0
  assert _entries(tmp_path) == ['model']


def test_failed_export_leaves_nothing_behind(tmp_path):
  target = str(tmp_path / 'model')
  with pytest.raises(saved_model.ExportError, match='tracing failed'):
    saved_model.write_saved_model(_TinyModule(1.0, broken=True), target)
  assert _entries(tmp_path) == []
  saved_model.write_saved_model(_TinyModule(2.0), target)
  with pytest.raises(saved_model.ExportError):
    saved_model.write_saved_model(_TinyModule(1.0, broken=True), target,
                                  overwrite=True)
  assert _entries(tmp_path) == ['model']
  assert _served_scale(target) == 2.0


def test_load_metadata_names_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='export_model'):
    saved_model.load_metadata(str(tmp_path))

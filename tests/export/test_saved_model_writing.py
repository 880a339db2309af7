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


def _age(path, seconds):
  """Sets the modification time of `path` and everything in it back."""
  stamp = os.path.getmtime(path) - seconds
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      os.utime(os.path.join(root, name), (stamp, stamp))
  os.utime(path, (stamp, stamp))


def test_leftovers_of_killed_exports_are_removed_by_the_next(tmp_path):
  """A killed export leaves `.<name>.partial-<pid>-<hex>`; the next export
  to the same path removes stale ones of that name only."""
  parent = tmp_path / 'models'
  parent.mkdir()
  stale = parent / '.1.partial-4242-0123abcd'
  (stale / 'variables').mkdir(parents=True)
  (stale / 'variables' / 'variables.data-00000-of-00001').write_bytes(b'x')
  _age(stale, 3600)
  fresh = parent / '.1.partial-4343-89abcdef'  # Another export, running now.
  fresh.mkdir()
  os.utime(fresh, (os.path.getmtime(fresh) + 3600,) * 2)
  other_name = parent / '.2.partial-4242-0123abcd'  # Another output path.
  other_name.mkdir()
  _age(other_name, 3600)
  not_ours = parent / '.1.partial-keep'
  not_ours.mkdir()
  _age(not_ours, 3600)
  saved_model.write_saved_model(_TinyModule(2.0), str(parent / '1'))
  assert _entries(parent) == sorted(
      ['1', fresh.name, other_name.name, not_ours.name])


def test_backup_of_a_killed_overwrite_is_kept_while_it_is_the_only_copy(
    tmp_path):
  parent = tmp_path / 'models'
  parent.mkdir()
  backup = parent / '.1.old-4242-0123abcd'
  saved_model.write_saved_model(_TinyModule(2.0), str(backup))
  _age(backup, 3600)
  # Killed between the two renames: only the backup holds the model.
  assert saved_model.remove_stale_leftovers(str(parent / '1')) == []
  assert backup.exists()
  saved_model.write_saved_model(_TinyModule(3.0), str(parent / '1'))
  # Now `1` exists: the next export's cleanup removes the old copy.
  saved_model.write_saved_model(_TinyModule(4.0), str(parent / '1'),
                                overwrite=True)
  assert _entries(parent) == ['1']
  assert _served_scale(str(parent / '1')) == 4.0

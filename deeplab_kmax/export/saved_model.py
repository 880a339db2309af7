"""Writing and reading the serving SavedModel.

A SavedModel directory is written in full or not at all: the export goes to a
hidden temporary directory next to `output_path` and is renamed into place at
the end. An existing `output_path` is replaced only with `overwrite=True`, and
even then the old directory is moved aside first and deleted only after the
new one is in place. (Renaming is atomic on local file systems; on object
stores such as GCS TensorFlow renames object by object.)

An export killed midway (SIGKILL, power loss) leaves its hidden
`.<name>.partial-<pid>-<hex>` folder behind, or, when killed between the two
renames of an overwrite, the replaced version as `.<name>.old-<pid>-<hex>`.
The next export to the same path removes stale ones (see `temp_files` for
the age rule); an `.old-` folder is removed only when `<name>` exists, since
otherwise it is the only copy of the previous export.
"""

import json
import os
import time
from typing import Any, Dict, Optional

from absl import logging
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax import temp_files
from deeplab_kmax.export import serving

STAGING_TAG = 'partial'
BACKUP_TAG = 'old'


class ExportError(RuntimeError):
  """The SavedModel could not be written (nothing was left at the target)."""


def remove_stale_leftovers(output_path: str) -> list:
  """Deletes what killed exports to `output_path` left next to it."""
  output_path = output_path.rstrip('/')
  parent, base = os.path.split(output_path)
  parent = parent or '.'
  removed = temp_files.remove_stale(
      parent, temp_files.sibling_pattern(base, STAGING_TAG))
  backups = temp_files.sibling_pattern(base, BACKUP_TAG)
  if tf.io.gfile.exists(output_path):
    removed += temp_files.remove_stale(parent, backups)
  else:
    try:
      names = tf.io.gfile.listdir(parent)
    except tf.errors.NotFoundError:
      names = []
    for name in names:
      if backups.fullmatch(name.rstrip('/')):
        logging.warning(
            '%s is the previous export of %s, moved aside by an overwrite '
            'that was killed; it is kept (rename it back if needed).',
            os.path.join(parent, name), output_path)
  return removed


def _remove_tree(path: str) -> None:
  try:
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(path)
  except (tf.errors.OpError, OSError) as e:  # Cleanup must not mask errors.
    logging.warning('Could not remove %s: %s', path, e)


def write_saved_model(module: serving.PanopticServingModule, output_path: str,
                      overwrite: bool = False) -> str:
  """Saves `module` with its signatures and metadata at `output_path`.

  Args:
    module: the serving module.
    output_path: directory to create.
    overwrite: replace an existing `output_path`.

  Returns:
    `output_path`.

  Raises:
    FileExistsError: `output_path` exists and overwrite is False.
    ExportError: saving failed; `output_path` is unchanged.
  """
  output_path = output_path.rstrip('/')
  if not output_path:
    raise ValueError('output_path must not be empty.')
  if tf.io.gfile.exists(output_path) and not overwrite:
    raise FileExistsError(
        f'{output_path} already exists; pass overwrite=True (--overwrite) to '
        'replace it, or choose another output path.')
  parent = os.path.dirname(output_path)
  if parent:
    tf.io.gfile.makedirs(parent)
  remove_stale_leftovers(output_path)

  staging = temp_files.temporary_sibling(output_path, STAGING_TAG)
  start = time.time()
  try:
    tf.saved_model.save(module, staging, signatures=module.signatures())
    # assets.extra/ is TF Serving's place for files the graph does not read.
    tf.io.gfile.makedirs(os.path.dirname(metadata_path(staging)))
    with tf.io.gfile.GFile(metadata_path(staging), 'w') as f:
      f.write(module.metadata_json())
  except Exception as e:
    _remove_tree(staging)
    raise ExportError(f'Exporting the SavedModel to {output_path} failed: '
                      f'{e}') from e

  backup = None
  if tf.io.gfile.exists(output_path):
    backup = temp_files.temporary_sibling(output_path, BACKUP_TAG)
    tf.io.gfile.rename(output_path, backup)
  try:
    tf.io.gfile.rename(staging, output_path)
  except Exception:
    if backup is not None:
      tf.io.gfile.rename(backup, output_path)
    _remove_tree(staging)
    raise
  if backup is not None:
    _remove_tree(backup)
  logging.info('Wrote SavedModel %s in %.1fs.', output_path,
               time.time() - start)
  return output_path


def metadata_path(saved_model_dir: str) -> str:
  return os.path.join(saved_model_dir, 'assets.extra',
                      serving.METADATA_FILENAME)


def load_metadata(saved_model_dir: str) -> Dict[str, Any]:
  """The serving metadata (dataset, preprocessing) of an exported model."""
  path = metadata_path(saved_model_dir)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'{saved_model_dir} has no {serving.METADATA_FILENAME}; was it '
        'written by deeplab_kmax.export (trainer/export_model.py)?')
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def load(saved_model_dir: str, signature: Optional[str] = None):
  """Loads the SavedModel; returns (loaded object, signature function,
  metadata).

  Raises:
    FileNotFoundError: no SavedModel at `saved_model_dir`.
    KeyError: it lacks the signature.
  """
  if not tf.saved_model.contains_saved_model(saved_model_dir):
    raise FileNotFoundError(
        f'{saved_model_dir} holds no SavedModel (saved_model.pb); give the '
        'folder trainer/export_model.py wrote (--output_path).')
  loaded = tf.saved_model.load(saved_model_dir)
  name = signature or keys.SIGNATURE_IMAGE
  if name not in loaded.signatures:
    raise KeyError(f'{saved_model_dir} has no signature {name!r}; it has '
                   f'{sorted(loaded.signatures)}.')
  return loaded, loaded.signatures[name], load_metadata(saved_model_dir)

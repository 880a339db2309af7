"""Temporary names for files being written, and removal of killed runs' ones.

Every tool of this package writes an output under a hidden temporary name in
the same folder and renames it into place when it is complete, so a reader
sees the old file or the new one, never half of one. A run killed with
SIGKILL cannot clean up, so its temporaries stay behind; the next run of the
same tool removes the ones that are *stale*:

  * the name matches the tool's own pattern exactly (never anyone else's
    files), and
  * the newest modification time in it (a folder: of anything inside) is
    older than the start of the current process; a run that is writing now
    keeps touching its temporaries, and one started after us made them later.

Two runs writing into the same place at once are not supported anyway; the
age rule only keeps a cleanup from deleting what a run that is still working
has just written.
"""

import os
import posixpath
import re
import time
import uuid
from typing import Callable, List, Optional, Pattern

from absl import logging
import tensorflow as tf


def _process_start_time() -> float:
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return float(psutil.Process().create_time())
  except Exception:  # pylint: disable=broad-except
    return time.time()  # At import, which is close to the process start.


PROCESS_START = _process_start_time()

# `.<name>.<tag>-<pid>-<8 hex digits>`: what `temporary_sibling` makes.
_TAG = r'[a-z]+'
_SUFFIX = r'-\d+-[0-9a-f]{8}'


def _split(path: str):
  if '://' in path:
    return posixpath.split(path)
  return os.path.split(path)


def _join(parent: str, name: str) -> str:
  return posixpath.join(parent, name) if '://' in parent else os.path.join(
      parent, name)


def temporary_sibling(path: str, tag: str = 'partial') -> str:
  """A hidden, unique path beside `path`: `.<name>.<tag>-<pid>-<hex>`."""
  if not re.fullmatch(_TAG, tag):
    raise ValueError(f'tag must be lower-case letters, got {tag!r}.')
  parent, base = _split(path.rstrip('/'))
  return _join(parent, f'.{base}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}')


def sibling_pattern(name: str, tag: str = 'partial') -> Pattern[str]:
  """Matches `temporary_sibling` names made for the file/folder `name`."""
  return re.compile(re.escape(f'.{name}.{tag}') + _SUFFIX)


def any_sibling_pattern(tag: str = 'partial') -> Pattern[str]:
  """Matches `temporary_sibling` names of any file with this tag."""
  return re.compile(r'\..+\.' + re.escape(tag) + _SUFFIX)


def newest_mtime(path: str) -> float:
  """Seconds since the epoch of the newest change in a file or folder."""
  newest = 0.0
  try:
    newest = tf.io.gfile.stat(path).mtime_nsec / 1e9
  except tf.errors.OpError:
    pass  # Object stores have no folder entries.
  if tf.io.gfile.isdir(path):
    for root, _, files in tf.io.gfile.walk(path):
      for name in files:
        try:
          newest = max(newest,
                       tf.io.gfile.stat(_join(root, name)).mtime_nsec / 1e9)
        except tf.errors.OpError:
          pass  # Removed meanwhile.
  return newest


def remove_stale(directory: str, pattern: Pattern[str],
                 older_than: Optional[float] = None,
                 keep: Callable[[str], bool] = lambda path: False
                 ) -> List[str]:
  """Deletes entries of `directory` whose names fully match `pattern` and
  whose newest change is older than `older_than` (default: this process's
  start). Returns the removed paths; a failure to remove is logged only."""
  older_than = PROCESS_START if older_than is None else older_than
  try:
    names = tf.io.gfile.listdir(directory)
  except tf.errors.NotFoundError:
    return []
  removed = []
  for name in sorted(names):
    name = name.rstrip('/')
    if not pattern.fullmatch(name):
      continue
    path = _join(directory, name)
    if keep(path) or newest_mtime(path) >= older_than:
      continue
    try:
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
    except (tf.errors.OpError, OSError) as e:
      logging.warning('Could not remove the stale %s: %s', path, e)
      continue
    logging.info('Removed %s, left by an earlier run that was killed.', path)
    removed.append(path)
  return removed


def write_atomically(path: str, write: Callable[[str], None],
                     tag: str = 'tmp') -> None:
  """Calls `write(temporary_path)`, then renames the result onto `path`.

  The temporary is `temporary_sibling(path, tag)`. On an error it is removed
  and `path` is left as it was.
  """
  temporary = temporary_sibling(path, tag)
  try:
    write(temporary)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except BaseException:
    try:
      if tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)
    except (tf.errors.OpError, OSError):
      pass
    raise

"""Finds damaged TFRecord files before (or after) a long run trips over them.

Every record of every file is read with tf.data's reader, which verifies the
length and data CRCs; the bytes read are then compared with the file size,
because the reader ends silently at a record header cut short. One pass over
the bytes, files checked in parallel threads.
"""

import concurrent.futures
import dataclasses
import re
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from deeplab_kmax.data.input_pipeline import RECORD_OVERHEAD_BYTES

# TF prefixes and suffixes its op errors with graph details; keep the reason.
_TF_ERROR_NOISE = re.compile(r'\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$',
                             re.DOTALL)


@dataclasses.dataclass(frozen=True)
class FileReport:
  path: str
  size: int
  num_records: int           # Whole records read; 0 if a read failed.
  error: Optional[str]       # Why the file is bad; None if it is fine.

  @property
  def ok(self) -> bool:
    return self.error is None


def _count_records(path: str) -> Tuple[int, int]:
  """(records, bytes they occupy in the file); raises tf.errors.OpError."""
  lengths = tf.data.TFRecordDataset(path).map(
      lambda record: tf.cast(tf.strings.length(record), tf.int64))
  zero = tf.constant(0, tf.int64)
  count, data_bytes = lengths.reduce(
      (zero, zero), lambda state, length: (state[0] + 1, state[1] + length))
  count = int(count)
  return count, int(data_bytes) + count * RECORD_OVERHEAD_BYTES


def check_file(path: str) -> FileReport:
  """Reads all of `path`; the report says whether and why it is damaged."""
  try:
    size = tf.io.gfile.stat(path).length
  except tf.errors.OpError as e:
    return FileReport(path, 0, 0, f'cannot be read: {e.message}')
  try:
    count, consumed = _count_records(path)
  except tf.errors.OpError as e:
    reason = _TF_ERROR_NOISE.sub('', e.message).strip()
    return FileReport(path, size, 0, f'{type(e).__name__}: {reason}')
  if consumed != size:
    return FileReport(
        path, size, count,
        f'truncated: {count} whole records end at byte {consumed}, the file '
        f'has {size} bytes')
  return FileReport(path, size, count, None)


def match_files(patterns: Sequence[str]) -> List[str]:
  """Sorted files matching the patterns; a pattern matching none raises."""
  files = set()
  for pattern in patterns:
    matched = tf.io.gfile.glob(pattern)
    if not matched:
      raise FileNotFoundError(f'File pattern {pattern} matches no file.')
    files.update(matched)
  return sorted(files)


def check_files(paths: Sequence[str], num_threads: int = 8
                ) -> List[FileReport]:
  """`check_file` for each path (in parallel), in the order given."""
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    return list(pool.map(check_file, paths))

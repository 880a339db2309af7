"""The files of a converted split: shard names, in-progress files, replacement.

A split is stored as `<split>-SSSSS-of-NNNNN.tfrecord` (DeepLab2's naming).
While a converter writes, each shard lives under a hidden in-progress name
that carries the writer's process id, `.<shard name>.<pid>.partial`, so that

  * a reader's file pattern never matches a half-written shard,
  * a later run can tell the leftovers of a killed run (writer gone) from the
    files of a run still in progress (writer alive) and remove only the
    former,
  * the new shards replace the old ones of the split as one set: the old
    ones are deleted only after every new one is complete, so a re-run with
    another --num_shards does not leave two copies of the split behind.

No TensorFlow at import time: the conversion worker processes import this
module. File operations go through tf.io.gfile (local or cloud paths).
"""

import os
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

SHARD_SUFFIX = '.tfrecord'
PARTIAL_SUFFIX = '.partial'

_SHARD_NAME = re.compile(r'(?P<split>.+)-(?P<index>\d{5,})-of-(?P<count>\d{5,})'
                         + re.escape(SHARD_SUFFIX))
# `.<shard>.<pid>.partial`; files of older versions have no pid.
_PARTIAL_NAME = re.compile(r'\.(?P<shard>.+' + re.escape(SHARD_SUFFIX) +
                           r')(?:\.(?P<pid>\d+))?' + re.escape(PARTIAL_SUFFIX))


class ShardName(NamedTuple):
  split: str
  index: int
  count: int


def shard_filename(split: str, shard: int, num_shards: int) -> str:
  """DeepLab2's shard naming, e.g. `train-00003-of-01000.tfrecord`."""
  return f'{split}-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIX}'


def parse_shard_filename(name: str) -> Optional[ShardName]:
  """The (split, index, count) of a shard file name; None for other files."""
  match = _SHARD_NAME.fullmatch(os.path.basename(name))
  if not match:
    return None
  return ShardName(match['split'], int(match['index']), int(match['count']))


def shard_ranges(num_items: int, num_shards: int) -> Tuple[Tuple[int, int], ...]:
  """[start, end) per shard: equal ceil-sized shards, the tail ones shorter."""
  if num_shards <= 0:
    raise ValueError(f'num_shards must be positive, got {num_shards}.')
  per_shard = -(-num_items // num_shards)
  return tuple((min(s * per_shard, num_items),
                min((s + 1) * per_shard, num_items))
               for s in range(num_shards))


def partial_filename(shard_name: str, pid: Optional[int] = None) -> str:
  """The hidden name a shard is written under by process `pid` (default: us)."""
  return f'.{shard_name}.{os.getpid() if pid is None else pid}{PARTIAL_SUFFIX}'


def _process_is_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process.
    return True
  except OSError:
    return False
  return True


def _listdir(folder: str) -> List[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(folder):
    return []
  return [name.rstrip('/') for name in tf.io.gfile.listdir(folder)]


def _remove(folder: str, names: Sequence[str]) -> List[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  removed = []
  for name in names:
    path = os.path.join(folder, name)
    try:
      tf.io.gfile.remove(path)
    except tf.errors.NotFoundError:  # Removed concurrently; fine.
      continue
    removed.append(path)
  return removed


def remove_stale_partials(folder: str, split: str) -> List[str]:
  """Deletes in-progress files of `split` whose writer process is gone.

  Only files of this module's own naming and of this split are touched;
  those of a writer still running (on this machine) are kept. Returns the
  removed paths.
  """
  stale = []
  for name in _listdir(folder):
    match = _PARTIAL_NAME.fullmatch(name)
    if not match:
      continue
    shard = parse_shard_filename(match['shard'])
    if shard is None or shard.split != split:
      continue
    pid = match['pid']
    if pid is None or (int(pid) != os.getpid() and
                       not _process_is_alive(int(pid))):
      stale.append(name)
  return _remove(folder, stale)


def split_shards(folder: str, split: str) -> List[str]:
  """Names of the finished shard files of `split` in `folder`, sorted."""
  names = []
  for name in _listdir(folder):
    shard = parse_shard_filename(name)
    if shard is not None and shard.split == split:
      names.append(name)
  return sorted(names)


def remove_other_shards(folder: str, split: str,
                        keep: Sequence[str]) -> List[str]:
  """Deletes the shards of `split` not in `keep` (names or paths)."""
  kept = {os.path.basename(k) for k in keep}
  return _remove(folder, [n for n in split_shards(folder, split)
                          if n not in kept])


def is_complete_split(folder: str, split: str) -> bool:
  """True iff `folder` holds exactly one full set `split-*-of-N` (N >= 1)."""
  shards = [parse_shard_filename(n) for n in split_shards(folder, split)]
  counts = {s.count for s in shards}
  if len(counts) != 1:
    return False
  count = counts.pop()
  return count >= 1 and sorted(s.index for s in shards) == list(range(count))

r"""Checks TFRecord shards: lists the damaged ones with the reason.

  python data/check_tfrecords.py "/data/coco/tfrecord/train-*.tfrecord" \
      "/data/coco/tfrecord/val-*.tfrecord"

Every record's CRCs are verified and each file must end with a whole record.
Prints one line per bad file (`BAD <file>: <reason>`) and a summary; exits
with status 1 if any file is bad or no file holds a record (training on such
data would wait forever), 0 otherwise. A pattern that matches nothing is an
error (`ERROR: ...`, non-zero status).
"""

import sys

from absl import app
from absl import flags

import _checkout  # pylint: disable=unused-import,g-bad-import-order

from deeplab_kmax import cli_errors
from deeplab_kmax.data import tfrecord_check

_NUM_THREADS = flags.DEFINE_integer('num_threads', 8,
                                    'Files checked in parallel.')


def main(argv) -> int:
  patterns = argv[1:]
  if not patterns:
    raise app.UsageError('Give one or more TFRecord file patterns.')
  files = tfrecord_check.match_files(patterns)
  reports = tfrecord_check.check_files(files, _NUM_THREADS.value)
  bad = [r for r in reports if not r.ok]
  for report in bad:
    print(f'BAD {report.path}: {report.error}')
  records = sum(r.num_records for r in reports)
  empty = sum(1 for r in reports if r.ok and r.num_records == 0)
  print(f'Checked {len(reports)} files, {records} records: {len(bad)} bad, '
        f'{empty} empty.')
  if bad:
    return 1
  if records == 0:
    print('ERROR: no file holds a record.', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  cli_errors.run(main)

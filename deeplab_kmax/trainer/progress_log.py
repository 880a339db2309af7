"""Training progress for people (one log line per loop) and for programs.

A person watching a run wants one short line per loop: where training is,
whether the loss goes down, and how long is left. Everything else -- every
loss term, the auxiliary (deep-supervision) terms included, learning rates,
the gradient norm -- goes to TensorBoard (through Orbit) and to a JSON lines
file, `<model_dir>/train_log.jsonl`, one object per loop, that scripts read.

The line (`format_line`, parsed back by `parse_line`):

  step 1200/1500 | loss 3.4567 | pq_class 0.1234 pq_dice 0.4567 \
mask_id 0.7890 inst_disc 1.2345 semantic 0.3456 | lr 8.12e-04 | \
1.62 steps/s | ETA 0h03m05s

Terms whose loss weight is 0 are left out; without a known training length
the step has no `/total` and there is no ETA.

Orbit's controller logs (and prints) each loop's whole output dict at INFO,
and TensorFlow's checkpoint saver logs every save; `quiet_orbit` moves those
messages to DEBUG (`--verbosity=1` shows them) so that the line above is the
only per-loop message at INFO.
"""

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import re
import time
from typing import Any, Dict, Iterator, Mapping, Optional

from absl import logging

from deeplab_kmax import keys

JSONL_FILENAME = 'train_log.jsonl'
# (short name on the line, loss name), in the order of the line.
LINE_TERMS = (
    ('pq_class', keys.PQ_STYLE_CLASS_TERM),
    ('pq_dice', keys.PQ_STYLE_MASK_DICE_TERM),
    ('mask_id', keys.MASK_ID_CROSS_ENTROPY),
    ('inst_disc', keys.INSTANCE_DISCRIMINATION),
    ('semantic', keys.SEMANTIC_LOSS),
)

_NUMBER = r'[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)'
_LINE = re.compile(
    rf'^step (?P<step>\d+)(?:/(?P<total_steps>\d+))? '
    rf'\| loss (?P<loss>{_NUMBER})'
    rf'(?: \| (?P<terms>(?:\w+ {_NUMBER} ?)+))?'
    rf' \| lr (?P<lr>{_NUMBER})'
    rf' \| (?P<rate>{_NUMBER}) steps/s'
    rf'(?: \| ETA (?P<eta>\d+h\d\dm\d\ds))?$')


def format_duration(seconds: float) -> str:
  """Seconds -> '1h02m03s'."""
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s'


def parse_duration(text: str) -> int:
  """'1h02m03s' -> seconds."""
  match = re.fullmatch(r'(\d+)h(\d\d)m(\d\d)s', text)
  if not match:
    raise ValueError(f'Not a duration like 1h02m03s: {text!r}')
  hours, minutes, seconds = (int(g) for g in match.groups())
  return hours * 3600 + minutes * 60 + seconds


@dataclasses.dataclass(frozen=True)
class LoopRecord:
  """What one training loop reports.

  Attributes:
    step: the global step at the end of the loop.
    losses: loop means of every loss term, by loss name (`total_loss` too).
    learning_rate: the main optimizer's current rate.
    steps_per_second: steps of this loop / its wall time.
    total_steps: the training length, if known (for the ETA).
    extra: further scalars for the JSON line (backbone learning rate,
      gradient norm, ...).
  """
  step: int
  losses: Mapping[str, float]
  learning_rate: float
  steps_per_second: float
  total_steps: Optional[int] = None
  extra: Mapping[str, float] = dataclasses.field(default_factory=dict)

  @property
  def eta_seconds(self) -> Optional[float]:
    if not self.total_steps or self.steps_per_second <= 0:
      return None
    return max(self.total_steps - self.step, 0) / self.steps_per_second

  def to_json_dict(self) -> Dict[str, Any]:
    return {
        'step': int(self.step),
        'total_steps': self.total_steps,
        'time': time.time(),
        keys.LEARNING_RATE: float(self.learning_rate),
        'steps_per_second': float(self.steps_per_second),
        'eta_seconds': self.eta_seconds,
        'losses': {name: _json_number(value)
                   for name, value in self.losses.items()},
        **{name: _json_number(value) for name, value in self.extra.items()},
    }


def _json_number(value) -> Optional[float]:
  """JSON has no NaN/Inf: they become null (the line still shows them)."""
  value = float(value)
  return value if value == value and abs(value) != float('inf') else None


def format_line(record: LoopRecord) -> str:
  """The one INFO line of a loop (see the module docstring)."""
  step = (f'step {record.step}/{record.total_steps}' if record.total_steps
          else f'step {record.step}')
  parts = [step, f'loss {float(record.losses[keys.TOTAL_LOSS]):.4f}']
  terms = [f'{short} {float(record.losses[name]):.4f}'
           for short, name in LINE_TERMS if name in record.losses]
  if terms:
    parts.append(' '.join(terms))
  parts.append(f'lr {record.learning_rate:.3g}')
  parts.append(f'{record.steps_per_second:.3g} steps/s')
  eta = record.eta_seconds
  if eta is not None:
    parts.append(f'ETA {format_duration(eta)}')
  return ' | '.join(parts)


def parse_line(line: str) -> Dict[str, Any]:
  """A line of `format_line` -> {step, total_steps, loss, terms, lr,
  steps_per_second, eta_seconds}; ValueError for anything else."""
  match = _LINE.match(line.strip())
  if not match:
    raise ValueError(f'Not a training progress line: {line!r}')
  terms = {}
  if match.group('terms'):
    words = match.group('terms').split()
    terms = {words[i]: float(words[i + 1]) for i in range(0, len(words), 2)}
  total = match.group('total_steps')
  eta = match.group('eta')
  return {
      'step': int(match.group('step')),
      'total_steps': int(total) if total else None,
      'loss': float(match.group('loss')),
      'terms': terms,
      'lr': float(match.group('lr')),
      'steps_per_second': float(match.group('rate')),
      'eta_seconds': parse_duration(eta) if eta else None,
  }


def append_json_line(path: str, content: Mapping[str, Any]) -> None:
  """Appends one JSON object as one line.

  Local files: a single write() on an O_APPEND descriptor, so a reader (or a
  crash) sees whole lines only. Remote paths (gs://, ...) cannot be appended
  to; the file is rewritten through a temporary file and a rename.
  """
  line = (json.dumps(content, sort_keys=True) + '\n').encode('utf-8')
  if '://' not in path:
    directory = os.path.dirname(path)
    if directory:
      os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, line)
    finally:
      os.close(fd)
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  old = b''
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      old = f.read()
  temporary = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(temporary, 'wb') as f:
    f.write(old + line)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def read_json_lines(path: str) -> list:
  """The records of a JSON lines file (for tools and tests)."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


class ProgressLog:
  """Logs each loop's line at INFO and appends its record to a JSONL file.

  `jsonl_path` None: the line only (non-chief workers).
  """

  def __init__(self, jsonl_path: Optional[str] = None):
    self.jsonl_path = jsonl_path

  def log(self, record: LoopRecord) -> str:
    line = format_line(record)
    logging.info('%s', line)
    if self.jsonl_path:
      append_json_line(self.jsonl_path, record.to_json_dict())
    return line


# Modules whose INFO messages repeat every loop or checkpoint (path ends).
CHATTY_MODULES = ('orbit/controller.py', 'orbit/utils/loop_fns.py',
                  'checkpoint/functional_saver.py')


class _DemoteChatter(std_logging.Filter):
  """INFO records of CHATTY_MODULES become DEBUG records (dropped unless
  DEBUG is enabled)."""

  def __init__(self, logger: std_logging.Logger):
    super().__init__()
    self._logger = logger

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    if record.levelno != std_logging.INFO or not path.endswith(
        CHATTY_MODULES):
      return True
    if not self._logger.isEnabledFor(std_logging.DEBUG):
      return False
    record.levelno, record.levelname = std_logging.DEBUG, 'DEBUG'
    return True


@contextlib.contextmanager
def quiet_orbit() -> Iterator[None]:
  """Moves Orbit's controller messages (whole output dicts each loop, also
  printed to stdout) and the checkpoint saver's from INFO to DEBUG while
  the context is active."""
  from orbit import controller  # pylint: disable=g-import-not-at-top
  logger = logging.get_absl_logger()
  chatter = _DemoteChatter(logger)
  logger.addFilter(chatter)
  original = getattr(controller, '_log', None)
  if original is not None:  # Otherwise another Orbit version: no print.
    controller._log = _debug  # pylint: disable=protected-access
  try:
    yield
  finally:
    logger.removeFilter(chatter)
    if original is not None:
      controller._log = original  # pylint: disable=protected-access


# Orbit messages a person needs once per run (which checkpoint it resumed
# from) stay at INFO; where a train call starts and ends is printed to
# stdout only (once per call, as Orbit does), the rest goes to DEBUG.
KEPT_ORBIT_MESSAGES = ('restored from checkpoint', 'restored model from')
PRINTED_ORBIT_MESSAGES = ('training until step',)


def _debug(message: str) -> None:
  if any(kept in message for kept in KEPT_ORBIT_MESSAGES):
    logging.info('%s', message)
    print(message, flush=True)
    return
  logging.debug('%s', message)
  if any(printed in message for printed in PRINTED_ORBIT_MESSAGES):
    print(message, flush=True)

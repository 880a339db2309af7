"""The readable training line, the JSON lines log and the evaluation table."""

import logging as std_logging
import os

from absl import logging
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.losses import kmax_loss
from deeplab_kmax.trainer import progress_log
from deeplab_kmax.trainer import summaries
from deeplab_kmax.trainer import train_lib
from tests.trainer import standins

_MAIN_TERMS = [name for _, name in progress_log.LINE_TERMS]
_AUX_TERMS = [kmax_loss.auxiliary_loss_name(i, term) for i in range(2)
              for term in _MAIN_TERMS[:-1]]


class _KMaXLikeLoss(standins.PixelCrossEntropy):
  """The stand-in loss under the kMaX loss names, auxiliary terms included
  (each term a different multiple of the cross-entropy)."""

  def get_loss_names(self):
    return [keys.TOTAL_LOSS] + _MAIN_TERMS + _AUX_TERMS

  def __call__(self, y_true, y_pred):
    base = super().__call__(y_true, y_pred)['total_loss']
    names = self.get_loss_names()
    return {name: base * (1.0 + 0.1 * i) for i, name in enumerate(names)}


def _record(**fields):
  values = dict(step=1200, total_steps=1500, learning_rate=8.123e-4,
                steps_per_second=1.62,
                losses={keys.TOTAL_LOSS: 3.45678,
                        **{name: 0.1 * (i + 1)
                           for i, name in enumerate(_MAIN_TERMS)},
                        _AUX_TERMS[0]: 9.0})
  values.update(fields)
  return progress_log.LoopRecord(**values)


def test_line_has_step_loss_terms_rate_and_eta_and_parses_back():
  line = progress_log.format_line(_record())
  assert line == ('step 1200/1500 | loss 3.4568 | pq_class 0.1000 '
                  'pq_dice 0.2000 mask_id 0.3000 inst_disc 0.4000 '
                  'semantic 0.5000 | lr 0.000812 | 1.62 steps/s | '
                  'ETA 0h03m05s')
  parsed = progress_log.parse_line(line)
  assert parsed['step'] == 1200 and parsed['total_steps'] == 1500
  assert parsed['loss'] == pytest.approx(3.4568)
  assert parsed['terms'] == pytest.approx(
      {'pq_class': 0.1, 'pq_dice': 0.2, 'mask_id': 0.3, 'inst_disc': 0.4,
       'semantic': 0.5})
  assert parsed['lr'] == pytest.approx(8.12e-4)
  assert parsed['steps_per_second'] == pytest.approx(1.62)
  assert parsed['eta_seconds'] == 185  # 300 steps at 1.62 steps/s.
  # The auxiliary term is not on the line.
  assert '9.0' not in line


def test_line_without_length_or_disabled_terms():
  record = _record(total_steps=None, losses={keys.TOTAL_LOSS: 2.0,
                                             keys.SEMANTIC_LOSS: 1.5})
  line = progress_log.format_line(record)
  assert line == 'step 1200 | loss 2.0000 | semantic 1.5000 | lr 0.000812 | ' \
                 '1.62 steps/s'
  parsed = progress_log.parse_line(line)
  assert parsed['total_steps'] is None and parsed['eta_seconds'] is None
  assert parsed['terms'] == {'semantic': 1.5}
  with pytest.raises(ValueError, match='Not a training progress line'):
    progress_log.parse_line('train | step: 100 | steps/sec: 1.0')


def test_json_lines_are_appended_whole(tmp_path):
  path = str(tmp_path / 'sub' / progress_log.JSONL_FILENAME)
  log = progress_log.ProgressLog(path)
  log.log(_record(step=10))
  log.log(_record(step=20, losses={keys.TOTAL_LOSS: float('nan')}))
  records = progress_log.read_json_lines(path)
  assert [r['step'] for r in records] == [10, 20]
  assert records[0]['losses'][_AUX_TERMS[0]] == 9.0
  assert records[0]['eta_seconds'] == pytest.approx((1500 - 10) / 1.62)
  assert records[1]['losses'] == {keys.TOTAL_LOSS: None}  # NaN -> null.
  with open(path, encoding='utf-8') as f:
    assert f.read().count('\n') == 2


def test_evaluation_table():
  pq = {'PQ': 0.572, 'SQ': 0.868, 'RQ': 0.629, 'PQ_thing': 0.206,
        'SQ_thing': 0.751, 'RQ_thing': 0.27, 'PQ_stuff': 0.939,
        'SQ_stuff': 0.984, 'RQ_stuff': 0.953, 'TP': 3.0}
  table = summaries.evaluation_table(
      pq, {'mIoU': 0.59, 'pixel_accuracy': 0.9},
      {'AP': 0.068, 'AP50': 0.152, 'AP75': 0.051, 'AR1': 0.2}, step=1500,
      num_examples=64)
  lines = table.splitlines()
  assert lines[0] == 'evaluation at step 1500 over 64 images'
  assert lines[1].split() == ['PQ', 'SQ', 'RQ']
  rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
          for line in lines[2:5]}
  assert rows == {'all': [57.2, 86.8, 62.9], 'things': [20.6, 75.1, 27.0],
                  'stuff': [93.9, 98.4, 95.3]}
  assert lines[5] == 'mIoU 59.00 | AP 6.80 | AP50 15.20 | AP75 5.10'
  assert len(lines) == 6
  # Without semantic or instance metrics: the PQ rows only.
  assert len(summaries.evaluation_table(pq, {}, {}).splitlines()) == 5


class _Capture(std_logging.Handler):

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


def test_training_logs_one_line_per_loop_and_the_jsonl(tmp_path, capsys,
                                                       reference_dir):
  config = standins.experiment_config(reference_dir, total_steps=6,
                                      checkpoint_every=6, steps_per_loop=2)
  builders = standins.builders()
  builders.loss = lambda *_: _KMaXLikeLoss()
  model_dir = str(tmp_path / 'model')
  capture = _Capture()
  logger = logging.get_absl_logger()
  logger.addHandler(capture)
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.DEBUG)
  try:
    train_lib.run_experiment(
        'train_and_eval', config, model_dir,
        strategy=tf.distribute.OneDeviceStrategy('CPU:0'),
        builders=builders)
  finally:
    logger.removeHandler(capture)
    logging.set_verbosity(previous)

  info = [r.getMessage() for r in capture.records
          if r.levelno == std_logging.INFO]
  lines = [m for m in info if m.startswith('step ')]
  parsed = [progress_log.parse_line(line) for line in lines]
  assert [p['step'] for p in parsed] == [2, 4, 6]
  assert all(p['total_steps'] == 6 for p in parsed)
  assert set(parsed[0]['terms']) == {short for short, _ in
                                     progress_log.LINE_TERMS}
  assert parsed[-1]['eta_seconds'] == 0
  # Nothing else at INFO per loop: Orbit's output dicts went to DEBUG (and
  # nothing was printed), the evaluation ends with the compact table.
  assert not any(m.startswith(('train |', ' eval |')) for m in info), info
  # Only where a train call starts is printed (once per call, not per loop).
  printed = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith(('train |', ' eval |'))]
  assert all('training until step' in line for line in printed), printed
  debug = [r.getMessage() for r in capture.records
           if r.levelno == std_logging.DEBUG]
  assert any(m.startswith('train |') for m in debug)
  table = [m for m in info if m.startswith('evaluation at step 6')]
  assert len(table) == 1 and '\nall ' in table[0] and 'mIoU' in table[0]
  assert len(info) - len(lines) - len(table) <= 3, info

  records = progress_log.read_json_lines(
      os.path.join(model_dir, progress_log.JSONL_FILENAME))
  assert [r['step'] for r in records] == [2, 4, 6]
  for record, line in zip(records, parsed):
    assert set(record['losses']) == set(_KMaXLikeLoss().get_loss_names())
    assert record['losses'][keys.TOTAL_LOSS] == pytest.approx(line['loss'],
                                                              abs=1e-4)
    assert record['learning_rate'] == pytest.approx(line['lr'], rel=1e-2)
    assert record['gradient_norm'] > 0

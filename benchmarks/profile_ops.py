"""Where the time goes: top TensorFlow ops by share of op time.

  python benchmarks/profile_ops.py                       # COCO R50, 641
  python benchmarks/profile_ops.py --crop=129 --top=15 --modes=infer
  python benchmarks/profile_ops.py --crop=1281 --modes=infer \
      --scope_depth=3 --inter_op_threads=1          # per model part

Profiles one call of each mode with the TensorFlow profiler
(`tf.profiler.experimental`) after an untimed warm-up call (tracing):

  infer: `model(images, training=False)` in a tf.function, post-processing
         included;
  train: one network training step in a tf.function (forward with
         training=True, gradients of a scalar of the outputs for all
         trainable variables, as ../shared/bench/side_by_side.py measures).

The trace's op events (`name:OpType`) are summed per op type, or with
--scope_depth per scope of the node names; shares are of
the summed op time, so they stay meaningful on a loaded machine even when
wall times do not.
"""

import argparse
import collections
import pathlib
import re
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import network_steps  # benchmarks/, beside this script

REPO = pathlib.Path(__file__).resolve().parents[1]
# This checkout, whether or not (or wherever) the package is installed.
sys.path.insert(0, str(REPO))
COCO_R50 = 'configs/coco/kmax_meta_r50.textproto'
# A TraceMe of one TF op: "<node name>:<OpType>" (oneDNN kernels show as
# _Mkl...); runtime events ("Executor::Run", "Eager...: f") do not match.
_OP_EVENT = re.compile(r'^[^:\s]+:([A-Za-z_][A-Za-z0-9_]*)$')


def op_times(xspace, scope_depth: int = 0) -> Dict[str, float]:
  """Microseconds per op type over every plane and line of an XSpace; with
  `scope_depth` > 0, per node-name scope of that depth instead (e.g. 3:
  "kMaXDeepLab/kmax_pixel_decoder/stage_1")."""
  totals = collections.Counter()
  for plane in xspace.planes:
    names = {key: meta.name for key, meta in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        name = names.get(event.metadata_id, '')
        match = _OP_EVENT.match(name)
        if match:
          group = (match.group(1) if not scope_depth else '/'.join(
              name.split(':')[0].split('/')[:scope_depth]))
          totals[group] += event.duration_ps / 1e6
  return dict(totals)


def _load_xspaces(logdir: str):
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  spaces = []
  for path in sorted(pathlib.Path(logdir).rglob('*.xplane.pb')):
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    spaces.append(space)
  if not spaces:
    raise RuntimeError(f'the profiler wrote no *.xplane.pb under {logdir}')
  return spaces


def profile(step, args, scope_depth: int = 0) -> Dict[str, float]:
  """Op time per type (or scope) of one profiled `step(*args)` call."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  network_steps.block(step(*args))  # Trace outside the profile.
  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(logdir)
    try:
      network_steps.block(step(*args))
    finally:
      tf.profiler.experimental.stop()
    totals = collections.Counter()
    for space in _load_xspaces(logdir):
      totals.update(op_times(space, scope_depth))
  return dict(totals)


def top_ops(totals: Dict[str, float], top: int) -> List[Tuple[str, float,
                                                              float]]:
  """(op type, milliseconds, share) of the `top` largest, largest first."""
  total = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
  return [(name, micros / 1e3, micros / total) for name, micros in ranked]


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config_file', default=str(REPO / COCO_R50))
  parser.add_argument('--crop', type=int, default=641)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--modes', default='infer,train')
  parser.add_argument('--top', type=int, default=10)
  parser.add_argument('--scope_depth', type=int, default=0,
                      help='group by node-name scope of this depth (3: '
                      'model/module/stage) instead of by op type')
  parser.add_argument('--inter_op_threads', type=int, default=0,
                      help='1 runs one op at a time, so op times do not '
                      'overlap (0: TensorFlow default)')
  args = parser.parse_args(argv)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top

  if args.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(
        args.inter_op_threads)
  config = config_lib.load_config(args.config_file)
  model = model_lib.build_model(config)  # variables at a small size
  images = tf.constant(np.random.default_rng(0).uniform(
      0, 255, [args.batch, args.crop, args.crop, 3]), tf.float32)
  steps = {'infer': network_steps.infer_step(model),
           'train': network_steps.train_step(model)}
  for mode in args.modes.split(','):
    totals = profile(steps[mode], (images,), args.scope_depth)
    print(f'{mode} {args.crop}x{args.crop} b{args.batch}: '
          f'{sum(totals.values()) / 1e3:.0f} ms of op time')
    for name, millis, share in top_ops(totals, args.top):
      print(f'  {share:6.1%}  {millis:9.1f} ms  {name}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

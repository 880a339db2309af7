"""Picks the tf.distribute strategy for a run.

  TPU address given           -> TPUStrategy
  TF_CONFIG with >1 task      -> MultiWorkerMirroredStrategy (one process per
                                 machine; each uses all its local GPUs)
  num_gpus > 1                -> MirroredStrategy over GPU:0..N-1
  num_gpus == 1               -> OneDeviceStrategy on GPU:0
  otherwise                   -> OneDeviceStrategy on CPU:0
"""

import json
import os
from typing import Optional, Sequence

from absl import logging
import tensorflow as tf


def tf_config_task_count() -> int:
  """Number of tasks in the TF_CONFIG cluster (0 without TF_CONFIG)."""
  raw = os.environ.get('TF_CONFIG')
  if not raw:
    return 0
  try:
    cluster = json.loads(raw).get('cluster', {})
  except json.JSONDecodeError as e:
    raise ValueError(f'TF_CONFIG is not valid JSON: {e}') from None
  return sum(len(tasks) for name, tasks in cluster.items()
             if name in ('chief', 'worker'))


def set_tf_config(worker_hosts: Sequence[str], task_index: int) -> None:
  """Writes TF_CONFIG for a worker cluster given on the command line."""
  if not 0 <= task_index < len(worker_hosts):
    raise ValueError(f'task_index {task_index} is not in [0, '
                     f'{len(worker_hosts)}) for worker_hosts {worker_hosts}.')
  os.environ['TF_CONFIG'] = json.dumps({
      'cluster': {'worker': list(worker_hosts)},
      'task': {'type': 'worker', 'index': task_index},
  })


def create_strategy(tpu: Optional[str] = None, num_gpus: int = 0
                    ) -> tf.distribute.Strategy:
  """Builds the strategy for this process, see the module docstring."""
  if num_gpus < 0:
    raise ValueError(f'num_gpus must be >= 0, got {num_gpus}.')
  if tpu:
    tpu_cluster = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != 'local':  # A remote TPU needs a connection first.
      tf.config.experimental_connect_to_cluster(tpu_cluster)
    tf.tpu.experimental.initialize_tpu_system(tpu_cluster)
    strategy = tf.distribute.TPUStrategy(tpu_cluster)
  elif tf_config_task_count() > 1:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    available = len(tf.config.list_physical_devices('GPU'))
    if num_gpus > available:
      raise ValueError(f'--num_gpus={num_gpus} but only {available} GPU(s) '
                       'are visible.')
    if num_gpus > 1:
      strategy = tf.distribute.MirroredStrategy(
          [f'/gpu:{i}' for i in range(num_gpus)])
    elif num_gpus == 1:
      strategy = tf.distribute.OneDeviceStrategy('/gpu:0')
    else:
      strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  logging.info('Using %s with %d replica(s).', type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy

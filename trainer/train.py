r"""Trains and evaluates kMaX-DeepLab from a DeepLab2-style experiment config.

  python trainer/train.py \
      --config_file=configs/coco/kmax_meta_r50.textproto \
      --mode=train_and_eval --model_dir=/tmp/kmax --num_gpus=8

Modes: train, eval, train_and_eval, continuous_eval. Everything goes to
<model_dir>/<experiment_name>; running the same command again resumes from
the newest checkpoint there. `${VAR}` placeholders in the config come from
the environment. See `deeplab_kmax/trainer/train.py` for all flags
(--tpu/--master, --worker_hosts/--task_index, --config_override); the same
entry point is `python -m deeplab_kmax.trainer.train`.
"""

import os
import sys

from absl import flags

# Makes `deeplab_kmax` importable when run as `python trainer/train.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax.trainer import train as train_cli  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.adopt_module_key_flags(train_cli)  # So that --help lists them.

if __name__ == '__main__':
  train_cli.run()

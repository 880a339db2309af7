"""Training and evaluation of kMaX-DeepLab: Orbit loops on tf.distribute.

  python -m deeplab_kmax.trainer.train --config_file=... --mode=train \
      --model_dir=/tmp/kmax

Modules: `optimizer` (AdamW, schedules), `checkpoints` (DeepLab2 trainer
checkpoint layout, initial checkpoints), `kmax_trainer` / `kmax_evaluator`
(Orbit inner loops), `distribution` (strategies), `train_lib`
(run_experiment) and `summaries`.
"""

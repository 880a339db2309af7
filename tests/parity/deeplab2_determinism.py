"""Removes DeepLab2's two sources of training randomness, for parity runs.

Run inside a DeepLab2 process (TF_USE_LEGACY_KERAS=1). Both are switched
off the same way on this project's side by the parity tests:

* the ASPP's Keras `Dropout` (its Bernoulli masks cannot be matched across
  two code bases) becomes the identity;
* the kMaX transformer decoder's drop path, whose keep probability DeepLab2
  hard-codes per dataset (0.8 for COCO and Cityscapes) rather than reading
  the config, gets keep probability 1. Its per-sample masks leave the
  first step's loss unchanged (each residual branch ends in a batch norm
  whose gamma and beta start at zero) but zero the gradients of those
  gammas and betas for the dropped samples, so they differ between any two
  runs while every other gradient agrees.
"""

import functools

import tensorflow as tf

from deeplab2.model import builder


def disable_dropout() -> None:
  tf.keras.layers.Dropout.call = lambda self, inputs, training=None: inputs


def disable_decoder_drop_path() -> None:
  create = builder.create_kmax_meta_transformer_decoder

  @functools.wraps(create)
  def without_drop_path(*args, **kwargs):
    kwargs['transformer_decoder_drop_path_keep_prob'] = 1.0
    return create(*args, **kwargs)

  builder.create_kmax_meta_transformer_decoder = without_drop_path


def remove_randomness() -> None:
  disable_dropout()
  disable_decoder_drop_path()

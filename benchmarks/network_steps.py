"""The two calls the benchmark scripts time, written once.

infer: `model(images, training=False)`, post-processing included.
train: the network's training step as ../shared/bench/side_by_side.py
       measures it -- forward with training=True, then gradients of a
       scalar of the outputs for every trainable variable (no loss, no
       optimizer).
"""

import tensorflow as tf

# The outputs whose means make the training step's scalar.
TRAIN_OUTPUTS = ('pixel_space_mask_logits', 'transformer_class_logits',
                 'semantic_logits')


def infer_step(model, jit_compile: bool = False):
  """tf.function: images -> list of the output tensors."""

  def step(images):
    outputs = model(images, training=False)
    return [v for v in outputs.values() if isinstance(v, tf.Tensor)]

  return tf.function(step, jit_compile=jit_compile)


def train_step(model, jit_compile: bool = False):
  """tf.function: images -> [scalar] + the non-None gradients."""

  def step(images):
    with tf.GradientTape() as tape:
      outputs = model(images, training=True)
      scalar = tf.add_n([tf.reduce_mean(tf.cast(outputs[key], tf.float32))
                         for key in TRAIN_OUTPUTS])
    gradients = tape.gradient(scalar, model.trainable_variables)
    return [scalar] + [g for g in gradients if g is not None]

  return tf.function(step, jit_compile=jit_compile)


def block(outputs) -> None:
  """Waits for every tensor of `outputs`."""
  for value in tf.nest.flatten(outputs):
    if isinstance(value, tf.Tensor):
      value.numpy()

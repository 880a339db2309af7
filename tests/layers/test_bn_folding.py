"""Batch norm folded into the convolution before it (opt-in inference)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax import model as model_lib
from deeplab_kmax.layers import bn_folding
from deeplab_kmax.layers import convolutions

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _randomise_batch_norms(root: tf.Module, spread: float = 1.0,
                           seed: int = 0) -> None:
  """Gives every batch norm statistics and affine parameters away from the
  identity, so a wrong fold cannot pass by accident. `spread` < 1 keeps a
  deep network's activations in range."""
  rng = np.random.default_rng(seed)
  for module in root.submodules:
    if isinstance(module, tf_keras.layers.BatchNormalization):
      shape = module.moving_mean.shape
      module.moving_mean.assign(rng.normal(0.0, 0.5 * spread, shape))
      module.moving_variance.assign(
          np.exp(rng.uniform(-spread, spread, shape)))
      if module.gamma is not None:
        module.gamma.assign(np.exp(rng.uniform(-spread, spread, shape) / 2))
      if module.beta is not None:
        module.beta.assign(rng.normal(0.0, 0.5 * spread, shape))


def _folded_and_plain(layer, x, training=False):
  bn_folding.enable(layer, False)
  plain = layer(x, training=training)
  assert bn_folding.enable(layer) >= 1
  folded = layer(x, training=training)
  bn_folding.enable(layer, False)
  return folded.numpy(), plain.numpy()


_LAYERS = {
    'conv_strided_relu': (
        lambda: convolutions.Conv2DSame(6, 3, 'c', strides=2, use_bias=False,
                                        use_bn=True, activation='relu'),
        [2, 9, 7, 4]),
    'conv_dilated_linear': (
        lambda: convolutions.Conv2DSame(5, 3, 'c', atrous_rate=2,
                                        use_bias=False, use_bn=True),
        [1, 8, 8, 3]),
    'depthwise_strided_gelu': (
        lambda: convolutions.DepthwiseConv2DSame(3, 'd', strides=2,
                                                 use_bias=False, use_bn=True,
                                                 activation='gelu'),
        [2, 9, 9, 4]),
    'conv1d': (
        lambda: convolutions.Conv1D(7, 'p', use_bias=False, use_bn=True,
                                    activation='relu'),
        [2, 11, 5]),
}


@pytest.mark.parametrize('name', sorted(_LAYERS))
def test_folded_layer_matches_conv_then_batch_norm(name):
  make, shape = _LAYERS[name]
  layer = make()
  x = tf.random.stateless_normal(shape, seed=[1, 2])
  layer(x)
  _randomise_batch_norms(layer)
  folded, plain = _folded_and_plain(layer, x)
  assert np.abs(plain).max() > 0.1
  np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5)


def test_training_calls_never_fold():
  layer = convolutions.Conv2DSame(4, 3, 'c', use_bias=False, use_bn=True)
  x = tf.random.stateless_normal([2, 6, 6, 3], seed=[3, 4])
  layer(x)
  _randomise_batch_norms(layer)
  bn_folding.enable(layer)
  with tf.GradientTape() as tape:
    out = layer(x, training=True)
  # Batch statistics: the output of each channel has mean ~0, std ~gamma.
  gamma = layer._batch_norm.gamma.numpy()
  np.testing.assert_allclose(out.numpy().std(axis=(0, 1, 2)), gamma,
                             rtol=1e-2)
  grads = tape.gradient(out, layer.trainable_variables)
  assert all(g is not None for g in grads)


def test_enable_counts_and_unbuilt_norm_is_an_error():
  layer = convolutions.Conv2DSame(4, 3, 'c', use_bias=False, use_bn=True)
  assert bn_folding.enable(layer) == 1
  assert bn_folding.enabled_count(layer) == 1
  with pytest.raises(ValueError, match='build the model before folding'):
    bn_folding.affine(layer._batch_norm)
  assert bn_folding.enable(layer, False) == 1
  assert bn_folding.enabled_count(layer) == 0


def test_renormalised_batch_norm_is_rejected():
  norm = tf_keras.layers.BatchNormalization(renorm=True, name='bn_renorm')
  norm(tf.zeros([1, 3]))
  with pytest.raises(ValueError, match='bn_renorm: batch renorm'):
    bn_folding.affine(norm)


def _arrays(outputs, prefix=''):
  return {prefix + k: v.numpy() for k, v in outputs.items()
          if isinstance(v, tf.Tensor)}


def _nudged(tensors, seed, size=1e-6):
  """Every tensor moved by `size` (relative): what float rounding alone can
  do to a stage's input."""
  return {k: v * (1.0 + size * tf.sign(tf.random.stateless_normal(
      tf.shape(v), seed=[seed, i]))) for i, (k, v) in enumerate(
          tensors.items())}


def _assert_within_rounding(folded, plain, nudged):
  """Each output moves under folding by less than 10x what the nudged
  input moves it (plus float noise)."""
  for key, a in plain.items():
    scale = np.abs(a).max()
    error = np.abs(folded[key] - a).max() / scale
    rounding = np.abs(nudged[key] - a).max() / scale
    assert error < 10 * rounding + 1e-5, (key, error, rounding)


def test_folded_model_matches_the_plain_model():
  # COCO R50: batch norms after Conv2DSame / Conv1D in the encoder, the
  # pixel decoder, the k-means blocks and the heads. Each stage is compared
  # on the same input: past the encoder, the axial attention and the
  # k-means argmax of a randomly initialised model amplify a float-rounding
  # change of their input ~1000x, so there folding is held to what such a
  # change does.
  config = config_lib.load_config(
      os.path.join(_REPO, 'configs', 'coco', 'kmax_meta_r50.textproto'))
  # Fixed weights: whether rounding flips a k-means argmax of a random
  # model is a matter of its draw, so the comparison must not redraw.
  tf_keras.utils.set_random_seed(0)
  model = model_lib.build_model(config, crop_size=(65, 65))
  _randomise_batch_norms(model, spread=0.2)
  image = tf.random.stateless_uniform([1, 65, 65, 3], seed=[5, 6],
                                      maxval=255.0)
  pixels = image / 127.5 - 1.0

  def encode():
    return model.pixel_encoder(pixels, training=False)

  def decode(endpoints):
    return model.pixel_decoder(endpoints, training=False)

  def predict(features):
    return model.predictor(model.transformer_decoder(features,
                                                     training=False),
                           training=False)

  endpoints = encode()
  features = {**endpoints, **decode(endpoints)}
  plain = {'encoder': _arrays(endpoints),
           'decoder': _arrays(decode(endpoints)),
           'head': _arrays(predict(features))}
  nudged = {'decoder': _arrays(decode(_nudged(endpoints, 1))),
            # The k-means decoder folds ~80 layers, each rounding once:
            # its yardstick is a ten times larger nudge.
            'head': _arrays(predict(_nudged(features, 2, size=1e-5)))}
  assert bn_folding.enable(model) > 100
  folded = {'encoder': _arrays(encode()),
            'decoder': _arrays(decode(endpoints)),
            'head': _arrays(predict(features))}

  assert len(plain['encoder']) >= 4
  for key, a in plain['encoder'].items():  # Conv-BN stacks: well conditioned.
    np.testing.assert_allclose(folded['encoder'][key], a, rtol=0,
                               atol=1e-5 * np.abs(a).max(), err_msg=key)
  assert keys.PIXEL_SPACE_MASK_LOGITS in plain['head']
  for stage in ('decoder', 'head'):
    _assert_within_rounding(folded[stage], plain[stage], nudged[stage])
  # Folding changed which ops run, not the variables.
  bn_folding.enable(model, False)
  np.testing.assert_array_equal(_arrays(predict(features))[
      keys.PIXEL_SPACE_MASK_LOGITS], plain['head'][
          keys.PIXEL_SPACE_MASK_LOGITS])


_REMAPPER_PROBE = r'''
import tensorflow as tf
from deeplab_kmax import config as config_lib
from deeplab_kmax import model as model_lib
from deeplab_kmax.layers import bn_folding
config = config_lib.load_config('configs/coco/kmax_meta_r50.textproto')
model = model_lib.build_model(config, crop_size=(65, 65))
image = tf.zeros([1, 65, 65, 3])
for folded in (False, True):
  bn_folding.enable(model, folded)
  outputs = tf.function(lambda x: model(x, training=False))(image)
  print('traced', folded, sorted(outputs)[0])
'''


def test_inference_graphs_keep_grappler_fusions():
  # A conv + bias (folded) or fused batch norm (default) + residual Add +
  # Relu whose sum also feeds a stage endpoint can make grappler's remapper
  # give up on the whole graph (logged, not raised), which would leave every
  # convolution unfused.
  result = subprocess.run([sys.executable, '-c', _REMAPPER_PROBE],
                          capture_output=True, text=True, cwd=_REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='1',
                                   PYTHONPATH=_REPO),
                          check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'traced True' in result.stdout
  assert 'remapper failed' not in result.stderr, result.stderr[-3000:]

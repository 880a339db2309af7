"""Tests for the ConvNeXt pixel encoder.

There is no DeepLab2 ConvNeXt forward golden, so numerics are checked against
an independent numpy ConvNeXt that reads its weights by checkpoint key from
the reference fill rule: it checks the arithmetic of each piece and that every
checkpoint key plays the role DeepLab2 gives it.
"""

import time

import numpy as np
import pytest
from scipy import special
import tensorflow as tf

from deeplab_kmax.pixel_encoder import convnext
from deeplab_kmax.testing import reference

_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'


def _encoder_manifest(reference_dir, size):
  path = (reference_dir / 'manifests' /
          f'coco_kmax_meta_convnext_{size}_os32.tsv')
  return {k: v for k, v in reference.read_manifest(path).items()
          if k.startswith('encoder/')}


# ---------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------


def _np_layer_norm(x, gamma, beta, eps=1e-6):
  x = x.astype(np.float64)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _np_depthwise_same(x, kernel, bias):
  """x [B, H, W, C]; kernel [k, k, 1, C] (grouped-conv layout)."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape, np.float64)
  for dy in range(k):
    for dx in range(k):
      out += xp[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx, 0, :]
  return out + bias


def _np_patch_conv(x, kernel, bias, before, after):
  """Zero-pad, then a kxk stride-k 'valid' conv (non-overlapping patches)."""
  k = kernel.shape[0]
  x = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
  b, h, w, c = x.shape
  h, w = h // k, w // k
  patches = x[:, :h * k, :w * k, :].reshape(b, h, k, w, k, c)
  return np.einsum('bhywxc,yxco->bhwo', patches, kernel) + bias


def _np_block(x, w):
  """One ConvNeXt block from a {name: array} dict of its checkpoint leaves."""
  y = _np_depthwise_same(x, w['depthwise_conv/kernel'],
                         w['depthwise_conv/bias'])
  y = _np_layer_norm(y, w['norm/gamma'], w['norm/beta'])
  y = _np_gelu(y @ w['pointwise_conv1/kernel'] + w['pointwise_conv1/bias'])
  y = y @ w['pointwise_conv2/kernel'] + w['pointwise_conv2/bias']
  return x + w['layer_scale'] * y


def _np_convnext(images, weights, depths):
  """Endpoints stage1..stage5 of ConvNeXt, weights keyed by checkpoint path."""

  def leaves(prefix):
    return {k[len(prefix):]: v for k, v in weights.items()
            if k.startswith(prefix)}

  x = images.astype(np.float64)
  endpoints = {}
  for i in range(4):
    down = leaves(f'encoder/downsample_layers/{i}/')
    if i == 0:
      x = _np_patch_conv(x, down['layer_with_weights-0/kernel'],
                         down['layer_with_weights-0/bias'], 1, 2)
      x = _np_layer_norm(x, down['layer_with_weights-1/gamma'],
                         down['layer_with_weights-1/beta'])
      endpoints['stage1'] = x
    else:
      # The zero padding comes before the LayerNorm, so padded cells enter
      # the conv as LN(0) = beta, not as zeros.
      x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = _np_layer_norm(x, down['layer_with_weights-0/gamma'],
                         down['layer_with_weights-0/beta'])
      x = _np_patch_conv(x, down['layer_with_weights-1/kernel'],
                         down['layer_with_weights-1/bias'], 0, 0)
    for j in range(depths[i]):
      x = _np_block(x, leaves(f'encoder/stages/{i}/layer_with_weights-{j}/'))
    endpoints[f'stage{i + 2}'] = x
  return endpoints


def _reference_weights(manifest):
  return {k[:-len(_SUFFIX)]: reference.fill_value(k, shape)
          for k, shape in manifest.items()}


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def filled_tiny(reference_dir):
  """ConvNeXt-tiny with the reference weight fill, and its manifest."""
  encoder = convnext.build_convnext('tiny')
  reference.fill_with_reference_rule({'encoder': encoder})
  return encoder, _encoder_manifest(reference_dir, 'tiny')


# ---------------------------------------------------------------------------
# checkpoint compatibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('size', ['tiny', 'small', 'base', 'large'])
def test_checkpoint_keys_and_shapes_match_deeplab2(reference_dir, size):
  start = time.perf_counter()
  encoder = convnext.build_convnext(size, drop_path_keep_prob=0.5)
  built = time.perf_counter() - start
  expected = _encoder_manifest(reference_dir, size)
  assert expected, 'manifest has no encoder/ entries'
  assert reference.checkpoint_shapes({'encoder': encoder}) == expected
  # Every variable is a checkpoint entry (no hidden state).
  assert len(encoder.variables) == len(expected)
  print(f'build convnext_{size}: {built:.1f}s')


def test_checkpoint_restores_into_fresh_encoder(filled_tiny, tmp_path):
  encoder, _ = filled_tiny
  path = tf.train.Checkpoint(encoder=encoder).write(str(tmp_path / 'ckpt'))
  fresh = convnext.build_convnext('tiny')
  status = tf.train.Checkpoint(encoder=fresh).read(path)
  status.assert_consumed()
  # Restoring copies bytes: exact.
  for restored, saved in zip(fresh.variables, encoder.variables):
    np.testing.assert_array_equal(restored.numpy(), saved.numpy(),
                                  err_msg=saved.name)
  images = reference.reference_input(3, 33, 33) / 127.5 - 1.0
  expected = encoder(images)['stage5'].numpy()
  # Same weights, same input: equal up to float32 rounding of the kernels
  # (bit-identity across two layer instances is not promised).
  np.testing.assert_allclose(fresh(images)['stage5'], expected, rtol=0,
                             atol=1e-6 * np.abs(expected).max())


# ---------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------


def test_block_matches_numpy_reference():
  rng = np.random.default_rng(0)
  width = 8
  block = convnext.ConvNeXtBlock(width, name='block')
  x = rng.standard_normal((2, 9, 11, width)).astype(np.float32)
  block(x)
  weights = {
      'depthwise_conv/kernel': rng.standard_normal((7, 7, 1, width)) / 7,
      'depthwise_conv/bias': rng.standard_normal(width),
      'norm/gamma': rng.uniform(0.5, 1.5, width),
      'norm/beta': rng.standard_normal(width),
      'pointwise_conv1/kernel': rng.standard_normal((width, 4 * width)),
      'pointwise_conv1/bias': rng.standard_normal(4 * width),
      'pointwise_conv2/kernel': rng.standard_normal((4 * width, width)),
      'pointwise_conv2/bias': rng.standard_normal(width),
      'layer_scale': rng.standard_normal((1, 1, 1, width)),
  }
  weights = {k: v.astype(np.float32) for k, v in weights.items()}
  by_name = {v.name.split('/', 1)[1].split(':')[0]: v for v in block.variables}
  assert set(by_name) == set(weights)
  for name, value in weights.items():
    by_name[name].assign(value)

  expected = _np_block(x, weights)
  got = block(x, training=False).numpy()
  np.testing.assert_allclose(got, expected, rtol=0,
                             atol=1e-5 * np.abs(expected).max())
  # The residual matters: with a zero layer scale the block is the identity.
  # x + 0 * (finite y) is exact in IEEE arithmetic on any CPU: exact.
  block.layer_scale.assign(tf.zeros_like(block.layer_scale))
  np.testing.assert_array_equal(block(x).numpy(), x)


@pytest.mark.parametrize('height,width', [(129, 129), (129, 257)])
def test_encoder_matches_numpy_reference_at_odd_sizes(filled_tiny, height,
                                                      width):
  encoder, manifest = filled_tiny
  images = reference.reference_input(0, height, width) / 127.5 - 1.0
  got = encoder(images, training=False)
  expected = _np_convnext(images, _reference_weights(manifest),
                          convnext.CONVNEXT_SIZES['tiny'].depths)
  for name, value in expected.items():
    scale = np.abs(value).max()
    assert scale > 1.0, name  # the fill gives non-trivial activations
    np.testing.assert_allclose(got[name].numpy(), value, rtol=0,
                               atol=2e-5 * scale, err_msg=name)
    np.testing.assert_allclose(
        got[name.replace('stage', 'res')].numpy(), _np_gelu(value), rtol=0,
        atol=2e-5 * scale, err_msg=name)


# ---------------------------------------------------------------------------
# shapes, dynamic sizes, training behaviour
# ---------------------------------------------------------------------------


def _expected_sizes(n):
  sizes = [(n - 1) // 4 + 1]
  for _ in range(3):
    sizes.append((sizes[-1] + 1) // 2)
  return sizes


def test_endpoint_shapes_with_dynamic_spatial_size(filled_tiny):
  encoder, _ = filled_tiny
  widths = convnext.CONVNEXT_SIZES['tiny'].widths
  run = tf.function(
      lambda x: encoder(x, training=False),
      input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  assert _expected_sizes(129) == [33, 17, 9, 5]
  for height, width in [(129, 129), (129, 257), (128, 96), (65, 33)]:
    images = reference.reference_input(1, height, width) / 127.5 - 1.0
    images = np.concatenate([images, images[:, ::-1]], 0)
    out = run(images)
    hs, ws = _expected_sizes(height), _expected_sizes(width)
    strides = {'stage1': 0, 'stage2': 0, 'stage3': 1, 'stage4': 2,
               'stage5': 3}
    assert set(out) == set(strides) | {f'res{k}' for k in range(1, 6)}
    for name, level in strides.items():
      channels = widths[level]
      assert out[name].shape == (2, hs[level], ws[level], channels), name
      assert encoder.endpoint_channels[name] == channels
    # Graph and eager agree under dynamic shapes.
    np.testing.assert_allclose(out['stage5'],
                               encoder(images, training=False)['stage5'],
                               rtol=0, atol=1e-5)


def test_drop_path_only_with_training():
  encoder = convnext.build_convnext('tiny', drop_path_keep_prob=0.2)
  reference.fill_with_reference_rule({'encoder': encoder})
  probs = [b.drop_path.keep_prob for s in encoder.stages for b in s.layers]
  np.testing.assert_allclose(probs, np.linspace(1.0, 0.2, 18), atol=1e-6)
  image = reference.reference_input(2, 33, 33) / 127.5 - 1.0
  batch = np.repeat(image, 8, axis=0)

  inference = encoder(batch, training=False)['stage5'].numpy()
  # Copies of one image need not be bit-identical across batch positions:
  # kernels may split a batch into differently vectorised chunks (AVX2 vs
  # AVX-512 gives up to ~1.1e-6 of absmax after 18 blocks). 5e-6 of absmax is
  # float32 rounding; a dropped residual branch moves outputs by ~3 x absmax.
  atol = 5e-6 * np.abs(inference).max()
  np.testing.assert_allclose(inference, np.repeat(inference[:1], 8, 0),
                             rtol=0, atol=atol)
  # Calling without `training` means inference.
  np.testing.assert_allclose(encoder(batch)['stage5'].numpy(), inference,
                             rtol=0, atol=atol)

  tf.random.set_seed(0)
  trained = encoder(batch, training=True)['stage5'].numpy()
  # Independent per-sample drops: samples of one image now differ by far
  # more than rounding.
  spread = np.abs(trained - trained[:1]).reshape(8, -1).max(1)
  assert (spread > 1e3 * atol).any(), spread
  assert not np.allclose(trained, inference)


def test_gradients_reach_every_variable(filled_tiny):
  encoder, _ = filled_tiny
  images = tf.constant(reference.reference_input(4, 33, 33) / 127.5 - 1.0)
  with tf.GradientTape() as tape:
    out = encoder(images, training=True)
    loss = tf.reduce_mean(out['stage5']**2)
  grads = tape.gradient(loss, encoder.trainable_variables)
  assert len(grads) == len(encoder.variables)
  for var, grad in zip(encoder.trainable_variables, grads):
    assert grad is not None, var.name
    assert np.all(np.isfinite(grad)), var.name
    assert np.any(grad.numpy() != 0), var.name


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_rejects_unknown_size_and_bad_inputs(filled_tiny):
  with pytest.raises(ValueError, match='tiny'):
    convnext.build_convnext('huge')
  with pytest.raises(ValueError, match='drop_path_keep_prob'):
    convnext.block_keep_probs(0.0, 18)
  with pytest.raises(ValueError, match='layer_scale_init'):
    convnext.ConvNeXtBlock(8, layer_scale_init=0.0)
  encoder, _ = filled_tiny
  with pytest.raises(ValueError, match='height, width'):
    encoder(tf.zeros([33, 33, 3]))


def test_config_round_trip():
  encoder = convnext.ConvNeXtEncoder(convnext.CONVNEXT_SIZES['small'], 0.6,
                                     name='enc')
  config = encoder.get_config()
  again = convnext.ConvNeXtEncoder.from_config(config)
  assert again.get_config() == config
  assert again.size == convnext.CONVNEXT_SIZES['small']
  block = convnext.ConvNeXtBlock(16, drop_path_keep_prob=0.9, name='b')
  assert (convnext.ConvNeXtBlock.from_config(block.get_config()).get_config()
          == block.get_config())

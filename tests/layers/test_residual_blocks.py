"""Tests for the bottleneck / axial residual blocks and block groups."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import block_group
from deeplab_kmax.layers import residual_blocks


def _var_names(layer):
  return sorted(v.name.split('/', 1)[1] for v in layer.variables)


@pytest.mark.parametrize('block_cls', [residual_blocks.BottleneckBlock,
                                       residual_blocks.AxialBlock])
def test_fresh_block_is_identity_on_its_shortcut(block_cls):
  # conv3's batch norm starts with gamma = 0, so only the shortcut remains.
  block = block_cls([16, 8, 32], name='block1', activation='relu')
  x = tf.random.stateless_normal([2, 5, 6, 32], seed=[0, 0])
  np.testing.assert_allclose(block(x, training=False).numpy(),
                             tf.nn.relu(x).numpy(), atol=1e-6)
  assert block._shortcut is None


def test_shortcut_projection_only_when_channels_change():
  block = residual_blocks.BottleneckBlock([8, 8, 32], name='block1',
                                          strides=2)
  out = block(tf.zeros([1, 9, 8, 16]))
  assert out.shape == (1, 5, 4, 32)
  assert block._shortcut is not None
  prefixes = {name.split('/')[0] for name in _var_names(block)}
  assert prefixes == {'conv1_bn_act', 'conv2_bn_act', 'conv3_bn', 'shortcut'}
  same_width = residual_blocks.BottleneckBlock([8, 8, 32], name='block2',
                                               strides=2)
  assert same_width(tf.zeros([1, 9, 8, 32])).shape == (1, 5, 4, 32)
  assert same_width._shortcut is None


def test_axial_block_stride_and_widths():
  block = residual_blocks.AxialBlock([32, 16, 64], name='block1', strides=2,
                                     activation='gelu')
  out = block(tf.zeros([2, 9, 6, 24]))
  assert out.shape == (2, 5, 3, 64)
  kernel = block._attention._height_axis.qkv_kernel
  assert kernel.shape == (32, 16 * 2 + 32)  # keys 16+16, values 2 * 16


def test_drop_path_is_off_at_inference_and_drops_in_training():
  block = residual_blocks.BottleneckBlock([4, 4, 8], name='block1',
                                          drop_path_keep_prob=0.5)
  x = tf.random.stateless_normal([64, 3, 3, 8], seed=[1, 2])
  block(x)
  # Make the residual branch non-zero so dropping it is visible.
  block._conv3_bn._batch_norm.gamma.assign(tf.ones([8]))
  shortcut = tf.nn.relu(x)
  first = block(x, training=False)
  # Inference is deterministic: a second call agrees to float32 rounding
  # (1e-6 of absmax; a dropped branch would move samples by O(absmax)).
  np.testing.assert_allclose(block(x, training=False), first, rtol=0,
                             atol=1e-6 * np.abs(first.numpy()).max())
  residual = (first - shortcut).numpy()
  assert np.abs(residual).reshape(64, -1).max(1).min() > 0

  tf.random.set_seed(0)
  trained = block(x, training=True) - shortcut
  per_sample = np.abs(trained.numpy()).reshape(64, -1).max(1)
  # A dropped branch adds an exact zero, so relu(x + 0) == relu(x): exact.
  dropped = per_sample == 0
  assert 10 < dropped.sum() < 54  # about half of 64 samples


def test_training_step_gives_gradients():
  block = residual_blocks.AxialBlock([8, 4, 16], name='block1',
                                     num_heads=2, drop_path_keep_prob=0.8)
  x = tf.random.stateless_normal([4, 5, 5, 8], seed=[3, 4])
  block(x)
  block._conv3_bn._batch_norm.gamma.assign(tf.ones([16]))
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.square(block(x, training=True)))
  grads = tape.gradient(loss, block.trainable_variables)
  assert all(g is not None for g in grads)
  assert all(np.isfinite(tf.convert_to_tensor(g).numpy()).all()
             for g in grads)


def test_rejects_wrong_filters_list():
  with pytest.raises(ValueError, match='three channel counts'):
    residual_blocks.BottleneckBlock([8, 8], name='block1')


def _describe(group):
  rows = []
  for block in group.blocks():
    kind = 'axial' if isinstance(block, residual_blocks.AxialBlock) else 'conv'
    rate = (block._conv2_bn_act._conv.dilation_rate[0] if kind == 'conv'
            else None)
    rows.append((kind, block._strides, rate, block._drop_path.keep_prob))
  return rows


def test_block_group_axial_stage_layout():
  # Axial-ResNet stage 4: input at original stride 8, axial from stride 16.
  group = block_group.BlockGroup(
      filters=256, num_blocks=3, name='stage4', resnet_stride=2,
      resnet_input_stride=8, output_stride=32, use_axial_beyond_stride=16,
      drop_path_keep_prob=0.8, drop_path_schedule='linear')
  assert _describe(group) == [('conv', 2, 1, 1.0),
                              ('axial', 1, None, pytest.approx(0.85)),
                              ('axial', 1, None, pytest.approx(0.85))]


def test_block_group_atrous_when_output_stride_is_reached():
  group = block_group.BlockGroup(
      filters=8, num_blocks=3, name='stage5', resnet_stride=2,
      resnet_input_stride=16, output_stride=16,
      drop_path_keep_prob=0.5, drop_path_schedule='constant')
  assert _describe(group) == [('conv', 1, 1, 0.5), ('conv', 1, 2, 0.5),
                              ('conv', 1, 2, 0.5)]
  assert group(tf.zeros([1, 5, 5, 16])).shape == (1, 5, 5, 32)


def test_block_group_rejects_bad_strides():
  with pytest.raises(ValueError, match='power of two'):
    block_group.BlockGroup(8, 1, 'g', resnet_stride=2, resnet_input_stride=6)

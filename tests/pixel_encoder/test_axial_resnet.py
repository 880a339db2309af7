"""ResNet-50 / Axial-ResNet-50 encoders against the DeepLab2 contract."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import residual_blocks
from deeplab_kmax.pixel_encoder import axial_resnet
from deeplab_kmax.testing import reference

CROP = 129
STRIDES = {1: 2, 2: 4, 3: 8, 4: 16, 5: 32}
R50_WIDTHS = {1: 64, 2: 256, 3: 512, 4: 1024, 5: 2048}
# The pixel path is deterministic up to float summation order; compare with
# an absolute tolerance scaled by each tensor's magnitude.
RELATIVE_TOLERANCE = 1e-5


def encoder_manifest(reference_dir, name):
  entries = reference.read_manifest(reference_dir / 'manifests' / name)
  return {k: v for k, v in entries.items() if k.startswith('encoder/')}


def normalised(images):
  return images / 127.5 - 1.0


@pytest.fixture(scope='module')
def resnet50(reference_dir):
  encoder = axial_resnet.build_axial_resnet('kmax_resnet50')
  encoder(tf.zeros([1, CROP, CROP, 3]))
  reference.fill_with_reference_rule({'encoder': encoder})
  return encoder


@pytest.fixture(scope='module')
def axial_resnet50(reference_dir):
  encoder = axial_resnet.build_axial_resnet('axial_resnet50',
                                            drop_path_keep_prob=0.8)
  encoder(tf.zeros([1, CROP, CROP, 3]))
  reference.fill_with_reference_rule({'encoder': encoder})
  return encoder


def test_resnet50_checkpoint_keys_match_manifest(resnet50, reference_dir):
  assert reference.checkpoint_shapes({'encoder': resnet50}) == (
      encoder_manifest(reference_dir, 'coco_kmax_meta_r50_os32.tsv'))


def test_resnet50_matches_golden_endpoints(resnet50, reference_dir):
  golden = np.load(reference_dir / 'golden' /
                   'coco_kmax_r50_crop129_endpoints.npz')
  outputs = resnet50(normalised(reference.reference_input()), training=False)
  for k in range(1, 6):
    want = golden[f'encoder/stage{k}']
    got = outputs[f'stage{k}'].numpy()
    assert got.shape == want.shape == (
        1, (CROP - 1) // STRIDES[k] + 1, (CROP - 1) // STRIDES[k] + 1,
        R50_WIDTHS[k])
    atol = RELATIVE_TOLERANCE * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=atol,
                               err_msg=f'stage{k}')
    np.testing.assert_array_equal(outputs[f'res{k}'].numpy(),
                                  tf.nn.relu(got).numpy())
  np.testing.assert_array_equal(outputs['backbone_output'], outputs['res5'])


def test_resnet50_output_stride_16_uses_atrous_last_stage(resnet50):
  encoder = axial_resnet.build_axial_resnet('resnet50', output_stride=16)
  x = tf.random.stateless_uniform([1, 65, 65, 3], [0, 1], -1, 1)
  outputs = encoder(x, training=False)
  assert outputs['stage4'].shape == outputs['stage5'].shape[:3] + (1024,)
  assert outputs['stage5'].shape == (1, 5, 5, 2048)
  for ours, theirs in zip(encoder.variables, resnet50.variables):
    assert ours.shape == theirs.shape
  dilations = [b._conv2_bn_act._conv.dilation_rate for b in
               encoder._stage5.blocks()]
  assert dilations == [(1, 1), (2, 2), (2, 2)]


def test_axial_resnet50_checkpoint_keys_match_manifest(axial_resnet50,
                                                       reference_dir):
  assert reference.checkpoint_shapes({'encoder': axial_resnet50}) == (
      encoder_manifest(reference_dir, 'coco_kmax_meta_axial_r50_os32.tsv'))


def test_axial_resnet50_layout_and_drop_path_schedule(axial_resnet50):
  def layout(stage):
    return [(type(b).__name__, round(b._drop_path.keep_prob, 4))
            for b in getattr(axial_resnet50, f'_stage{stage}').blocks()]
  conv, axial = 'BottleneckBlock', 'AxialBlock'
  assert layout(3) == [(conv, 1.0)] * 4
  assert layout(4) == [(conv, 1.0)] + [(axial, 0.85)] * 5
  assert layout(5) == [(axial, 0.85), (axial, 0.8), (axial, 0.8)]
  first = axial_resnet50._stage5.blocks()[0]
  assert isinstance(first, residual_blocks.AxialBlock)
  assert first._attention._strides == 2


@pytest.mark.parametrize('height,width', [(CROP, CROP), (CROP, 257)])
def test_axial_resnet50_runs_at_square_and_wide_crops(axial_resnet50, height,
                                                      width):
  images = reference.reference_input(seed=1, height=height, width=width)
  outputs = axial_resnet50(normalised(images), training=False)
  widths = {1: 128, 2: 256, 3: 512, 4: 1024, 5: 2048}
  for k in range(1, 6):
    stage = outputs[f'stage{k}'].numpy()
    assert stage.shape == (1, (height - 1) // STRIDES[k] + 1,
                           (width - 1) // STRIDES[k] + 1, widths[k])
    assert np.isfinite(stage).all()
    assert stage.std() > 0
    np.testing.assert_allclose(
        outputs[f'res{k}'].numpy(),
        tf.nn.gelu(stage, approximate=False).numpy(), atol=1e-6)


def test_axial_resnet50_dynamic_spatial_size_in_tf_function(axial_resnet50):
  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3])])
  def encode(images):
    return axial_resnet50(images, training=False)

  spec = encode.get_concrete_function().structured_outputs['stage5']
  assert spec.shape.as_list() == [None, None, None, 2048]
  images = tf.random.stateless_uniform([2, 65, 97, 3], [2, 3], -1, 1)
  graph = encode(images)
  eager = axial_resnet50(images, training=False)
  assert graph['stage5'].shape == (2, 3, 4, 2048)
  for k in range(1, 6):
    np.testing.assert_allclose(graph[f'stage{k}'].numpy(),
                               eager[f'stage{k}'].numpy(), rtol=1e-5,
                               atol=1e-4)


def test_rejects_unknown_names_and_bad_inputs(resnet50):
  with pytest.raises(ValueError, match='axial_resnet50'):
    axial_resnet.build_axial_resnet('resnet101')
  with pytest.raises(ValueError, match='output_stride'):
    axial_resnet.build_axial_resnet('resnet50', output_stride=4)
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    resnet50(tf.zeros([1, 33, 33, 4]))

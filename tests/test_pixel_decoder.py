"""kMaX pixel decoder against the DeepLab2 contract."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import pixel_decoder
from deeplab_kmax.testing import reference

DECODER_KEYS = ('decoder_stage1', 'decoder_stage2', 'decoder_stage3',
                'decoder_output')
RELATIVE_TOLERANCE = 1e-5


def decoder_manifest(reference_dir, name):
  entries = reference.read_manifest(reference_dir / 'manifests' / name)
  return {k: v for k, v in entries.items() if k.startswith('pixel_decoder/')}


@pytest.fixture(scope='module')
def golden(reference_dir):
  return np.load(reference_dir / 'golden' /
                 'coco_kmax_r50_crop129_endpoints.npz')


@pytest.fixture(scope='module')
def golden_endpoints(golden):
  return {f'stage{k}': tf.constant(golden[f'encoder/stage{k}'])
          for k in range(1, 6)}


@pytest.fixture(scope='module')
def coco_decoder(golden_endpoints):
  decoder = pixel_decoder.KMaXPixelDecoder(high_resolution_output_stride=4)
  decoder(golden_endpoints)
  reference.fill_with_reference_rule({'pixel_decoder': decoder})
  return decoder


def test_coco_checkpoint_keys_match_manifest(coco_decoder, reference_dir):
  assert reference.checkpoint_shapes({'pixel_decoder': coco_decoder}) == (
      decoder_manifest(reference_dir, 'coco_kmax_meta_r50_os32.tsv'))


def test_coco_matches_golden_with_teacher_forcing(coco_decoder,
                                                  golden_endpoints, golden):
  outputs = coco_decoder(golden_endpoints, training=False)
  for key in DECODER_KEYS:
    want = golden[f'pixel_decoder/{key}']
    got = outputs[key].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(
        got, want, rtol=0, atol=RELATIVE_TOLERANCE * np.abs(want).max(),
        err_msg=key)
  # Encoder endpoints pass through for later heads.
  assert outputs['stage3'] is golden_endpoints['stage3']


def test_coco_output_strides_and_widths(coco_decoder, golden_endpoints):
  outputs = coco_decoder(golden_endpoints, training=False)
  expected = {'decoder_stage1': (5, 2048), 'decoder_stage2': (9, 1024),
              'decoder_stage3': (17, 512), 'decoder_output': (33, 256)}
  for key, (size, width) in expected.items():
    assert outputs[key].shape == (1, size, size, width)
  assert coco_decoder.endpoint_names == ('stage5', 'stage4', 'stage3',
                                         'stage2')


def test_cityscapes_adds_a_stride_2_stage(reference_dir, golden_endpoints):
  decoder = pixel_decoder.KMaXPixelDecoder(high_resolution_output_stride=2)
  outputs = decoder(golden_endpoints, training=False)
  assert outputs['decoder_stage4'].shape == (1, 33, 33, 256)
  assert outputs['decoder_output'].shape == (1, 65, 65, 128)
  assert reference.checkpoint_shapes({'pixel_decoder': decoder}) == (
      decoder_manifest(reference_dir, 'cityscapes_kmax_meta_r50_os32.tsv'))


def test_builds_from_any_encoder_widths_and_dynamic_sizes():
  # ConvNeXt-like widths and a non-square crop, sizes unknown at trace time.
  decoder = pixel_decoder.KMaXPixelDecoder(high_resolution_output_stride=4)
  widths = {2: 96, 3: 192, 4: 384, 5: 768}
  sizes = {2: (17, 33), 3: (9, 17), 4: (5, 9), 5: (3, 5)}
  endpoints = {f'stage{k}': tf.random.stateless_normal(
      (2,) + sizes[k] + (widths[k],), seed=[k, 0]) for k in widths}
  eager = decoder(endpoints, training=False)
  assert eager['decoder_output'].shape == (2, 17, 33, 256)
  assert decoder._skip_connections[2]._resized_conv_bn2._conv.kernel.shape == (
      1, 1, 96, 64)

  signature = {k: tf.TensorSpec([None, None, None, widths[int(k[-1])]])
               for k in endpoints}

  @tf.function(input_signature=[signature])
  def decode(features):
    return decoder(features, training=False)

  graph = decode(endpoints)
  for key in DECODER_KEYS:
    np.testing.assert_allclose(graph[key].numpy(), eager[key].numpy(),
                               rtol=1e-5, atol=1e-4)


def test_missing_endpoint_and_bad_stride_raise():
  decoder = pixel_decoder.KMaXPixelDecoder()
  with pytest.raises(ValueError, match='stage2'):
    decoder({f'stage{k}': tf.zeros([1, 2, 2, 8]) for k in (3, 4, 5)})
  with pytest.raises(ValueError, match='high_resolution_output_stride'):
    pixel_decoder.KMaXPixelDecoder(high_resolution_output_stride=8)

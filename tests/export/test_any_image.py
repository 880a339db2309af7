"""Any image of at least 1 x 1 gets a full-size answer, and one file gets one
answer whether it goes through the predict CLI or serving_encoded."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax import model as model_lib
from deeplab_kmax import predict
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.data import preprocessing
from deeplab_kmax.export import serving
from tests.export import helpers

DEMO_CONFIG = helpers.REPO / 'configs' / 'demo' / 'kmax_demo.textproto'
# Aspect ratios far beyond the demo crop (129 x 129), and the smallest image.
ODD_SHAPES = [(10, 2000), (2000, 10), (1, 5000), (3, 700), (1, 1), (1, 2)]


def _demo_preprocessing() -> serving.EvalPreprocessing:
  config = config_lib.load_config(DEMO_CONFIG)
  return serving.EvalPreprocessing.from_dataset_options(
      config.eval_dataset_options)


# ---------------------------------------------------------------------------
# Elongated images (resize rule).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('shape', ODD_SHAPES)
def test_elongated_images_resize_to_at_least_one_pixel(shape):
  spec = _demo_preprocessing()
  images = tf.zeros((1,) + shape + (3,), tf.uint8)
  padded, size = spec(images)
  size = size.numpy().tolist()
  assert padded.shape == (1, 129, 129, 3)
  assert 1 <= size[0] <= 129 and 1 <= size[1] <= 129, size
  # The long side still fills the crop.
  assert max(size) == 129
  maps = {key: tf.zeros([1, 129, 129], tf.int32)
          for key in serving.NEAREST_OUTPUTS}
  maps[keys.SEMANTIC_PROBS] = tf.zeros([1, 129, 129], tf.float32)
  restored = preprocessing.undo_eval_preprocessing(
      maps, tf.constant(size), tf.constant(shape), serving.BILINEAR_OUTPUTS)
  for key, value in restored.items():
    assert value.shape == (1,) + shape, key


@pytest.mark.parametrize('shape', [(10, 2000), (2000, 10), (1, 5000)])
def test_eval_pipeline_takes_elongated_images(shape):
  """The evaluation input pipeline: resize to range, then pad to the crop."""
  image = tf.fill(shape + (3,), tf.constant(200, tf.uint8))
  label = tf.ones(shape + (1,), tf.int32)
  resized, padded, padded_label = preprocessing.preprocess(
      image, label, crop_size=(129, 129), is_training=False,
      label_pad_value=0, min_resize_value=(129, 129),
      max_resize_value=(129, 129))
  assert min(resized.shape[:2]) >= 1 and max(resized.shape[:2]) == 129
  assert padded.shape == (129, 129, 3)
  height, width = resized.shape[:2]
  np.testing.assert_array_equal(padded_label.numpy()[:height, :width], 1)


def test_ordinary_sizes_are_unchanged_by_the_one_pixel_rule():
  """DeepLab2's sizes for images whose sides do not round down to 0."""
  spec = _demo_preprocessing()
  for shape, expected in (((65, 97), (86, 129)), ((480, 640), (96, 129)),
                          ((129, 129), (129, 129)), ((40, 5160), (1, 129))):
    size = spec.resized_size(tf.constant(shape[0]), tf.constant(shape[1]))
    assert tuple(size.numpy().tolist()) == expected, shape


# ---------------------------------------------------------------------------
# One decoding rule for the CLI and serving_encoded.
# ---------------------------------------------------------------------------


def _encode(picture: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  picture.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _test_files():
  """name -> encoded bytes of the cases where decoders tend to disagree."""
  rng = np.random.default_rng(5)
  rows, cols = np.mgrid[0:37, 0:53]
  rgb = np.stack([rows * 6, cols * 4, (rows + cols) * 3],
                 -1).astype(np.uint8)
  rgb[5:20, 8:30] = (240, 30, 30)
  # Dark: every value <= 255, which the CLI used to keep as 8-bit values.
  dark16 = (rng.integers(0, 200, (37, 53)) + rows).astype(np.uint16)
  bright16 = (rng.integers(0, 65536, (37, 53))).astype(np.uint16)
  rotated = Image.fromarray(rgb)
  exif = rotated.getexif()
  exif[0x0112] = 6  # Displayed rotated by 90 degrees.
  palette = Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE,
                                         colors=16)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 53, 1), np.uint8)],
                        -1)
  return {
      'dark_16bit.png': _encode(Image.fromarray(dark16), 'PNG'),
      'bright_16bit.png': _encode(Image.fromarray(bright16), 'PNG'),
      'exif_rotated.jpg': _encode(rotated, 'JPEG', exif=exif, quality=95),
      'exif_rotated.png': _encode(rotated, 'PNG', exif=exif),
      'palette.png': _encode(palette, 'PNG'),
      'palette_transparent.png': _encode(palette, 'PNG', transparency=3),
      'grayscale.png': _encode(Image.fromarray(rgb[..., 1]), 'PNG'),
      'gray_alpha.png': _encode(
          Image.fromarray(np.stack([rgb[..., 0], rgb[..., 2]], -1), 'LA'),
          'PNG'),
      'rgba.png': _encode(Image.fromarray(rgba), 'PNG'),
      'cmyk.jpg': _encode(Image.fromarray(rgb).convert('CMYK'), 'JPEG',
                          quality=95),
      'grayscale.jpg': _encode(Image.fromarray(rgb[..., 0]), 'JPEG'),
      'animated.gif': _encode(Image.fromarray(rgb).convert('P'), 'GIF',
                              save_all=True, append_images=[
                                  Image.fromarray(255 - rgb).convert('P')]),
      'image.bmp': _encode(Image.fromarray(rgb), 'BMP'),
      'image.webp': _encode(Image.fromarray(rgb), 'WEBP', lossless=True),
  }


@pytest.fixture(scope='module')
def test_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('decoding')
  paths = {}
  for name, data in _test_files().items():
    paths[name] = folder / name
    paths[name].write_bytes(data)
  return paths


@pytest.mark.parametrize('name', sorted(_test_files()))
def test_cli_decodes_like_serving_encoded(test_files, name):
  path = test_files[name]
  expected = serving.decode_image_file(tf.constant(path.read_bytes()))
  np.testing.assert_array_equal(predict.load_image(str(path)),
                                expected.numpy())


def test_16_bit_keeps_the_high_byte_whatever_the_range(tmp_path):
  """Dark and bright 16-bit images follow one rule (value >> 8), also for
  formats read with Pillow (TIFF)."""
  values = np.array([[0, 255, 256, 32895, 32896, 65535]], np.uint16)
  for name in ('deep.png', 'deep.tif'):
    Image.fromarray(values).save(tmp_path / name)
    np.testing.assert_array_equal(
        predict.load_image(str(tmp_path / name))[..., 0],
        [[0, 0, 1, 128, 128, 255]])


def test_exif_orientation_is_not_applied(tmp_path):
  rgb = np.zeros((4, 6, 3), np.uint8)
  rgb[0, 0] = 255
  picture = Image.fromarray(rgb)
  exif = picture.getexif()
  exif[0x0112] = 6
  for name in ('rotated.png', 'rotated.jpg'):
    picture.save(tmp_path / name, exif=exif, quality=100)
    loaded = predict.load_image(str(tmp_path / name))
    assert loaded.shape == rgb.shape, name
    assert loaded[0, 0].min() > 200 and loaded[-1, -1].max() < 50, name


# ---------------------------------------------------------------------------
# End to end through the demo model's serving graph.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def demo_module():
  config = config_lib.load_config(DEMO_CONFIG)
  info = demo_dataset.dataset_info()
  model = model_lib.build_model(config, dataset_info=info,
                                crop_size=(129, 129))
  return serving.build_serving_module(model, config, info=info)


def _numpy(maps):
  return {key: value.numpy() for key, value in maps.items()}


def _assert_same_answer(got, expected, what: str) -> None:
  """Id maps equal; float maps equal to float32 rounding.

  Both sides run the same graph on the same pixels, but through different
  signatures (batch of one vs single image), so a kernel may split the work
  differently on another CPU: scores and probabilities lie in [0, 1], and
  1e-6 is a few float32 ulps there.
  """
  for key in serving.OUTPUT_KEYS:
    if np.issubdtype(expected[key].dtype, np.integer):
      np.testing.assert_array_equal(got[key], expected[key],
                                    err_msg=f'{what} {key}')
    else:
      np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6,
                                 err_msg=f'{what} {key}')


@pytest.mark.slow
def test_serving_answers_any_image_at_full_size(demo_module):
  rng = np.random.default_rng(0)
  for shape in [(10, 2000), (2000, 10), (1, 1), (1, 700)]:
    image = rng.integers(0, 256, shape + (3,), np.uint8)
    maps = _numpy(demo_module.serve_image(tf.constant(image)))
    for key in serving.OUTPUT_KEYS:
      assert maps[key].shape == shape, (shape, key)
    encoded = _numpy(demo_module.serve_encoded(tf.constant(
        _encode(Image.fromarray(image), 'PNG'))))
    _assert_same_answer(encoded, maps, f'{shape}')


@pytest.mark.slow
def test_cli_and_serving_encoded_give_the_same_prediction(demo_module,
                                                          test_files):
  """Compared on every output, the float maps included: with random
  weights the panoptic map may be plain void, the scores never are."""
  predictor = predict.Predictor(
      lambda image: _numpy(demo_module.serve_image(tf.constant(image))),
      demo_dataset.dataset_info(), 'demo')
  for name, path in sorted(test_files.items()):
    through_cli = predictor(predict.load_image(str(path)))
    served = _numpy(demo_module.serve_encoded(tf.constant(path.read_bytes())))
    _assert_same_answer(through_cli, served, name)

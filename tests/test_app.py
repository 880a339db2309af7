"""The try-a-model page: its logic without a browser, then the real page in
headless Chromium.

The model is the demo config with the deterministic test weights of
`tests.export.helpers` (identity batch norms, sharpened class head), so the
demo images get several confident segments.
"""

import functools
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax import app_logic
from deeplab_kmax import keys
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import demo_dataset
from tests.export import helpers

CONFIG = 'demo/kmax_demo'
# No area limits, so the small segments of the test weights stay.
OVERRIDES = ('evaluator_options.thing_area_limit=0',
             'evaluator_options.stuff_area_limit=0')
IMAGE = demo_dataset.render_scene((0, 500_000, 0))[0]
CHROMIUM_CANDIDATES = ('chromium', 'chromium-browser', 'google-chrome')


@functools.lru_cache(maxsize=None)
def _demo():
  """(config, built model with test weights)."""
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.override(config_lib.load_config(CONFIG),
                               config_lib.parse_override_flags(OVERRIDES))
  model = model_lib.build_model(config, dataset_info=demo_dataset.dataset_info())
  helpers.set_test_weights(model)
  return config, model


def _tunable():
  config, model = _demo()
  return app_logic.TunableModel.from_keras(model, config, 'demo test weights',
                                           info=demo_dataset.dataset_info())


def _void_pixels(view: app_logic.View) -> int:
  return int((view.maps[keys.PANOPTIC_PRED] // 256 == 0).sum())


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(SavedModel of the demo test model, the same without the
  serving_logits signature, as exports before it were)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import serving  # pylint: disable=g-import-not-at-top
  config, model = _demo()
  module = serving.build_serving_module(model, config,
                                        info=demo_dataset.dataset_info())
  root = tmp_path_factory.mktemp('app_saved_models')
  current = saved_model.write_saved_model(module, str(root / 'current'))
  older = str(root / 'older')
  signatures = module.signatures()
  del signatures[keys.SIGNATURE_LOGITS]
  tf.saved_model.save(module, older, signatures=signatures)
  metadata = pathlib.Path(saved_model.metadata_path(older))
  metadata.parent.mkdir(parents=True)
  metadata.write_text(module.metadata_json())
  return current, older


@pytest.mark.slow
def test_default_thresholds_give_the_serving_maps():
  from deeplab_kmax.export import serving  # pylint: disable=g-import-not-at-top
  config, model = _demo()
  module = serving.build_serving_module(model, config,
                                        info=demo_dataset.dataset_info())
  image = IMAGE[:100, :120]  # Another size than the crop.
  expected = {k: v.numpy() for k, v in module.serve_image(image).items()}
  tunable = _tunable()
  view = tunable.render(tunable.prepare(image))
  assert sorted(view.maps) == sorted(serving.OUTPUT_KEYS)
  for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED, keys.INSTANCE_PRED):
    np.testing.assert_array_equal(view.maps[key], expected[key], err_msg=key)
  for key in (keys.SEMANTIC_SCORES, keys.INSTANCE_SCORES,
              keys.SEMANTIC_PROBS):
    np.testing.assert_allclose(view.maps[key], expected[key], atol=1e-6,
                               err_msg=key)
  assert view.overlay.shape == image.shape and view.overlay.dtype == np.uint8
  assert len(view.segments) >= 4
  rows = view.table_rows()
  assert [r[0] for r in rows] == [s['id'] for s in view.segments]
  assert {r[1] for r in rows} <= set(demo_dataset.dataset_info()
                                     .class_names.values())
  assert sum(r[4] for r in rows) <= 100.0 + 1e-6


@pytest.mark.slow
def test_thresholds_change_the_merge():
  tunable = _tunable()
  prepared = tunable.prepare(IMAGE)
  defaults = app_logic.threshold_values(tunable.default_options)
  base = tunable.render(prepared)
  things = [s for s in base.segments if s['isthing']]
  assert things, 'the test weights should give thing segments'

  # A mask must have more than the overlapping threshold of its pixels
  # free: at 1.0 none can, so everything is void.
  empty = tunable.render(prepared, app_logic.with_thresholds(
      tunable.default_options, defaults[:2] + [1.0, defaults[3]]))
  assert empty.segments == []
  assert (empty.maps[keys.PANOPTIC_PRED] // 256 == 0).all()

  # Class thresholds at 1.0 keep only segments of saturated confidence
  # (the sharpened test class head saturates some slots).
  strict = tunable.render(prepared, app_logic.with_thresholds(
      tunable.default_options, [1.0, 1.0] + defaults[2:]))
  assert all(s['score'] >= 1.0 - 1e-6 for s in strict.segments)
  if any(s['score'] < 1.0 - 1e-6 for s in base.segments):
    assert len(strict.segments) < len(base.segments)

  # A thing threshold just above the weakest thing drops exactly that slot
  # (instance ids are ranks, which the thresholds do not change).
  weakest = min(things, key=lambda s: s['score'])
  if weakest['score'] < 1.0 - 2e-4:
    fewer = tunable.render(prepared, app_logic.with_thresholds(
        tunable.default_options, [weakest['score'] + 1e-4] + defaults[1:]))
    kept = [s for s in fewer.segments if s['isthing']]
    assert all(s['score'] > weakest['score'] for s in kept)
    assert weakest['panoptic_id'] not in {s['panoptic_id'] for s in kept}

  # A higher pixel confidence claims fewer pixels.
  sparse = tunable.render(prepared, app_logic.with_thresholds(
      tunable.default_options, defaults[:3] + [0.95]))
  assert _void_pixels(sparse) > _void_pixels(base)

  # The network ran once: a render with the defaults again is the same.
  again = tunable.render(prepared)
  np.testing.assert_array_equal(again.maps[keys.PANOPTIC_PRED],
                                base.maps[keys.PANOPTIC_PRED])


@pytest.mark.slow
def test_saved_model_thresholds_act_as_with_the_checkpoint(exported):
  """With --saved_model the sliders re-run the merge on the serving_logits
  signature's outputs, with the results of the config + checkpoint path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  current, _ = exported
  served = app_logic.load_model(saved_model=current)
  assert served.supports_thresholds
  assert served.description == f'SavedModel {current}'
  tunable = _tunable()
  assert served.default_options == tunable.default_options
  from_saved = served.prepare(IMAGE)
  from_keras = tunable.prepare(IMAGE)

  # Default thresholds: the maps of the SavedModel's own serving_default.
  loaded = tf.saved_model.load(current)
  expected = loaded.signatures[keys.SIGNATURE_IMAGE](
      **{keys.INPUT_IMAGE: tf.constant(IMAGE)})
  base = served.render(from_saved)
  for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED, keys.INSTANCE_PRED):
    np.testing.assert_array_equal(base.maps[key], expected[key].numpy(),
                                  err_msg=key)
  assert len(base.segments) >= 4

  defaults = app_logic.threshold_values(served.default_options)
  changes = {
      'pixel confidence 0.95': defaults[:3] + [0.95],
      'overlapping 1.0': defaults[:2] + [1.0, defaults[3]],
      'class confidences 1.0': [1.0, 1.0] + defaults[2:],
  }
  results = {}
  for name, values in changes.items():
    options = app_logic.with_thresholds(served.default_options, values)
    view = served.render(from_saved, options)
    reference = tunable.render(from_keras, options)
    np.testing.assert_array_equal(view.maps[keys.PANOPTIC_PRED],
                                  reference.maps[keys.PANOPTIC_PRED],
                                  err_msg=name)
    assert view.options == options
    results[name] = view
  assert _void_pixels(results['pixel confidence 0.95']) > _void_pixels(base)
  assert results['overlapping 1.0'].segments == []
  assert all(s['score'] >= 1.0 - 1e-6
             for s in results['class confidences 1.0'].segments)


@pytest.mark.slow
def test_older_saved_model_keeps_its_thresholds(exported):
  """A SavedModel without serving_logits still serves, thresholds fixed."""
  current, older = exported
  fixed = app_logic.load_model(saved_model=older)
  assert not fixed.supports_thresholds
  view = fixed.render(fixed.prepare(IMAGE))
  base = app_logic.load_model(saved_model=current)
  expected = base.render(base.prepare(IMAGE))
  np.testing.assert_array_equal(view.maps[keys.PANOPTIC_PRED],
                                expected.maps[keys.PANOPTIC_PRED])
  assert view.table_rows() == expected.table_rows()
  with pytest.raises(ValueError, match='serving_logits'):
    fixed.render(fixed.prepare(IMAGE), app_logic.with_thresholds(
        fixed.default_options, [0.9, 0.9, 0.5, 0.5]))


def test_threshold_values_are_checked():
  from deeplab_kmax import post_processing  # pylint: disable=g-import-not-at-top
  options = post_processing.MaskWiseOptions()
  changed = app_logic.with_thresholds(options, [0.1, 0.2, 0.3, 0.9])
  assert app_logic.threshold_values(changed) == [0.1, 0.2, 0.3, 0.9]
  assert changed.reorder_class_weight == options.reorder_class_weight
  with pytest.raises(ValueError, match='Overlapping threshold'):
    app_logic.with_thresholds(options, [0.1, 0.2, 1.3, 0.9])
  with pytest.raises(ValueError, match='4 threshold values'):
    app_logic.with_thresholds(options, [0.1])


def test_downloads_are_the_coco_panoptic_files(tmp_path):
  """A fixed model (as a SavedModel is) renders and writes the PNG + JSON."""
  from deeplab_kmax import post_processing  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import predict  # pylint: disable=g-import-not-at-top
  info = demo_dataset.dataset_info()
  panoptic = np.zeros((6, 8), np.int32)
  panoptic[:, :4] = 4 * 256  # sky
  panoptic[1:4, 5:7] = 1 * 256 + 3  # disc instance 3
  scores = np.where(panoptic > 0, 0.75, 0.0).astype(np.float32)

  def run(image):
    del image
    return {keys.PANOPTIC_PRED: panoptic, keys.SEMANTIC_SCORES: scores}

  fixed = app_logic.FixedModel(predict.Predictor(run, info, 'fixed test'),
                               post_processing.MaskWiseOptions())
  assert not fixed.supports_thresholds
  view = fixed.render(fixed.prepare(np.zeros((6, 8, 3), np.uint8)))
  assert [(r[1], r[2]) for r in view.table_rows()] == [('disc', 'thing'),
                                                        ('sky', 'stuff')]
  with pytest.raises(ValueError, match='built in'):
    fixed.render(fixed.prepare(np.zeros((6, 8, 3), np.uint8)),
                 post_processing.MaskWiseOptions(overlapping_threshold=0.1))
  png, segments_json = view.write_downloads(str(tmp_path))
  ids = coco_panoptic.decode_segment_ids(np.asarray(Image.open(png)))
  annotation = json.loads(pathlib.Path(segments_json).read_text())
  by_id = {s['id']: s for s in annotation['segments_info']}
  for segment_id, segment in by_id.items():
    assert ((ids == segment_id) == (panoptic == segment['panoptic_id'])).all()
  assert sorted(s['category_name'] for s in by_id.values()) == ['disc', 'sky']


def test_example_images(tmp_path):
  assert app_logic.example_images(None) == []
  for name in ('b.png', 'a.jpg', 'notes.txt'):
    (tmp_path / name).write_bytes(b'x')
  assert [os.path.basename(p) for p in app_logic.example_images(
      str(tmp_path))] == ['a.jpg', 'b.png']
  with pytest.raises(ValueError, match='not a directory'):
    app_logic.example_images(str(tmp_path / 'missing'))


# ---------------------------------------------------------------------------
# The page in a real browser.
# ---------------------------------------------------------------------------


def _chromium():
  for name in CHROMIUM_CANDIDATES:
    path = shutil.which(name)
    if path:
      return path
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for_page(process, url: str, timeout: float) -> None:
  import urllib.request  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise AssertionError(f'the app exited ({process.returncode})')
    try:
      with urllib.request.urlopen(url, timeout=2) as response:
        if response.status == 200:
          return
    except OSError:
      time.sleep(0.5)
  raise AssertionError(f'the app did not answer at {url} in {timeout} s')


def _page_rows(page, segments_id: str, count: int, expect) -> list:
  """The texts of the segment table's rows, once the page has drawn them.

  Gradio's Dataframe is an ARIA grid whose `aria-rowcount` counts the
  header and every row of the data; the rows it draws are virtual
  (`div[role=row][data-index]`). Its one `<tbody>` is a hidden sizing table
  of a single row (the widest cell of each column), not the segment list.
  """
  table = page.locator(f'#{segments_id}')
  expect(table.locator('[role=grid]')).to_have_attribute(
      'aria-rowcount', str(count + 1), timeout=60_000)
  rows = table.locator('[role=row][data-index]')
  expect(rows).to_have_count(count, timeout=60_000)
  return [table.locator(f'[role=row][data-index="{i}"]').inner_text()
          for i in range(count)]


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path):
  pytest.importorskip('gradio', reason='the app extra is not installed '
                      '(pip install -e ".[app]")')
  playwright = pytest.importorskip(
      'playwright.sync_api', reason='playwright (test extra) is not installed')
  browser_path = _chromium()
  if browser_path is None:
    pytest.skip('no Chromium installed (Debian: apt-get install chromium); '
                'the page test needs a real browser')
  from deeplab_kmax import app as app_lib  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  _, model = _demo()
  checkpoint = tf.train.Checkpoint(**model.checkpoint_items).write(
      str(tmp_path / 'ckpt' / 'ckpt'))
  tunable = _tunable()
  expected_rows = tunable.render(tunable.prepare(IMAGE)).table_rows()
  demo_dir = tmp_path / 'demo'
  (demo_dir / 'val').mkdir(parents=True)
  demo_dataset.dataset_info().save(str(demo_dir / demo_dataset.DESCRIPTOR_FILE))
  Image.fromarray(IMAGE).save(demo_dir / 'val' / 'scene.png')
  port = _free_port()
  env = dict(helpers.SUBPROCESS_ENV, DEMO_DIR=str(demo_dir),
             GRADIO_ANALYTICS_ENABLED='False')
  command = [sys.executable, '-m', 'deeplab_kmax.app',
             f'--config_file={CONFIG}', f'--checkpoint_path={checkpoint}',
             f'--examples_dir={demo_dir / "val"}', f'--port={port}'] + [
                 f'--config_override={o}' for o in OVERRIDES]
  log_path = tmp_path / 'app.log'
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  process = subprocess.Popen(command, cwd=helpers.REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
  screenshot = tmp_path / 'kmax_app_page.png'
  try:
    url = f'http://127.0.0.1:{port}/'
    _wait_for_page(process, url, timeout=600)
    with playwright.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=browser_path,
                                  headless=True, args=['--no-sandbox'])
      page = browser.new_page(viewport={'width': 1280, 'height': 1100})
      page.goto(url)
      page.locator('input[type=file]').first.set_input_files(
          str(demo_dir / 'val' / 'scene.png'))
      overlay = page.locator(f'#{app_lib.OVERLAY_ID} img')
      overlay.wait_for(state='visible', timeout=400_000)
      status = page.locator(f'#{app_lib.STATUS_ID}')
      status.filter(has_text='segments').wait_for(timeout=60_000)
      count = int(re.search(r'(\d+) segments',
                            status.inner_text()).group(1))
      row_texts = _page_rows(page, app_lib.SEGMENTS_ID, count,
                             playwright.expect)
      # Gradio shows a file's stem and extension in separate elements.
      downloads = ''.join(
          page.locator(f'#{app_lib.DOWNLOADS_ID}').inner_text().split())
      page.screenshot(path=str(screenshot), full_page=True)
      print(f'\nscreenshot of the page: {screenshot}')
      browser.close()
  except Exception as e:
    raise AssertionError(f'{e}\nThe app said:\n'
                         f'{log_path.read_text()[-5000:]}') from e
  finally:
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
    log.close()
  # The page shows the segment list of the same image rendered here.
  assert count == len(expected_rows) >= 4
  for text, row in zip(row_texts, expected_rows):
    cells = re.split(r'\s*[\t\n]\s*', text.strip())
    assert cells[:3] == [str(row[0]), row[1], row[2]], (text, row)
  assert 'prediction_panoptic.png' in downloads
  assert 'prediction_segments.json' in downloads
  assert screenshot.stat().st_size > 10_000

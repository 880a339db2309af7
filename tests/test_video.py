"""Video input of the predict CLI (needs the `[video]` extra: imageio-ffmpeg).

The clip is generated here: six 64x64 demo scenes at 8 frames/s. The
predictor derives its maps from the pixels it is given, so the test can
recompute every frame's expected map from the decoded clip.
"""

import json
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax import keys
from deeplab_kmax import predict
from deeplab_kmax import predict_video
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import demo_dataset
from tests.export import helpers

imageio_ffmpeg = pytest.importorskip(
    'imageio_ffmpeg', reason='the video extra is not installed '
    '(pip install -e ".[video]")')

FPS = 8
NUM_FRAMES = 6
SIZE = 64
INFO = demo_dataset.dataset_info()


def _write_clip(path) -> None:
  writer = imageio_ffmpeg.write_frames(str(path), (SIZE, SIZE), fps=FPS,
                                       macro_block_size=2,
                                       ffmpeg_log_level='error')
  writer.send(None)
  for index in range(NUM_FRAMES):
    frame = demo_dataset.render_scene((0, 500_000, index), SIZE, SIZE)[0]
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def _decoded_frames(path):
  reader = imageio_ffmpeg.read_frames(str(path), pix_fmt='rgb24')
  metadata = next(reader)
  width, height = metadata['size']
  frames = [np.frombuffer(data, np.uint8).reshape(height, width, 3)
            for data in reader]
  return metadata, frames


def _maps_of(image):
  """Sky where red > blue, a disc instance elsewhere in the top half."""
  red_over_blue = image[..., 0] > image[..., 2]
  panoptic = np.where(red_over_blue, 4 * 256, 1 * 256 + 1).astype(np.int32)
  panoptic[image.shape[0] // 2:] = np.where(
      red_over_blue[image.shape[0] // 2:], 4 * 256, 5 * 256)
  return {keys.PANOPTIC_PRED: panoptic,
          keys.SEMANTIC_SCORES: np.full(panoptic.shape, 0.9, np.float32)}


def test_video_gives_frame_files_and_an_overlay_video(tmp_path, capsys):
  clip = tmp_path / 'clip.mp4'
  _write_clip(clip)
  _, source_frames = _decoded_frames(clip)
  assert len(source_frames) == NUM_FRAMES
  out = tmp_path / 'out'
  predictor = predict.Predictor(_maps_of, INFO, 'pixel rule')
  written, failed = predict.predict_files(predictor, [str(clip)], str(out),
                                          progress=True)
  assert (written, failed) == (NUM_FRAMES, [])
  assert 'frame/s' in capsys.readouterr().err  # The progress bar's rate.

  results = json.loads((out / coco_panoptic.PREDICTIONS_FILE).read_text())
  annotations = results['annotations']
  assert [a['frame_index'] for a in annotations] == list(range(NUM_FRAMES))
  for index, frame in enumerate(source_frames):
    stem = predict_video.frame_stem('clip', index)
    assert annotations[index]['file_name'] == stem + predict.PANOPTIC_SUFFIX
    ids = coco_panoptic.decode_segment_ids(
        np.asarray(Image.open(out / (stem + predict.PANOPTIC_SUFFIX))))
    segments = json.loads((out / (stem + predict.SEGMENTS_SUFFIX)).read_text())
    expected = _maps_of(frame)[keys.PANOPTIC_PRED]
    for segment in segments['segments_info']:
      np.testing.assert_array_equal(ids == segment['id'],
                                    expected == segment['panoptic_id'])
    assert not (out / (stem + predict.OVERLAY_SUFFIX)).exists()

  metadata, overlays = _decoded_frames(out / 'clip_overlay.mp4')
  assert metadata['fps'] == FPS
  assert metadata['size'] == (SIZE, SIZE)
  assert len(overlays) == NUM_FRAMES
  # The overlay frames are the drawn overlays, up to video compression.
  for index in (0, NUM_FRAMES - 1):
    maps = _maps_of(source_frames[index])
    _, segments = coco_panoptic.panoptic_segments(
        maps[keys.PANOPTIC_PRED], maps[keys.SEMANTIC_SCORES], INFO)
    drawn = predict.overlay_picture(source_frames[index],
                                    maps[keys.PANOPTIC_PRED], segments, INFO)
    error = np.abs(overlays[index].astype(float) - drawn.astype(float))
    assert error.mean() < 20, index
  assert not [p.name for p in out.iterdir() if p.name.startswith('.')]


def test_unreadable_video_is_reported_and_skipped(tmp_path):
  broken = tmp_path / 'broken.mp4'
  broken.write_bytes(b'not a video')
  predictor = predict.Predictor(_maps_of, INFO, 'pixel rule')
  written, failed = predict.predict_files(
      predictor, [str(broken)], str(tmp_path / 'out'), progress=False)
  assert (written, failed) == (0, [str(broken)])
  assert not (tmp_path / 'out' / 'broken_overlay.mp4').exists()


@pytest.mark.slow
def test_cli_reads_a_video_with_the_demo_model(tmp_path):
  """`python -m deeplab_kmax.predict --inputs=clip.mp4` end to end."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('demo/kmax_demo')
  model = model_lib.build_model(config, dataset_info=INFO)
  helpers.set_test_weights(model)
  checkpoint = tf.train.Checkpoint(**model.checkpoint_items).write(
      str(tmp_path / 'ckpt' / 'ckpt'))
  INFO.save(str(tmp_path / demo_dataset.DESCRIPTOR_FILE))
  clip = tmp_path / 'clip.mp4'
  _write_clip(clip)
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_kmax.predict',
       '--config_file=demo/kmax_demo', f'--checkpoint_path={checkpoint}',
       f'--inputs={clip}', f'--output_dir={out}',
       '--config_override=evaluator_options.thing_area_limit=0',
       '--config_override=evaluator_options.stuff_area_limit=0'],
      cwd=helpers.REPO, env=dict(helpers.SUBPROCESS_ENV, DEMO_DIR=str(tmp_path)),
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((out / coco_panoptic.PREDICTIONS_FILE).read_text())
  assert len(results['annotations']) == NUM_FRAMES
  assert all(a['segments_info'] for a in results['annotations'])
  metadata, overlays = _decoded_frames(out / 'clip_overlay.mp4')
  assert (metadata['fps'], len(overlays)) == (FPS, NUM_FRAMES)

"""Video input of the predict CLI: per-frame COCO panoptic files and an
overlay video at the source frame rate.

Frames are read and the overlay video written with imageio-ffmpeg (the
imageio project's ffmpeg binding, which ships its own ffmpeg binary; the
optional extra `[video]`). Each frame goes through the same predictor and
the same writer as an image (`predict.write_prediction`), named
`<stem>_<frame:06d>`; the overlay PNG of a frame is left out, the overlays
go into `<stem>_overlay.mp4` (H.264) instead. The video is written under a
temporary name and renamed when its last frame is in, so a killed run
leaves no half video under the final name.
"""

import fractions
import os
from typing import Any, Dict, List, Optional

import numpy as np

from deeplab_kmax import keys
from deeplab_kmax import temp_files

VIDEO_SUFFIXES = ('.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm', '.mpg',
                  '.mpeg', '.wmv', '.flv')
OVERLAY_VIDEO_SUFFIX = '_overlay.mp4'
FRAME_DIGITS = 6


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_SUFFIXES)


def frame_stem(stem: str, index: int) -> str:
  """Output stem of frame `index` (0-based) of the video `stem`."""
  return f'{stem}_{index:0{FRAME_DIGITS}d}'


def require_ffmpeg():
  """Imports imageio-ffmpeg, or says how to install it."""
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Video input needs the optional package imageio-ffmpeg: '
                      'install it with `pip install -e ".[video]"`.') from e
  return imageio_ffmpeg


def _frame_count(metadata: Dict[str, Any]) -> Optional[int]:
  """Frames of the video as ffmpeg announces them (an estimate from the
  duration; None when unknown). Only the progress bar uses it."""
  fps, duration = metadata.get('fps'), metadata.get('duration')
  if not fps or not duration or not np.isfinite(fps * duration):
    return None
  return max(int(round(fps * duration)), 1)


def predict_video(predictor, path: str, output_dir: str, stem: str,
                  draw_names: bool = True, alpha: float = 0.6,
                  save_raw: bool = False,
                  progress: Optional[bool] = None) -> List[Dict[str, Any]]:
  """Predicts every frame of a video; returns the frames' annotations.

  Args:
    predictor: a `predict.Predictor`.
    path: the video file.
    output_dir: where the frame files and the overlay video go.
    stem: output name stem of the video.
    draw_names, alpha, save_raw: as for images (`predict.write_prediction`).
    progress: show a frames/s progress bar (None: only on a terminal).

  Raises:
    ValueError: the file holds no readable video stream or no frame.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import predict  # pylint: disable=g-import-not-at-top
  imageio_ffmpeg = require_ffmpeg()
  try:
    reader = imageio_ffmpeg.read_frames(path, pix_fmt='rgb24')
    metadata = next(reader)
  except (OSError, RuntimeError, StopIteration) as e:
    raise ValueError(f'{path}: not a readable video ({e}).') from None
  width, height = metadata['size']
  fps = fractions.Fraction(metadata['fps']).limit_denominator(1001)
  annotations = []

  def write_video(temporary: str) -> None:
    writer = imageio_ffmpeg.write_frames(
        temporary, (width, height), fps=fps, codec='libx264',
        macro_block_size=2, output_params=['-f', 'mp4'],
        ffmpeg_log_level='error')
    writer.send(None)  # Starts ffmpeg.
    bar = tqdm.tqdm(total=_frame_count(metadata), unit='frame',
                    desc=os.path.basename(path), leave=False,
                    disable=None if progress is None else not progress)
    try:
      for index, data in enumerate(reader):
        frame = np.frombuffer(data, np.uint8).reshape(height, width, 3)
        maps = predictor(frame)
        annotation = predict.write_prediction(
            output_dir, frame_stem(stem, index), frame, maps, predictor.info,
            draw_names, alpha, save_raw, write_overlay=False)
        annotation['video'] = os.path.basename(path)
        annotation['frame_index'] = index
        annotations.append(annotation)
        writer.send(np.ascontiguousarray(predict.overlay_picture(
            frame, maps[keys.PANOPTIC_PRED],
            annotation['segments_info'], predictor.info, draw_names, alpha)))
        bar.update(1)
    finally:
      bar.close()
      reader.close()
      writer.close()
    if not annotations:
      raise ValueError(f'{path}: the video has no frames.')

  temp_files.write_atomically(
      os.path.join(output_dir, stem + OVERLAY_VIDEO_SUFFIX), write_video)
  return annotations

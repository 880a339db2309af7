r"""A local web page to try a model on your own images (Gradio).

  python -m deeplab_kmax.app --config_file=configs/demo/kmax_demo.textproto \
      --checkpoint_path=demo_output/model/kmax_demo \
      --examples_dir=demo_output/data/coco/val2017
  python -m deeplab_kmax.app --saved_model=/tmp/kmax/1

then open the printed address (http://127.0.0.1:7860 by default). Upload or
pick an image to see the panoptic overlay and the segment list (class,
thing/stuff, score, area, box); the sliders re-run the mask-wise merge with
other thresholds (with a config + checkpoint, or a SavedModel through its
`serving_logits` signature; older exports without it keep their export-time
thresholds); the files offered for download are the COCO panoptic PNG +
segments JSON the predict CLI writes.

Needs the optional extra: `pip install -e ".[app]"` (Gradio). The page is
served on the loopback interface only, unless --host says otherwise. The
computations live in `app_logic`; this module only wires widgets to them.
"""

import os
import tempfile
from typing import List, Sequence

from absl import app as absl_app
from absl import flags

from deeplab_kmax import app_logic
from deeplab_kmax import cli_errors
from deeplab_kmax import model_source_flags

# Element ids of the page, for people styling it and for the browser test.
OVERLAY_ID = 'kmax-overlay'
SEGMENTS_ID = 'kmax-segments'
DOWNLOADS_ID = 'kmax-downloads'
STATUS_ID = 'kmax-status'
DEFAULT_PORT = 7860


def require_gradio():
  """Imports Gradio, or says how to install it."""
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('The web page needs the optional package gradio: '
                      'install it with `pip install -e ".[app]"`.') from e
  return gradio


def _status(model: app_logic.AppModel, view: app_logic.View) -> str:
  things = sum(1 for s in view.segments if s['isthing'])
  text = (f'{len(view.segments)} segments ({things} things, '
          f'{len(view.segments) - things} stuff) from {model.description}.')
  if not model.supports_thresholds:
    text += (' The thresholds are built into this SavedModel (exported '
             'without the serving_logits signature); export it again, or '
             'start the app with --config_file and --checkpoint_path, to '
             'change them.')
  return text


def build_page(model: app_logic.AppModel, download_root: str,
               examples: Sequence[str] = ()):
  """The Gradio Blocks of the page (not launched); each render's files go
  to a new folder under `download_root`."""
  gr = require_gradio()
  defaults = app_logic.threshold_values(model.default_options)

  def segment(image, prepared, *thresholds):
    """Runs the network when the image changed, then the merge."""
    if image is None:
      return None, [], None, None, 'Upload or pick an image.'
    if prepared is None or prepared.image.shape != image.shape or (
        prepared.image != image).any():
      prepared = model.prepare(image)
    options = (app_logic.with_thresholds(model.default_options, thresholds)
               if model.supports_thresholds else None)
    view = model.render(prepared, options)
    downloads = view.write_downloads(
        app_logic.new_download_dir(download_root))
    return (view.overlay, view.table_rows(), downloads, prepared,
            _status(model, view))

  with gr.Blocks(title='kMaX-DeepLab', analytics_enabled=False) as page:
    gr.Markdown(f'## kMaX-DeepLab panoptic segmentation\n{model.description}')
    prepared = gr.State(None)
    with gr.Row():
      with gr.Column():
        image = gr.Image(type='numpy', label='Image', sources=['upload'])
        sliders = [
            gr.Slider(0.0, 1.0, value=value, step=0.01, label=label,
                      interactive=model.supports_thresholds)
            for (_, label), value in zip(app_logic.THRESHOLDS, defaults)]
        if examples:
          gr.Examples(examples=[[path] for path in examples], inputs=[image],
                      label='Examples')
      with gr.Column():
        overlay = gr.Image(label='Panoptic overlay', elem_id=OVERLAY_ID,
                           interactive=False)
        status = gr.Markdown(elem_id=STATUS_ID)
    table = gr.Dataframe(headers=list(app_logic.TABLE_HEADERS),
                         label='Segments', elem_id=SEGMENTS_ID,
                         interactive=False)
    files = gr.File(label='COCO panoptic PNG + segments JSON',
                    file_count='multiple', elem_id=DOWNLOADS_ID,
                    interactive=False)
    inputs = [image, prepared] + sliders
    outputs = [overlay, table, files, prepared, status]
    image.change(segment, inputs, outputs)
    for slider in sliders:
      slider.release(segment, inputs, outputs)
  return page


def launch(page, host: str, port: int, allowed_paths: Sequence[str] = (),
           block: bool = True):
  """Serves the page; returns (app, local url). Gradio serves files only
  from `allowed_paths` (downloads, examples) besides its own cache."""
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
  fastapi_app, url, _ = page.launch(
      server_name=host, server_port=port, share=False, inbrowser=False,
      prevent_thread_lock=not block, show_error=True, quiet=False,
      ssr_mode=False, allowed_paths=list(allowed_paths))
  return fastapi_app, url


# The exported-model flag of the page (name -> help); it or --config_file.
_EXPORTED_MODEL_FLAGS = {
    'saved_model': 'SavedModel directory written by export_model.py '
                   '(thresholds adjustable through its serving_logits '
                   'signature).',
}


def _define_flags() -> None:
  model_source_flags.define_flags(_EXPORTED_MODEL_FLAGS,
                                  'a SavedModel (thresholds adjustable)')
  flags.DEFINE_string('examples_dir', None,
                      'Folder whose images the page offers as examples.')
  flags.DEFINE_string('host', '127.0.0.1',
                      'Interface to serve on (0.0.0.0 for every one).')
  flags.DEFINE_integer('port', DEFAULT_PORT, 'Port of the page.')
  cli_errors.define_verbose_flag()


def main(argv: List[str]) -> int:
  if len(argv) > 1:
    raise absl_app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  require_gradio()
  try:
    model = app_logic.load_model(values.saved_model, values.config_file,
                                 values.checkpoint_path,
                                 values.config_override)
    examples = app_logic.example_images(values.examples_dir)
  except ValueError as e:
    raise absl_app.UsageError(str(e)) from None
  download_root = tempfile.mkdtemp(prefix='kmax_app_')
  page = build_page(model, download_root, examples)
  print(f'kMaX-DeepLab page for {model.description}: open '
        f'http://{values.host}:{values.port} (Ctrl+C stops it).', flush=True)
  allowed = [download_root] + ([os.path.abspath(values.examples_dir)]
                               if values.examples_dir else [])
  launch(page, values.host, values.port, allowed)
  return 0


def _expected_errors():
  from deeplab_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top
  return (loader.ConfigError, model_loading.IncompleteCheckpointError,
          FileNotFoundError, ImportError)


def run() -> None:
  """The `kmax-app` console script (same as `python -m` this module)."""
  _define_flags()
  cli_errors.run(main, expected=_expected_errors())


if __name__ == '__main__':
  run()

"""The exported SavedModel: signatures, fresh-process equality, REST example.

One model export per test process (see helpers.bundle): the full COCO
ResNet-50 kMaX-DeepLab at eval crop 129, checkpointed the way DeepLab2 writes
checkpoints and exported with `trainer/export_model.py`.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import checkpoint_io
from deeplab_kmax import keys
from deeplab_kmax.export import model_loading
from deeplab_kmax.export import rest_api
from deeplab_kmax.export import saved_model
from deeplab_kmax.export import serving
from tests.export import helpers

pytestmark = pytest.mark.slow

DOCS = helpers.REPO / 'docs' / 'serving.md'
REGENERATE_ENV = 'DEEPLAB_KMAX_REGENERATE_DOCS'
_ID_KEYS = (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED,
            keys.INSTANCE_PRED)
_SCORE_KEYS = (keys.INSTANCE_SCORES, keys.SEMANTIC_SCORES)


@pytest.fixture(scope='module')
def bundle():
  return helpers.bundle()


@pytest.fixture(scope='module')
def keras_maps(bundle):
  maps = bundle.keras_maps
  # The comparison is only meaningful if the maps have structure.
  panoptic = maps[keys.PANOPTIC_PRED]
  assert len(np.unique(panoptic)) >= 3 and (panoptic == 0).any()
  assert len(np.unique(maps[keys.SEMANTIC_PRED])) >= 3
  return maps


def _doc_blocks(text):
  """The JSON code blocks after `<!-- rest-example:NAME -->` markers."""
  pattern = re.compile(r'<!-- rest-example:(\w+) -->\n```json\n(.*?)\n```',
                       re.S)
  return {name: body for name, body in pattern.findall(text)}


def _format_json(value) -> str:
  """Indented JSON with lists of numbers kept on one line."""
  text = json.dumps(value, indent=2)
  return re.sub(r'\[\s+([^\[\]{}"]*?)\s+\]',
                lambda m: '[' + re.sub(r',\s+', ', ', m.group(1)) + ']', text)


@pytest.fixture(scope='module')
def probed(bundle):
  """What a fresh process gets from the SavedModel (one load for all)."""
  request = rest_api.image_request(helpers.doc_image())
  documented = _doc_blocks(DOCS.read_text()) if DOCS.exists() else {}
  requests = [request]
  if 'request' in documented:
    requests.append(json.loads(documented['request']))
  path = bundle.workdir / 'requests.json'
  path.write_text(json.dumps(requests))
  arrays, results = helpers.probe(bundle.saved_model_dir, str(path))
  return arrays, results


def _assert_maps_equal(actual, expected, what):
  for key in _ID_KEYS:
    np.testing.assert_array_equal(actual[key], expected[key],
                                  err_msg=f'{what}: {key}')
  for key in _SCORE_KEYS:
    np.testing.assert_allclose(actual[key], expected[key], atol=1e-4,
                               err_msg=f'{what}: {key}')


def test_saved_model_cli_lists_the_signatures(bundle):
  result = helpers.run_command(['saved_model_cli', 'show', '--dir',
                                bundle.saved_model_dir, '--all'])
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  for name, input_name, shape in (
      ('serving_default', 'image', '(-1, -1, -1)'),
      ('serving_batch', 'images', '(-1, -1, -1, -1)'),
      ('serving_encoded', 'image_bytes', '()')):
    block = text[text.index(f"signature_def['{name}']"):]
    block = block[:block.index('Method name')]
    assert f"inputs['{input_name}']" in block
    assert shape in block
    for output in serving.OUTPUT_KEYS:
      assert f"outputs['{output}']" in block, (name, output)
  assert 'DT_UINT8' in text and 'DT_STRING' in text


def test_saved_model_cli_run_matches_keras(bundle, keras_maps):
  out = bundle.workdir / 'cli_run'
  image = bundle.workdir / 'image.npy'
  np.save(image, helpers.sample_image())
  result = helpers.run_command([
      'saved_model_cli', 'run', '--dir', bundle.saved_model_dir,
      '--tag_set', 'serve', '--signature_def', 'serving_default',
      '--inputs', f'image={image}', '--outdir', str(out)])
  assert result.returncode == 0, result.stderr[-3000:]
  maps = {key: np.load(out / f'{key}.npy') for key in serving.OUTPUT_KEYS}
  _assert_maps_equal(maps, keras_maps, 'saved_model_cli run')


def test_fresh_process_load_matches_keras(probed, keras_maps):
  arrays, results = probed
  assert results['signatures'] == sorted(
      [keys.SIGNATURE_IMAGE, keys.SIGNATURE_BATCH,
       keys.SIGNATURE_ENCODED, keys.SIGNATURE_LOGITS])
  default = {k: arrays[f'default/{k}'] for k in serving.OUTPUT_KEYS}
  _assert_maps_equal(default, keras_maps, 'tf.saved_model.load')
  assert default[keys.PANOPTIC_PRED].shape == (65, 97)
  assert default[keys.PANOPTIC_PRED].dtype == np.int32
  probs = default[keys.SEMANTIC_PROBS]
  assert probs.dtype == np.float32 and 0 <= probs.min() and probs.max() <= 1


def test_batch_and_encoded_signatures_agree(probed):
  arrays, _ = probed
  batch_first = {k: arrays[f'batch/{k}'][0] for k in serving.OUTPUT_KEYS}
  default = {k: arrays[f'default/{k}'] for k in serving.OUTPUT_KEYS}
  # Another batch size may round floats differently (different kernels).
  _assert_maps_equal(batch_first, default, 'serving_batch')
  # Same image, same graph after decoding: ids exact, floats (probabilities
  # and scores in [0, 1]) to float32 rounding.
  for key in serving.OUTPUT_KEYS:
    if arrays[f'default/{key}'].dtype.kind == 'f':
      np.testing.assert_allclose(arrays[f'encoded/{key}'],
                                 arrays[f'default/{key}'], rtol=0, atol=1e-6,
                                 err_msg=key)
    else:
      np.testing.assert_array_equal(arrays[f'encoded/{key}'],
                                    arrays[f'default/{key}'], err_msg=key)
  assert arrays[f'batch/{keys.PANOPTIC_PRED}'].shape == (2, 65, 97)
  # serving_encoded converts a grayscale file to RGB.
  np.testing.assert_array_equal(arrays['encoded_gray/panoptic_pred'],
                                arrays['gray_as_rgb/panoptic_pred'])


def test_bad_inputs_give_clear_errors(probed):
  _, results = probed
  errors = results['errors']
  assert 'empty image' in errors['empty']
  for key in ('grayscale', 'rgba'):
    assert 'expects uint8 RGB images' in errors[key], errors[key]
    assert 'channels' in errors[key]
  assert 'uint8' in errors['float']


def _called_functions(node_or_attrs):
  """Names of functions a node calls (f, body, cond, branches, ...)."""
  names = []
  for value in node_or_attrs.attr.values():
    if value.HasField('func'):
      names.append(value.func.name)
    names.extend(f.name for f in value.list.func)
  return names


def _meta_graph(saved_model_dir: str):
  """The one MetaGraphDef of an exported SavedModel."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString(
      (pathlib.Path(saved_model_dir) / 'saved_model.pb').read_bytes())
  (meta_graph,) = proto.meta_graphs
  return meta_graph


def test_no_device_is_pinned_in_the_graph(bundle):
  """Everything the signatures run is unplaced, so TF picks GPU when present.

  The only pinned nodes are TF's own checkpoint save/restore functions (file
  I/O always runs on the host CPU) and a constant feeding them.
  """
  meta_graph = _meta_graph(bundle.saved_model_dir)
  graph = meta_graph.graph_def
  functions = {f.signature.name: f for f in graph.library.function}
  by_name = {n.name: n for n in graph.node}
  pending = []
  for signature in meta_graph.signature_def.values():
    for tensor in signature.outputs.values():
      node = by_name[tensor.name.split(':')[0]]
      assert not node.device, node.name
      pending.extend(_called_functions(node))
  served, nodes = set(), []
  while pending:
    name = pending.pop()
    if name in served:
      continue
    served.add(name)
    for node in functions[name].node_def:
      nodes.append(node)
      pending.extend(_called_functions(node))
  assert len(nodes) > 1000  # The whole network is in there.
  pinned = [(n.name, n.device) for n in nodes if n.device]
  assert not pinned, pinned[:10]
  # Everything else that is pinned belongs to checkpoint I/O.
  for name, function in functions.items():
    if any(n.device for n in function.node_def):
      assert '_traced_save' in name or '_traced_restore' in name, name
  assert all(n.op == 'Const' for n in graph.node if n.device)


def _saved_function_names(saved_model_dir: str) -> list:
  """The graph library's function names without their trace counters."""
  return [re.sub(r'_\d+$', '', f.signature.name) for f in
          _meta_graph(saved_model_dir).graph_def.library.function]


def test_every_function_is_saved_once(bundle):
  """One trace per function: a signature traced before the save would be
  written beside the save's own trace of it, and every copy of the network
  graph costs memory at load time."""
  names = _saved_function_names(bundle.saved_model_dir)
  assert '__inference__network_logits' in names
  repeated = sorted({name for name in names if names.count(name) > 1})
  assert not repeated, repeated


def test_metadata_describes_labels_and_preprocessing(bundle):
  metadata = saved_model.load_metadata(bundle.saved_model_dir)
  assert metadata['preprocessing']['crop_size'] == [helpers.CROP] * 2
  info = serving.dataset_info_from_metadata(metadata)
  assert info.class_names == bundle.info.class_names
  assert info.thing_class_ids == bundle.info.thing_class_ids
  assert metadata['label_space']['label_divisor'] == 256
  assert metadata['post_processing']['thing_area_limit'] == 0
  assert metadata['experiment_name'] == bundle.config.experiment_name


def test_documented_rest_example_is_what_the_model_returns(probed):
  """docs/serving.md shows a real request and the model's real response.

  After a deliberate change of the model's numerics, refresh the example:
    DEEPLAB_KMAX_REGENERATE_DOCS=1 python -m pytest \
        tests/export/test_saved_model.py -k documented
  """
  _, results = probed
  status, response = results['rest'][0]
  assert status == 200, response
  request = rest_api.image_request(helpers.doc_image())
  text = DOCS.read_text()
  regenerate = bool(os.environ.get(REGENERATE_ENV))
  if regenerate:
    text = _replace_block(text, 'request', _format_json(request))
    text = _replace_block(text, 'response', _format_json(response))
    DOCS.write_text(text)
  blocks = _doc_blocks(text)
  assert json.loads(blocks['request']) == request, (
      'The documented request is not the test image; see this test\'s '
      'docstring to regenerate.')
  documented = json.loads(blocks['response'])
  assert set(documented['outputs']) == set(serving.OUTPUT_KEYS)
  if not regenerate:  # The documented request, sent as written.
    status, again = results['rest'][1]
    assert status == 200 and set(again) == set(response)
    # The same request twice: ids exact, floats to float32 rounding.
    assert set(again['outputs']) == set(response['outputs'])
    for key, value in response['outputs'].items():
      if key in _ID_KEYS:
        assert again['outputs'][key] == value, key
      else:
        np.testing.assert_allclose(again['outputs'][key], value, rtol=0,
                                   atol=1e-6, err_msg=key)
  for key, value in response['outputs'].items():
    expected = np.asarray(documented['outputs'][key])
    if key in _ID_KEYS:
      np.testing.assert_array_equal(value, expected, err_msg=key)
    else:
      np.testing.assert_allclose(value, expected, atol=1e-4, err_msg=key)


def _replace_block(text, name, body):
  marker = f'<!-- rest-example:{name} -->\n```json\n'
  start = text.index(marker) + len(marker)
  end = text.index('\n```', start)
  return text[:start] + body + text[end:]


def test_export_keeps_an_existing_output_path(bundle, tmp_path):
  target = tmp_path / 'existing'
  target.mkdir()
  (target / 'keep.txt').write_text('mine')
  result = helpers.run_command(helpers.export_command(
      bundle.checkpoint_path, str(target)))
  assert result.returncode == 1
  assert 'already exists' in result.stderr + result.stdout
  assert [p.name for p in target.iterdir()] == ['keep.txt']


def test_trainer_checkpoints_restore_and_partial_ones_are_refused(bundle,
                                                                  tmp_path):
  items = bundle.model.checkpoint_items
  strict = checkpoint_io.RestoreMode.strict_inference()
  step = tf.Variable(7, dtype=tf.int64)
  # The trainer's layout: model items at the top level, plus its own state.
  trainer_ckpt = tf.train.CheckpointManager(
      tf.train.Checkpoint(global_step=step, **items), str(tmp_path / 'train'),
      max_to_keep=1).save()
  variable = items['transformer_class_head'].trainable_variables[0]
  kept = variable.numpy()
  try:
    variable.assign(tf.zeros_like(variable))
    report = checkpoint_io.restore_model(items, str(tmp_path / 'train'),
                                         strict)
    assert not report.missing and trainer_ckpt
    np.testing.assert_array_equal(variable.numpy(), kept)

    partial = tf.train.Checkpoint(encoder=items['encoder']).write(
        str(tmp_path / 'encoder_only' / 'ckpt'))
    with pytest.raises(model_loading.IncompleteCheckpointError,
                       match='pixel_decoder'):
      checkpoint_io.restore_model(items, partial, strict)
    with pytest.raises(FileNotFoundError):
      checkpoint_io.restore_model(items, str(tmp_path / 'nothing'), strict)
  finally:
    variable.assign(kept)


def test_cli_usage_errors_are_reported():
  result = subprocess.run(
      [sys.executable, str(helpers.REPO / 'trainer' / 'export_model.py')],
      capture_output=True, text=True, env=helpers.SUBPROCESS_ENV,
      check=False, cwd=helpers.REPO)
  assert result.returncode != 0
  assert 'config_file' in result.stderr

"""TF Serving REST request/response handling, on a small stand-in signature.

The real model's REST behaviour is checked against docs/serving.md in
test_saved_model.py.
"""

import base64
import http.server
import io
import json
import re
import threading

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.export import rest_api
from deeplab_kmax.testing import rest_server


@tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8,
                                            name='image')])
def _image_fn(image):
  image = tf.cast(image, tf.int32)
  return {'panoptic_pred': tf.reduce_sum(image, -1),
          'semantic_probs': tf.cast(image[..., 0], tf.float32) / 255.0}


@tf.function(input_signature=[tf.TensorSpec([None, None, None, None],
                                            tf.uint8, name='images')])
def _batch_fn(images):
  return {'panoptic_pred': tf.reduce_sum(tf.cast(images, tf.int32), -1)}


@tf.function(input_signature=[tf.TensorSpec([], tf.string,
                                            name='image_bytes')])
def _encoded_fn(image_bytes):
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return {'panoptic_pred': tf.reduce_sum(tf.cast(image, tf.int32), -1)}


SIGNATURES = {
    keys.SIGNATURE_IMAGE: _image_fn.get_concrete_function(),
    keys.SIGNATURE_BATCH: _batch_fn.get_concrete_function(),
    keys.SIGNATURE_ENCODED: _encoded_fn.get_concrete_function(),
}
IMAGE = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10


def test_columnar_request_and_response():
  status, body = rest_server.handle_predict(SIGNATURES,
                                            rest_api.image_request(IMAGE))
  assert status == 200
  assert body['outputs']['panoptic_pred'] == IMAGE.astype(int).sum(-1).tolist()
  arrays = rest_api.response_arrays(body)
  assert arrays['panoptic_pred'].dtype == np.int32
  # Floats are written as the shortest decimal that reads back exactly.
  served = _image_fn(IMAGE)['semantic_probs'].numpy()
  np.testing.assert_array_equal(arrays['semantic_probs'], served)
  assert all(len(repr(v)) <= 12 for row in body['outputs']['semantic_probs']
             for v in row)


def test_unnamed_columnar_input_is_accepted():
  status, body = rest_server.handle_predict(
      SIGNATURES, {'inputs': IMAGE.tolist()})
  assert status == 200 and 'outputs' in body


def test_row_request_returns_one_prediction_per_image():
  images = np.stack([IMAGE, IMAGE[::-1]])
  status, body = rest_server.handle_predict(SIGNATURES,
                                            rest_api.batch_request(images))
  assert status == 200
  assert [p['panoptic_pred'] for p in body['predictions']] == (
      images.astype(int).sum(-1).tolist())


def test_b64_encoded_image():
  buffer = io.BytesIO()
  Image.fromarray(IMAGE).save(buffer, format='PNG')
  request = rest_api.encoded_request(buffer.getvalue())
  assert request['inputs']['image_bytes']['b64'] == base64.b64encode(
      buffer.getvalue()).decode('ascii')
  status, body = rest_server.handle_predict(SIGNATURES, request)
  assert status == 200
  assert body['outputs']['panoptic_pred'] == IMAGE.astype(int).sum(-1).tolist()


@pytest.mark.parametrize('body,message', [
    ({'inputs': {'image': [[[0.5, 1, 2]]]}}, 'uint8'),
    ({'inputs': {'image': [[[0, 1, 256]]]}}, r'\[0, 255\]'),
    ({'inputs': {'image': [[[0, 1, 2]], [[0, 1]]]}}, 'ragged'),
    ({'signature_name': 'nope', 'inputs': []}, 'not found'),
    ({'inputs': [], 'instances': []}, 'exactly one'),
    ({'inputs': {'image': [1, 2, 3]}}, 'shape'),
])
def test_bad_requests_get_400_with_a_message(body, message):
  status, reply = rest_server.handle_predict(SIGNATURES, body)
  assert status == 400
  assert re.search(message, reply['error']), reply['error']


def test_request_builders_check_their_input():
  with pytest.raises(ValueError, match='uint8'):
    rest_api.image_request(IMAGE.astype(np.float32))
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    rest_api.batch_request(IMAGE)


class _Handler(http.server.BaseHTTPRequestHandler):
  """A stand-in for tensorflow_model_server's REST endpoint."""

  def do_POST(self):  # pylint: disable=invalid-name
    if not self.path.endswith('/v1/models/kmax:predict'):
      self.send_error(404)
      return
    length = int(self.headers['Content-Length'])
    status, body = rest_server.handle_predict(
        SIGNATURES, json.loads(self.rfile.read(length)))
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    del args


def test_client_talks_to_a_rest_endpoint():
  server = http.server.HTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    base = f'http://127.0.0.1:{server.server_address[1]}'
    client = rest_api.PredictClient(base, 'kmax')
    maps = client.predict(IMAGE)
    np.testing.assert_array_equal(maps['panoptic_pred'],
                                  IMAGE.astype(int).sum(-1))
    with pytest.raises(rest_api.RequestError, match='400.*uint8'):
      client.post({'inputs': {'image': [[[0.5, 1, 2]]]}})
  finally:
    server.shutdown()
    server.server_close()

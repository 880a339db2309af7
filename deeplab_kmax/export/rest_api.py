"""TF Serving's REST predict API for the exported model: requests, responses.

TF Serving (`tensorflow_model_server --rest_api_port=8501`) answers
`POST /v1/models/<name>[/versions/<v>]:predict` with JSON. Two request
layouts exist:

* columnar, `{"signature_name": ..., "inputs": {"image": <nested lists>}}`:
  tensors are passed as they are. Use it for `serving_default`, whose input
  `image` is one [H, W, 3] image; the reply is `{"outputs": {name: value}}`.
* row, `{"signature_name": "serving_batch", "instances": [<image>, ...]}`:
  the server stacks the instances into the batch dimension, so it only fits
  `serving_batch` (all images the same size); the reply is
  `{"predictions": [{name: value}, ...]}`, one object per image.

Binary inputs are sent as `{"b64": "<base64>"}` (`serving_encoded` takes an
encoded image file as `image_bytes`). Errors come back as `{"error": msg}`.

`handle_predict` implements these rules for the signatures of a loaded
SavedModel, so the documented examples can be checked without a server, and
`PredictClient` talks to a real server.
"""

import base64
import json
import urllib.error
import urllib.request
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from deeplab_kmax.export import serving


class RequestError(ValueError):
  """The request does not fit the signature (TF Serving answers 400)."""


def image_request(image: np.ndarray,
                  signature_name: str = serving.SIGNATURE_IMAGE
                  ) -> Dict[str, Any]:
  """Columnar request body for one uint8 [H, W, 3] image."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Expected a uint8 [H, W, 3] image, got {image.dtype} '
                     f'{image.shape}.')
  return {'signature_name': signature_name,
          'inputs': {serving.INPUT_IMAGE: image.tolist()}}


def batch_request(images: np.ndarray) -> Dict[str, Any]:
  """Row-format request body for uint8 [B, H, W, 3] images (one size)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected uint8 [B, H, W, 3] images, got '
                     f'{images.dtype} {images.shape}.')
  return {'signature_name': serving.SIGNATURE_BATCH,
          'instances': [image.tolist() for image in images]}


def encoded_request(image_file_bytes: bytes) -> Dict[str, Any]:
  """Columnar request body for an encoded image file (JPEG, PNG, ...)."""
  return {'signature_name': serving.SIGNATURE_ENCODED,
          'inputs': {serving.INPUT_ENCODED: {
              'b64': base64.b64encode(image_file_bytes).decode('ascii')}}}


def _decode_b64(value: Any) -> Any:
  if isinstance(value, Mapping):
    if set(value) != {'b64'}:
      raise RequestError(f'Binary values must be {{"b64": ...}}, got keys '
                         f'{sorted(value)}.')
    return base64.b64decode(value['b64'])
  if isinstance(value, list):
    return [_decode_b64(v) for v in value]
  return value


def _to_tensor(value: Any, spec: tf.TensorSpec, name: str) -> tf.Tensor:
  """JSON value -> tensor of the spec's dtype, with TF Serving-like checks."""
  if spec.dtype == tf.string:
    array = np.asarray(_decode_b64(value), dtype=object)
  else:
    try:
      array = np.asarray(value)
    except ValueError:
      array = np.empty(0, object)
    if array.dtype == object:
      raise RequestError(f'Input {name!r}: ragged nested lists; every row '
                         'must have the same length.')
    if spec.dtype.is_integer:
      if array.size and array.dtype.kind not in 'iu':
        raise RequestError(
            f'Input {name!r} expects {spec.dtype.name} values, got '
            f'{array.dtype.name} (e.g. {array.reshape(-1)[0]!r}); send '
            'integers 0..255.')
      info = np.iinfo(spec.dtype.as_numpy_dtype)
      if array.size and (array.min() < info.min or array.max() > info.max):
        raise RequestError(f'Input {name!r}: values must be in '
                           f'[{info.min}, {info.max}].')
    array = array.astype(spec.dtype.as_numpy_dtype)
  if not spec.shape.is_compatible_with(array.shape):
    raise RequestError(f'Input {name!r} expects shape {spec.shape}, got '
                       f'{list(array.shape)}.')
  return tf.constant(array, dtype=spec.dtype)


def _input_specs(function) -> Dict[str, tf.TensorSpec]:
  """Input name -> spec (loaded signatures take keyword arguments only)."""
  args, kwargs = function.structured_input_signature
  specs = dict(kwargs)
  specs.update({spec.name: spec for spec in args})
  return specs


def _json_value(tensor: tf.Tensor) -> Any:
  array = tensor.numpy()
  if array.dtype == object:
    return np.vectorize(
        lambda b: {'b64': base64.b64encode(b).decode('ascii')},
        otypes=[object])(array).tolist()
  if array.dtype.kind == 'f':
    # Each float32 as the shortest decimal that reads back to it.
    shortest = [float(str(v)) for v in array.astype(np.float32).reshape(-1)]
    return np.asarray(shortest, dtype=object).reshape(array.shape).tolist()
  return array.tolist()


def handle_predict(signatures: Mapping[str, Any],
                   body: Mapping[str, Any]) -> Tuple[int, Dict[str, Any]]:
  """Answers a predict request like TF Serving: (HTTP status, JSON body).

  Args:
    signatures: `loaded.signatures` of a tf.saved_model.load()ed model.
    body: the request JSON.
  """
  try:
    return 200, _predict(signatures, body)
  except RequestError as e:
    return 400, {'error': str(e)}
  except tf.errors.InvalidArgumentError as e:
    return 400, {'error': e.message}


def _predict(signatures, body) -> Dict[str, Any]:
  if not isinstance(body, Mapping):
    raise RequestError('The request body must be a JSON object.')
  name = body.get('signature_name', serving.SIGNATURE_IMAGE)
  if name not in signatures:
    raise RequestError(f'Serving signature name: "{name}" not found in '
                       f'signature def; available: {sorted(signatures)}.')
  function = signatures[name]
  specs = _input_specs(function)
  has_rows, has_columns = 'instances' in body, 'inputs' in body
  if has_rows == has_columns:
    raise RequestError('Provide exactly one of "instances" (row format) or '
                       '"inputs" (columnar format).')
  if has_columns:
    inputs = body['inputs']
    if not (isinstance(inputs, Mapping) and set(inputs) <= set(specs) and
            inputs):
      if len(specs) != 1:
        raise RequestError(f'"inputs" must name the inputs {sorted(specs)}.')
      inputs = {next(iter(specs)): inputs}
    missing = set(specs) - set(inputs)
    if missing:
      raise RequestError(f'Missing inputs {sorted(missing)}.')
    tensors = {k: _to_tensor(v, specs[k], k) for k, v in inputs.items()}
    outputs = function(**tensors)
    return {'outputs': {k: _json_value(v) for k, v in sorted(outputs.items())}}

  instances = body['instances']
  if not isinstance(instances, list) or not instances:
    raise RequestError('"instances" must be a non-empty list.')
  if all(isinstance(i, Mapping) and set(i) == set(specs) for i in instances):
    columns = {k: [i[k] for i in instances] for k in specs}
  elif len(specs) == 1:
    columns = {next(iter(specs)): instances}
  else:
    raise RequestError(f'Each instance must be an object with the inputs '
                       f'{sorted(specs)}.')
  tensors = {k: _to_tensor(v, specs[k], k) for k, v in columns.items()}
  outputs = function(**tensors)
  batch = int(next(iter(tensors.values())).shape[0])
  rows = [{} for _ in range(batch)]
  for key, value in sorted(outputs.items()):
    for row, item in zip(rows, tf.unstack(value)):
      row[key] = _json_value(item)
  return {'predictions': rows}


def response_arrays(response: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The output maps of a columnar response as arrays of the served dtypes."""
  if 'error' in response:
    raise RequestError(response['error'])
  outputs = response['outputs']
  dtypes = {key: (np.float32 if key in (serving.INSTANCE_SCORES,
                                        serving.SEMANTIC_SCORES,
                                        serving.SEMANTIC_PROBS) else np.int32)
            for key in serving.OUTPUT_KEYS}
  return {key: np.asarray(value, dtypes.get(key)) for key, value in
          outputs.items()}


class PredictClient:
  """A minimal client of a running TF Serving REST endpoint.

    client = PredictClient('http://localhost:8501', 'kmax')
    maps = client.predict(image)   # uint8 [H, W, 3] -> dict of arrays
  """

  def __init__(self, base_url: str, model_name: str,
               version: Optional[int] = None, timeout_s: float = 60.0):
    path = f'/v1/models/{model_name}'
    if version is not None:
      path += f'/versions/{int(version)}'
    self.url = base_url.rstrip('/') + path + ':predict'
    self._timeout_s = timeout_s

  def post(self, body: Mapping[str, Any]) -> Dict[str, Any]:
    request = urllib.request.Request(
        self.url, data=json.dumps(body).encode('utf-8'),
        headers={'Content-Type': 'application/json'}, method='POST')
    try:
      with urllib.request.urlopen(request, timeout=self._timeout_s) as reply:
        return json.loads(reply.read().decode('utf-8'))
    except urllib.error.HTTPError as e:
      detail = e.read().decode('utf-8', 'replace')
      try:
        detail = json.loads(detail).get('error', detail)
      except ValueError:
        pass
      raise RequestError(f'{self.url} answered {e.code}: {detail}') from None

  def predict(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    return response_arrays(self.post(image_request(image)))

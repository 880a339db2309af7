"""A stand-in for TF Serving's REST predict endpoint, for tests.

`handle_predict` answers a request body the way `tensorflow_model_server`
does for the signatures of a loaded SavedModel (columnar `inputs` or row
`instances`, `{"b64": ...}` binaries, 400 with an `error` message for a
request that does not fit), so the request builders and client of
`deeplab_kmax.export.rest_api` and the documented examples can be checked
without a server.
"""

import base64
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.export import rest_api

RequestError = rest_api.RequestError


def _decode_b64(value: Any) -> Any:
  if isinstance(value, Mapping):
    if set(value) != {keys.REST_B64}:
      raise RequestError(f'Binary values must be {{"b64": ...}}, got keys '
                         f'{sorted(value)}.')
    return base64.b64decode(value[keys.REST_B64])
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
        lambda b: {keys.REST_B64: base64.b64encode(b).decode('ascii')},
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
    return 400, {keys.REST_ERROR: str(e)}
  except tf.errors.InvalidArgumentError as e:
    return 400, {keys.REST_ERROR: e.message}


def _predict(signatures, body) -> Dict[str, Any]:
  if not isinstance(body, Mapping):
    raise RequestError('The request body must be a JSON object.')
  name = body.get(keys.REST_SIGNATURE_NAME, keys.SIGNATURE_IMAGE)
  if name not in signatures:
    raise RequestError(f'Serving signature name: "{name}" not found in '
                       f'signature def; available: {sorted(signatures)}.')
  function = signatures[name]
  specs = _input_specs(function)
  has_rows, has_columns = keys.REST_INSTANCES in body, keys.REST_INPUTS in body
  if has_rows == has_columns:
    raise RequestError('Provide exactly one of "instances" (row format) or '
                       '"inputs" (columnar format).')
  if has_columns:
    inputs = body[keys.REST_INPUTS]
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
    return {keys.REST_OUTPUTS: {k: _json_value(v)
                                for k, v in sorted(outputs.items())}}

  instances = body[keys.REST_INSTANCES]
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
  return {keys.REST_PREDICTIONS: rows}

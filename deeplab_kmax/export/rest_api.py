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

`PredictClient` talks to a real server; `deeplab_kmax.testing.rest_server`
answers like one, so the documented examples can be checked without it.
"""

import base64
import json
import urllib.error
import urllib.request
from typing import Any, Dict, Mapping, Optional

import numpy as np

from deeplab_kmax import keys
from deeplab_kmax.export import serving


class RequestError(ValueError):
  """The request does not fit the signature (TF Serving answers 400)."""


def image_request(image: np.ndarray,
                  signature_name: str = keys.SIGNATURE_IMAGE
                  ) -> Dict[str, Any]:
  """Columnar request body for one uint8 [H, W, 3] image."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Expected a uint8 [H, W, 3] image, got {image.dtype} '
                     f'{image.shape}.')
  return {keys.REST_SIGNATURE_NAME: signature_name,
          keys.REST_INPUTS: {keys.INPUT_IMAGE: image.tolist()}}


def batch_request(images: np.ndarray) -> Dict[str, Any]:
  """Row-format request body for uint8 [B, H, W, 3] images (one size)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected uint8 [B, H, W, 3] images, got '
                     f'{images.dtype} {images.shape}.')
  return {keys.REST_SIGNATURE_NAME: keys.SIGNATURE_BATCH,
          keys.REST_INSTANCES: [image.tolist() for image in images]}


def encoded_request(image_file_bytes: bytes) -> Dict[str, Any]:
  """Columnar request body for an encoded image file (JPEG, PNG, ...)."""
  return {keys.REST_SIGNATURE_NAME: keys.SIGNATURE_ENCODED,
          keys.REST_INPUTS: {keys.INPUT_ENCODED: {
              keys.REST_B64:
                  base64.b64encode(image_file_bytes).decode('ascii')}}}


def response_arrays(response: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The output maps of a columnar response as arrays of the served dtypes."""
  if keys.REST_ERROR in response:
    raise RequestError(response[keys.REST_ERROR])
  outputs = response[keys.REST_OUTPUTS]
  dtypes = {key: (np.float32 if key in (keys.INSTANCE_SCORES,
                                        keys.SEMANTIC_SCORES,
                                        keys.SEMANTIC_PROBS) else np.int32)
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
        detail = json.loads(detail).get(keys.REST_ERROR, detail)
      except ValueError:
        pass
      raise RequestError(f'{self.url} answered {e.code}: {detail}') from None

  def predict(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    return response_arrays(self.post(image_request(image)))

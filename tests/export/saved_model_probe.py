"""Loads an exported SavedModel in a fresh process and records what it does.

  python tests/export/saved_model_probe.py \
      SAVED_MODEL IMAGE.npy REQUESTS.json OUT_DIR

Writes OUT_DIR/arrays.npz (the outputs of every signature on the image) and
OUT_DIR/results.json (signature names, error messages for bad inputs, and
the REST responses to the requests in REQUESTS.json, if given). Run by
tests/export/test_saved_model.py; a fresh process proves the SavedModel does
not depend on Python state of the exporting process.
"""

import io
import json
import os
import sys

import numpy as np
from PIL import Image
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from deeplab_kmax.testing import rest_server  # pylint: disable=g-import-not-at-top,wrong-import-position


def _error_of(call):
  try:
    call()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def main(saved_model_dir, image_path, requests_path, out_dir):
  loaded = tf.saved_model.load(saved_model_dir)
  signatures = loaded.signatures
  image = np.load(image_path)
  arrays, results = {}, {'signatures': sorted(signatures)}

  single = signatures['serving_default'](image=tf.constant(image))
  for key, value in single.items():
    arrays[f'default/{key}'] = value.numpy()
  batch = signatures['serving_batch'](images=tf.constant(
      np.stack([image, image[::-1]])))
  for key, value in batch.items():
    arrays[f'batch/{key}'] = value.numpy()
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  encoded = signatures['serving_encoded'](
      image_bytes=tf.constant(buffer.getvalue()))
  for key, value in encoded.items():
    arrays[f'encoded/{key}'] = value.numpy()
  gray = io.BytesIO()
  Image.fromarray(image[..., 0]).save(gray, format='PNG')
  arrays['encoded_gray/panoptic_pred'] = signatures['serving_encoded'](
      image_bytes=tf.constant(gray.getvalue()))['panoptic_pred'].numpy()
  arrays['gray_as_rgb/panoptic_pred'] = signatures['serving_default'](
      image=tf.constant(np.repeat(image[..., :1], 3, -1)))[
          'panoptic_pred'].numpy()

  default = signatures['serving_default']
  results['errors'] = {
      'empty': _error_of(lambda: default(
          image=tf.zeros([0, 5, 3], tf.uint8))),
      'grayscale': _error_of(lambda: default(
          image=tf.constant(image[..., :1]))),
      'rgba': _error_of(lambda: default(image=tf.constant(
          np.concatenate([image, image[..., :1]], -1)))),
      'float': _error_of(lambda: default(
          image=tf.constant(image.astype(np.float32)))),
  }
  if requests_path:
    with open(requests_path) as f:
      requests = json.load(f)
    results['rest'] = [rest_server.handle_predict(signatures, r)
                       for r in requests]
  np.savez(os.path.join(out_dir, 'arrays.npz'), **arrays)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:5])

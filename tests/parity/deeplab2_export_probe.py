"""Loads a SavedModel in a fresh process and records its outputs.

  python tests/parity/deeplab2_export_probe.py SAVED_MODEL INPUTS.npz OUT \
      [--default_only]

INPUTS.npz holds `<kind>/<name>` entries: `single/*` uint8 [H, W, 3],
`batch/*` uint8 [B, H, W, 3] and `encoded/*` the bytes of an image file (as
a uint8 vector). Each goes to the signature for its kind (serving_default,
serving_batch, serving_encoded), or, with --default_only, to
serving_default, DeepLab2's only signature. Writes OUT.npz
(`<kind>/<name>/<output key>`) and OUT.json (signature names, their inputs
and outputs, and the error of every input a signature refused). Run by
test_export_parity.py for both exports; DeepLab2's is loaded in a DeepLab2
process (TF_USE_LEGACY_KERAS=1), though loading needs no DeepLab2 code.
"""

import argparse
import json
import os
import tempfile

import numpy as np
import tensorflow as tf

_SIGNATURE_OF_KIND = {
    'single': 'serving_default',
    'batch': 'serving_batch',
    'encoded': 'serving_encoded',
}


def _input_name(signature) -> str:
  (name,) = signature.structured_input_signature[1].keys()
  return name


def _describe(signature) -> dict:
  inputs = {name: f'{spec.dtype.name} {spec.shape}' for name, spec in
            signature.structured_input_signature[1].items()}
  outputs = {name: f'{spec.dtype.name} {spec.shape}' for name, spec in
             signature.structured_outputs.items()}
  return {'inputs': inputs, 'outputs': outputs}


def probe(saved_model: str, inputs_path: str, out: str,
          default_only: bool = False) -> None:
  """Runs every input through `saved_model`; writes OUT.npz and OUT.json."""
  signatures = tf.saved_model.load(saved_model).signatures
  report = {'signatures': {name: _describe(signatures[name])
                           for name in sorted(signatures)},
            'errors': {}}
  arrays = {}
  with np.load(inputs_path) as inputs:
    # Inputs a signature may refuse come last: in DeepLab2's SavedModel a
    # call that fails inside the graph makes later calls in the process fail
    # too (AlreadyExistsError on a per-step temporary variable).
    kinds = list(_SIGNATURE_OF_KIND)
    for entry in sorted(inputs.files,
                        key=lambda e: (kinds.index(e.split('/')[0]), e)):
      kind = entry.split('/')[0]
      value = inputs[entry]
      if kind == 'encoded':
        value = value.tobytes()
      name = 'serving_default' if default_only else _SIGNATURE_OF_KIND[kind]
      signature = signatures[name]
      try:
        outputs = signature(**{_input_name(signature): tf.constant(value)})
      except (TypeError, ValueError, tf.errors.OpError) as e:
        report['errors'][entry] = f'{type(e).__name__}: {e}'[:500]
        continue
      for key, output in outputs.items():
        arrays[f'{entry}/{key}'] = output.numpy()

  # Written to temporary names and renamed: a crash leaves no partial file.
  directory = os.path.dirname(os.path.abspath(out))
  with tempfile.NamedTemporaryFile(dir=directory, suffix='.npz',
                                   delete=False) as f:
    np.savez(f, **arrays)
  os.replace(f.name, out + '.npz')
  with tempfile.NamedTemporaryFile('w', dir=directory, suffix='.json',
                                   delete=False) as f:
    json.dump(report, f, indent=1, sort_keys=True)
  os.replace(f.name, out + '.json')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('saved_model')
  parser.add_argument('inputs')
  parser.add_argument('out')
  parser.add_argument('--default_only', action='store_true')
  args = parser.parse_args()
  probe(args.saved_model, args.inputs, args.out, args.default_only)


if __name__ == '__main__':
  main()

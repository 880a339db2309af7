"""Regenerates the committed `*_pb2.py` modules from the `.proto` sources.

Run from the repository root after editing a .proto file:

  python -m deeplab_kmax.config.generate          # rewrite stale modules
  python -m deeplab_kmax.config.generate --check  # exit 1 if any is stale
  python deeplab_kmax/config/generate.py          # same, without importing
                                                  # the package (works even
                                                  # when the modules are
                                                  # missing or broken)

The protos are compiled with the protoc bundled in grpcio-tools, with the
repository root as the import root, so the generated modules import each
other as `from deeplab_kmax.config import model_pb2`.

Protobuf version floor: generated code refuses to load on a protobuf runtime
older than the protoc that made it. The committed modules were made with
grpcio-tools 1.66.2 (protoc 27.2), so they load on protobuf >= 5.27.2
(MIN_PROTOBUF_RUNTIME). To keep that floor after a schema change, run the
generator with that protoc, e.g. from a scratch virtualenv:

  python -m venv /tmp/protoc27
  /tmp/protoc27/bin/pip install grpcio-tools==1.66.2
  python -m deeplab_kmax.config.generate \
      --protoc_python=/tmp/protoc27/bin/python

A newer grpcio-tools produces the same code with a higher version stamp; the
tests then ask you to either use the old protoc or raise the floor (here and
in setup.py) deliberately. Modules that differ only in that stamp are never
considered stale, so a newer local protoc does not churn them.
"""

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
# The directory that contains the top-level `deeplab_kmax` package.
IMPORT_ROOT = CONFIG_DIR.parents[1]
PACKAGE_PATH = CONFIG_DIR.relative_to(IMPORT_ROOT)
# Oldest protobuf runtime the committed modules must load on.
MIN_PROTOBUF_RUNTIME = (5, 27, 2)
# Lines of the gencode that only record which protoc made it.
_VERSION_STAMP = re.compile(
    r'^# Protobuf Python Version: .*$'
    r'|^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)',
    re.MULTILINE)


def proto_sources() -> List[pathlib.Path]:
  """The .proto files of the config package, sorted by name."""
  return sorted(CONFIG_DIR.glob('*.proto'))


def module_name(proto: pathlib.Path) -> str:
  return proto.stem + '_pb2.py'


def compile_protos(out_dir: pathlib.Path,
                   python: str = sys.executable) -> Dict[str, str]:
  """Runs protoc into `out_dir`; returns {module file name: source text}.

  Args:
    out_dir: Scratch directory for protoc's output.
    python: Interpreter whose grpcio-tools provides protoc.
  """
  sources = [str(PACKAGE_PATH / p.name) for p in proto_sources()]
  command = [python, '-m', 'grpc_tools.protoc',
             f'--proto_path={IMPORT_ROOT}', f'--python_out={out_dir}',
             *sources]
  result = subprocess.run(command, cwd=IMPORT_ROOT, capture_output=True,
                          text=True, check=False)
  if result.returncode != 0:
    hint = ''
    if "No module named 'grpc_tools'" in result.stderr:
      hint = (f'grpcio-tools is not installed for {python}: '
              'pip install grpcio-tools\n')
    raise RuntimeError(f'{hint}protoc failed ({" ".join(command)}):\n'
                       f'{result.stdout}{result.stderr}')
  generated_dir = out_dir / PACKAGE_PATH
  return {module_name(p): (generated_dir / module_name(p)).read_text()
          for p in proto_sources()}


def without_version_stamp(gencode: str) -> str:
  return _VERSION_STAMP.sub('', gencode)


def gencode_version(gencode: str) -> Tuple[int, int, int]:
  """The protobuf version a generated module requires at runtime."""
  match = re.search(r'^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)',
                    gencode, re.MULTILINE)
  if not match:
    raise ValueError('no "Protobuf Python Version" stamp in generated code')
  return tuple(int(part) for part in match.groups())


def stale_modules(generated: Dict[str, str]) -> List[str]:
  """Names of committed modules that differ from freshly generated ones.

  A module that differs only in the protoc version stamp is not stale: the
  committed one is kept, so its (lower) runtime requirement does not creep
  up just because someone has a newer grpcio-tools.
  """
  stale = []
  for name, text in generated.items():
    committed = CONFIG_DIR / name
    if (not committed.exists() or without_version_stamp(committed.read_text())
        != without_version_stamp(text)):
      stale.append(name)
  return stale


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true',
                      help='only report modules that are out of date')
  parser.add_argument('--protoc_python', default=sys.executable,
                      help='Python interpreter whose grpcio-tools to use')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    try:
      generated = compile_protos(pathlib.Path(tmp), python=args.protoc_python)
    except RuntimeError as e:
      print(e, file=sys.stderr)
      return 2
    stale = stale_modules(generated)
    if args.check:
      for name in stale:
        print(f'out of date: {CONFIG_DIR / name}')
      return 1 if stale else 0
    for name in stale:
      shutil.copyfile(pathlib.Path(tmp) / PACKAGE_PATH / name,
                      CONFIG_DIR / name)
      print(f'wrote {CONFIG_DIR / name}')
      version = gencode_version(generated[name])
      if version > MIN_PROTOBUF_RUNTIME:
        print(f'warning: {name} needs protobuf >= '
              f'{".".join(map(str, version))}, above MIN_PROTOBUF_RUNTIME; '
              'see this script\'s docstring')
  if not stale:
    print('all generated modules are up to date')
  return 0


if __name__ == '__main__':
  sys.exit(main())

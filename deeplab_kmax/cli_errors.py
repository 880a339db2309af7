"""How command-line tools report failures the user can fix.

A bad config, a missing file or a mismatched checkpoint is the user's to fix:
the tool prints the message alone (`ERROR: ...` on stderr) and exits with
`EXPECTED_ERROR_STATUS`. Anything else is a bug and keeps its full
traceback. `--verbose` shows the traceback for every error.

  from deeplab_kmax import cli_errors

  if __name__ == '__main__':
    cli_errors.run(main, expected=(MyInputError,))

`run` replaces `absl.app.run`; `guard` wraps a `main` for callers that run
it themselves.
"""

import functools
import sys
from typing import Callable, Sequence, Tuple, Type

from absl import app
from absl import flags

EXPECTED_ERROR_STATUS = 1
VERBOSE_FLAG = 'verbose'


class ExpectedError(Exception):
  """Base for errors that are the user's to fix (message, no traceback)."""


# Errors whose message says enough on its own, in every tool. A ValueError in
# general is not among them: from deep inside a library it is a bug.
COMMON_EXPECTED_ERRORS: Tuple[Type[BaseException], ...] = (
    ExpectedError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def define_verbose_flag() -> None:
  """Defines --verbose unless some module already did."""
  if VERBOSE_FLAG not in flags.FLAGS:
    flags.DEFINE_bool(VERBOSE_FLAG, False,
                      'Show the full traceback of every error, also of '
                      'expected ones (bad config, missing file, ...).')


def _verbose() -> bool:
  try:
    return bool(flags.FLAGS[VERBOSE_FLAG].value)
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


def message_of(error: BaseException) -> str:
  """The one-line-or-more report of an expected error."""
  text = str(error)
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])  # str(KeyError) adds quotes.
  return f'ERROR: {text or type(error).__name__}'


def guard(main: Callable[..., object],
          expected: Sequence[Type[BaseException]] = ()
          ) -> Callable[..., object]:
  """`main` that reports `expected` (plus COMMON_EXPECTED_ERRORS) errors as
  a message and exit status EXPECTED_ERROR_STATUS (traceback under
  --verbose)."""
  caught = tuple(COMMON_EXPECTED_ERRORS) + tuple(expected)

  @functools.wraps(main)
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except caught as e:
      if _verbose():
        raise
      sys.stdout.flush()
      print(message_of(e), file=sys.stderr)
      print('(run with --verbose for the traceback)', file=sys.stderr)
      sys.exit(EXPECTED_ERROR_STATUS)

  return guarded


def run(main: Callable[..., object],
        expected: Sequence[Type[BaseException]] = ()) -> None:
  """absl's app.run(main), with expected errors reported as messages."""
  define_verbose_flag()
  _list_package_flags_in_help()
  app.run(guard(main, expected))


def _list_package_flags_in_help() -> None:
  """Makes --help list the flags this package's modules define.

  absl's --help lists the key flags of the program file (sys.argv[0]); a
  console script's file is a generated wrapper that defines none, so the
  flags of `deeplab_kmax.predict` and the shared flag modules would only
  show under --helpfull.
  """
  program = sys.argv[0]
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.split('.')[0] == __name__.split('.')[0]:
      for flag in module_flags:
        flags.FLAGS.register_key_flag_for_module(program, flag)

"""The flags that say which model a program runs, and the rule they follow.

The predict CLI and the web page both take either one exported model (each
offers its own formats) or an experiment config with a checkpoint; the flag
names, their help and the "exactly one" rule live here once.
"""

from typing import Any, Mapping

from absl import flags

CONFIG_FILE = 'config_file'


def define_flags(exported: Mapping[str, str], config_instead_of: str) -> None:
  """Defines a string flag per exported format (name -> help) and
  --config_file, --checkpoint_path, --config_override.

  `config_instead_of` ends the --config_file help: what a config and
  checkpoint replace (e.g. 'an exported model').
  """
  for name, help_text in exported.items():
    flags.DEFINE_string(name, None, help_text)
  flags.DEFINE_string(CONFIG_FILE, None,
                      'Experiment config, with --checkpoint_path, instead of '
                      f'{config_instead_of}.')
  flags.DEFINE_string('checkpoint_path', None,
                      'Checkpoint (prefix or directory) for --config_file.')
  flags.DEFINE_multi_string('config_override', [],
                            'FIELD.PATH=VALUE config overrides (or textproto '
                            'snippets). Repeatable.')


def chosen_source(sources: Mapping[str, Any], checkpoint_path: Any) -> str:
  """The one flag of `sources` (flag name -> value, --config_file last) that
  is set; ValueError naming the flags unless exactly one is, or when
  --config_file comes without --checkpoint_path."""
  given = [name for name, value in sources.items() if value]
  if len(given) != 1:
    names = [f'--{name}' for name in sources if name != CONFIG_FILE]
    raise ValueError(f'Give exactly one of {", ".join(names)} or '
                     '--config_file (with --checkpoint_path).')
  if given[0] == CONFIG_FILE and not checkpoint_path:
    raise ValueError('--config_file needs --checkpoint_path.')
  return given[0]

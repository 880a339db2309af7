"""Command-line flags shared by the dataset converters (data/build_*_data.py).

Every converter takes the dataset root (named after the dataset), where to
write, how many shards, which splits, how many worker processes and what to
do with crowd segments; only the defaults differ.
"""

import dataclasses
import os
from typing import Any, Callable, List, Mapping

from absl import app
from absl import flags


@dataclasses.dataclass(frozen=True)
class ConverterFlags:
  root: flags.FlagHolder
  output_dir: flags.FlagHolder
  num_shards: flags.FlagHolder
  splits: flags.FlagHolder
  num_workers: flags.FlagHolder
  treat_crowd_as_ignore: flags.FlagHolder

  def splits_to_convert(self, image_folders: Mapping[str, str]) -> List[str]:
    """--splits, or else every split whose image folder (split -> path
    under the root) exists; a usage error when that leaves none."""
    root = self.root.value
    splits = self.splits.value or [
        split for split, folder in image_folders.items()
        if os.path.isdir(os.path.join(root, folder))]
    if not splits:
      folders = ', '.join(image_folders.values())
      raise app.UsageError(f'No split folder ({folders}) under {root}.')
    return splits

  def convert_release(self, release) -> None:
    """A converter's whole run for a `panoptic_conversion.ReleaseLayout`:
    finds the splits, lists each split's tasks and converts them."""
    root = self.root.value
    splits = self.splits_to_convert(release.image_folders)
    spec = release.label_spec(self.treat_crowd_as_ignore.value)
    self.convert({split: release.tasks_of(root, split) for split in splits},
                 spec)

  def run(self, main: Callable[[List[str]], Any]) -> None:
    """Runs a converter's `main` with the root and output flags required;
    conversion errors are reported as messages."""
    from deeplab_kmax import cli_errors  # pylint: disable=g-import-not-at-top
    from deeplab_kmax.data import panoptic_conversion  # pylint: disable=g-import-not-at-top
    flags.mark_flags_as_required([self.root.name, self.output_dir.name])
    cli_errors.run(main, expected=(panoptic_conversion.ConversionError,))

  def convert(self, tasks, spec) -> None:
    """Writes every split's shards (`panoptic_conversion.write_splits`)
    and prints a line per split."""
    from deeplab_kmax.data import panoptic_conversion  # pylint: disable=g-import-not-at-top
    written = panoptic_conversion.write_splits(
        tasks, spec, self.output_dir.value, self.num_shards.value,
        self.num_workers.value)
    for split, shards in written.items():
      print(f'{split}: {len(tasks[split])} images, {len(shards)} shards in '
            f'{self.output_dir.value}')


def define_converter_flags(root_flag: str, root_help: str,
                           num_shards: int) -> ConverterFlags:
  """Defines the common flags; `root_flag` is e.g. 'coco_root'."""
  return ConverterFlags(
      root=flags.DEFINE_string(root_flag, None, root_help),
      output_dir=flags.DEFINE_string('output_dir', None,
                                     'Where to write the TFRecord shards.'),
      num_shards=flags.DEFINE_integer('num_shards', num_shards,
                                      'Shards per split.', lower_bound=1),
      splits=flags.DEFINE_list(
          'splits', None, 'Splits to convert. Default: every split whose '
          'image folder exists.'),
      num_workers=flags.DEFINE_integer(
          'num_workers', min(8, os.cpu_count() or 1),
          'Processes decoding images and building labels.'),
      treat_crowd_as_ignore=flags.DEFINE_boolean(
          'treat_crowd_as_ignore', True,
          'Label crowd thing segments as void (DeepLab2 default).'),
  )


def run_release_converter(release) -> None:
  """The main program of a converter whose release is described by a
  `panoptic_conversion.ReleaseLayout` (data/build_cityscapes_data.py,
  data/build_ade20k_data.py)."""
  converter = define_converter_flags(release.root_flag, release.root_help,
                                     release.num_shards)
  converter.run(lambda argv: converter.convert_release(release))

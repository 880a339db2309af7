"""Effective values of options whose DeepLab2 default depends on the dataset.

DeepLab2 hard-codes some kMaX-DeepLab settings by dataset name instead of
reading them from the config. deeplab_kmax exposes them as config fields; a
field left unset resolves to DeepLab2's choice, so the published configs keep
their published behaviour.
"""

from deeplab_kmax.config import config_pb2

# DeepLab2's transformer-decoder drop-path keep probability per dataset family.
# Datasets that match none of them get the COCO setting, like in DeepLab2.
_DECODER_KEEP_PROB_BY_DATASET = (('cityscapes', 0.8), ('coco', 0.8),
                                 ('ade20k', 1.0))
_DECODER_KEEP_PROB_OTHERWISE = 0.8


def transformer_decoder_drop_path_keep_prob(
    model_options: config_pb2.ModelOptions, dataset_name: str) -> float:
  """Keep probability for drop path inside the kMaX transformer decoder.

  Args:
    model_options: The experiment's model options.
    dataset_name: Name of the dataset the model is built for (the train
      dataset when training), e.g. "coco_panoptic".

  Returns:
    `max_deeplab.transformer_decoder_drop_path_keep_prob` when the config
    sets it, otherwise the value DeepLab2 uses for `dataset_name`.
  """
  max_deeplab = model_options.max_deeplab
  if max_deeplab.HasField('transformer_decoder_drop_path_keep_prob'):
    return max_deeplab.transformer_decoder_drop_path_keep_prob
  for family, keep_prob in _DECODER_KEEP_PROB_BY_DATASET:
    if family in dataset_name:
      return keep_prob
  return _DECODER_KEEP_PROB_OTHERWISE

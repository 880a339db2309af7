"""Names of the clustering-family choices (no TensorFlow, so configs can
validate them): how the centres read the pixels and which decoder block."""

from typing import Tuple

CLUSTER_ARGMAX = 'cluster_argmax'
CLUSTER_SOFTMAX = 'cluster_softmax'
SPATIAL_SOFTMAX = 'spatial_softmax'
PIXEL_CLUSTER_INTERACTIONS = (CLUSTER_ARGMAX, CLUSTER_SOFTMAX, SPATIAL_SOFTMAX)
# Interactions that normalise over the cluster axis (an assignment per pixel).
CLUSTER_AXIS_INTERACTIONS = (CLUSTER_ARGMAX, CLUSTER_SOFTMAX)

KMAX = 'kmax'
CMT = 'cmt'
CLUSTERFORMER = 'clusterformer'
CLUSTER_DECODERS = (KMAX, CMT, CLUSTERFORMER)


def check_choice(value: str, allowed: Tuple[str, ...], field: str) -> str:
  """Returns `value` or raises a ValueError naming the field and the choices."""
  if value not in allowed:
    raise ValueError(f'{field} is {value!r}; expected one of '
                     f'{", ".join(repr(a) for a in allowed)}.')
  return value

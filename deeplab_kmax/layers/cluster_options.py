"""Names of the clustering-family choices (no TensorFlow, so configs can
validate them): how the centres read the pixels and which decoder block."""

from typing import Dict, Tuple, Union

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

# The variants beside kMaX (cluster_argmax, kmax decoder) as the fields of
# model_options.max_deeplab that select them; the shipped
# configs/*/*_<variant>.textproto set exactly these.
VARIANTS: Dict[str, Dict[str, Union[str, int]]] = {
    CLUSTER_SOFTMAX: {'pixel_cluster_interaction': CLUSTER_SOFTMAX},
    SPATIAL_SOFTMAX: {'pixel_cluster_interaction': SPATIAL_SOFTMAX},
    CMT: {'cluster_decoder': CMT, 'pixel_cluster_interaction': CLUSTER_SOFTMAX},
    CLUSTERFORMER: {'cluster_decoder': CLUSTERFORMER,
                    'clusterformer_iterations': 3},
}


def check_choice(value: str, allowed: Tuple[str, ...], field: str) -> str:
  """Returns `value` or raises a ValueError naming the field and the choices."""
  if value not in allowed:
    raise ValueError(f'{field} is {value!r}; expected one of '
                     f'{", ".join(repr(a) for a in allowed)}.')
  return value

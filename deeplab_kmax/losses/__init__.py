"""kMaX-DeepLab training losses (DeepLab2-compatible) and in-graph matching."""

from deeplab_kmax.losses.hungarian_matching import deeplab2_assignment
from deeplab_kmax.losses.hungarian_matching import linear_sum_assignment
from deeplab_kmax.losses.kmax_loss import auxiliary_loss_name
from deeplab_kmax.losses.kmax_loss import KMaXLoss
from deeplab_kmax.losses.mask_targets import build_mask_targets
from deeplab_kmax.losses.mask_targets import MaskTargets

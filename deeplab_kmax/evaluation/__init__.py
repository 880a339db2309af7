"""Dataset metrics: panoptic quality and semantic mIoU (numpy, streaming)."""

from deeplab_kmax.evaluation.panoptic_quality import PanopticQuality
from deeplab_kmax.evaluation.panoptic_quality import PanopticQualityResult
from deeplab_kmax.evaluation.semantic_iou import SemanticIoU
from deeplab_kmax.evaluation.semantic_iou import SemanticIoUResult

__all__ = [
    'PanopticQuality',
    'PanopticQualityResult',
    'SemanticIoU',
    'SemanticIoUResult',
]

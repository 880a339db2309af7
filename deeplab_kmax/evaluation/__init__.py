"""Dataset metrics (numpy, streaming): panoptic quality (DeepLab2's and the
official script's), semantic mIoU, instance AP (pycocotools); raw prediction
files for offline scoring."""

from deeplab_kmax.evaluation.instance_ap import InstanceAveragePrecision
from deeplab_kmax.evaluation.official_panoptic_quality import OfficialPanopticQuality
from deeplab_kmax.evaluation.panoptic_quality import PanopticQuality
from deeplab_kmax.evaluation.panoptic_quality import PanopticQualityResult
from deeplab_kmax.evaluation.prediction_writer import RawPredictionWriter
from deeplab_kmax.evaluation.semantic_iou import SemanticIoU
from deeplab_kmax.evaluation.semantic_iou import SemanticIoUResult

__all__ = [
    'InstanceAveragePrecision',
    'OfficialPanopticQuality',
    'PanopticQuality',
    'PanopticQualityResult',
    'RawPredictionWriter',
    'SemanticIoU',
    'SemanticIoUResult',
]

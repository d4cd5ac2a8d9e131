"""SAHI's sliced inference around a sodlab detector (the bench's ``sahi`` row).

Slices plus one full-image pass (SAHI's standard prediction, for the large objects), merged by
class-wise NMS at IoU 0.5: NMS, not SAHI's default GREEDYNMM, because merging boxes enlarges
them, which costs AP at strict IoU; SAHI itself switches to NMS/IOU at the low confidence
thresholds AP needs.
"""
from __future__ import annotations

import numpy as np
import torch

POSTPROCESS = dict(postprocess_type="NMS", postprocess_match_metric="IOU", postprocess_match_threshold=0.5)


def sahi_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sahi")
    except PackageNotFoundError:  # the sahi row then fails with the import error
        return None


def sahi_detection_model(model: torch.nn.Module, class_names: list[str], device: torch.device):
    """SAHI's torchvision wrapper around our detector (labels 1..C are its category ids).

    No ``image_size``: the detector's own transform resizes each slice to its min_size, which is
    SAHI's point (a 128 px slice of a 256 px image is seen at 256 px: small objects at x2).
    The confidence threshold is 0: the detector's own box_score_thresh already applies.
    """
    from sahi.models.torchvision import TorchVisionDetectionModel

    mapping = {str(label): name for label, name in enumerate(class_names) if label > 0}
    return TorchVisionDetectionModel(model=model, device=str(device), confidence_threshold=0.0,
                                     category_mapping=mapping, load_at_init=True)


def sahi_predict(detection_model, image: np.ndarray, slice_size: int, overlap: float) -> dict[str, torch.Tensor]:
    """Sliced prediction on one HWC uint8 image -> torchvision detection format, image pixels."""
    from sahi.predict import get_sliced_prediction

    with torch.no_grad():  # SAHI's torchvision wrapper calls the model with autograd on
        result = get_sliced_prediction(image, detection_model, slice_height=slice_size, slice_width=slice_size,
                                       overlap_height_ratio=overlap, overlap_width_ratio=overlap,
                                       perform_standard_pred=True, postprocess_class_agnostic=False, verbose=0,
                                       force_postprocess_type=True, **POSTPROCESS)
    predictions = result.object_prediction_list
    return {"boxes": torch.tensor([p.bbox.to_xyxy() for p in predictions], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([p.category.id for p in predictions], dtype=torch.int64),
            "scores": torch.tensor([p.score.value for p in predictions], dtype=torch.float32)}

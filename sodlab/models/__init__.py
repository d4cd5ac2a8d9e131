"""Models: torchvision Faster R-CNN baselines, the SR generator G, the multi-task discriminator D."""
from __future__ import annotations

from sodlab.models.detector import DetectorConfig, build_detector, preset


def build_model(cfg, num_classes: int):
    """The model a TrainConfig names: a Faster R-CNN baseline, or the SR detector around one."""
    detector = build_detector(cfg.detector, num_classes, image_scale=cfg.input_scale)
    if not cfg.is_sr:
        return detector
    from sodlab.models.sr_detector import SRDetector

    return SRDetector(detector, num_classes, cfg.sr)

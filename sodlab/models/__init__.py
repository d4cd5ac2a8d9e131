"""Models: torchvision Faster R-CNN baselines, the SR generator G, the multi-task discriminator D."""
from __future__ import annotations

import torch

from sodlab.config import DETECTOR_TRUNKS
from sodlab.models.detector import DetectorConfig, build_detector, preset


def fast_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype the hardware runs natively: float16 on CUDA, bfloat16 on a CPU with
    native bf16 (AVX-512 BF16 / AMX), None (float32) on other CPUs, where bf16 is emulated and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def build_model(cfg, num_classes: int):
    """The model a TrainConfig names: a Faster R-CNN baseline, or the SR detector around one.

    The one place a config becomes constructor arguments (detectron2's ``from_config`` idea):
    the modules themselves take plain values.
    """
    detector = build_detector(cfg.detector, num_classes, image_scale=cfg.input_scale, resize_in_training=not cfg.crop)
    if not cfg.is_sr:
        return detector
    from sodlab.models.discriminator import DetectorTrunkDiscriminator, MultiTaskDiscriminator
    from sodlab.models.generator import SRGenerator
    from sodlab.models.sr_detector import SRDetector

    sr, sampling = cfg.sr, cfg.sr_train
    # G and D draw their initial weights from a fork of the global RNG, seeded from it: building
    # them leaves the global stream (which the data flips and the detector's RoI samplers draw
    # from) untouched, so in the joint schedule the detector trains exactly as the baseline of
    # the same seed does, and an SR row differs from its baseline by the SR branch alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1)
        generator = (SRGenerator(sr.generator_channels, sr.generator_blocks, sr.scale,
                                 upsample_channels=sr.generator_upsample_channels) if sr.use_generator else None)
        tune_from = sampling.discriminator_tune_from if sr.discriminator_trunk == "detector-tuned" else None
        discriminator = (DetectorTrunkDiscriminator(detector, sr.context, tune_from=tune_from)
                         if sr.discriminator_trunk in DETECTOR_TRUNKS
                         else MultiTaskDiscriminator(num_classes, trunk=sr.discriminator_trunk))
    return SRDetector(detector, generator, discriminator, lr_size=sr.lr_size, scale=sr.scale, context=sr.context,
                      area_threshold=sr.area_threshold, sr_scope=sr.sr_scope, large_rois=sr.large_rois,
                      gate_top_k=sr.gate_top_k, gate_rank=sr.gate_rank, gate_share_iou=sr.gate_share_iou,
                      fusion=sr.fusion, amp=sr.amp,
                      patches=sr.patches, boxes_from=sr.boxes_from, rois_per_image=sampling.rois_per_image,
                      hr_rois_per_image=sampling.hr_rois_per_image, fg_fraction=sampling.fg_fraction,
                      gt_jitter=sampling.gt_jitter, jitters_per_gt=sampling.jitters_per_gt)

"""Faster R-CNN builders: the paper's backbones (ResNet-50/101 with and without FPN) and a CPU preset.

Everything is torchvision's own Faster R-CNN; this module only chooses the backbone, the anchors
and the sampling sizes. A preset is a plain ``DetectorConfig``; every knob is a visible field.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.ops import misc as misc_nn_ops

from sodlab.config import PRESETS, DetectorConfig, preset  # noqa: F401 (the presets' builders live here)
from sodlab.models.roi_pool import SparseMultiScaleRoIAlign

RESNETS = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}


def imagenet_weights(backbone: str):
    """The ImageNet weights enum for ``backbone``, after checking they are already on disk.

    This machine has no internet, so a silent download attempt would hang or fail deep inside
    torch.hub; instead we look in the torch cache and say exactly what is missing.
    """
    weights = RESNETS[backbone][1]
    filename = os.path.basename(weights.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"ImageNet weights for {backbone} are not in the torch cache ({path}). "
            f"Copy {filename} (from {weights.url}) there, or train from scratch with pretrained=False."
        )
    return weights


def _resnet(cfg: DetectorConfig) -> nn.Module:
    if cfg.backbone not in RESNETS:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of {sorted(RESNETS)}")
    builder, _ = RESNETS[cfg.backbone]
    if cfg.pretrained:
        # Pretrained BN statistics are frozen, as in torchvision's detection builders.
        return builder(weights=imagenet_weights(cfg.backbone), norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    return builder(weights=None, norm_layer=nn.BatchNorm2d)


def _freeze_early_layers(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` ResNet stages, as torchvision's extractor."""
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if name.split(".")[0] not in trainable:
            parameter.requires_grad_(False)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class C4Backbone(nn.Sequential):
    """ResNet stem + layer1..layer3: one stride-16 feature map (the paper's non-FPN rows)."""

    def __init__(self, body: resnet.ResNet):
        super().__init__(body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2, body.layer3)
        self.out_channels = body.layer3[-1].conv1.in_channels


def build_detector(cfg: DetectorConfig, num_classes: int, image_scale: float = 1.0,
                   resize_in_training: bool = True) -> FasterRCNN:
    """torchvision Faster R-CNN for ``num_classes`` classes (background included).

    ``image_scale`` multiplies min_size/max_size, so an input already upscaled x2 by the dataset
    (the "upscale" baseline) is not resized back down by the detector's own transform.
    ``resize_in_training=False``: training batches are taken as they come (random crops already
    at the input scale, TrainConfig.crop); evaluation still resizes to min_size/max_size.
    """
    body = _resnet(cfg)
    if cfg.pretrained:  # from scratch every layer trains: freezing random weights only hurts
        _freeze_early_layers(body, cfg.trainable_layers)
    sizes = tuple(tuple(level) for level in cfg.anchor_sizes)
    if len({len(level) for level in sizes}) != 1:
        raise ValueError(f"every level needs the same number of anchor sizes (one RPN head), got {sizes}")
    if cfg.fpn:
        # BackboneWithFPN directly (not resnet_fpn_backbone), which hard-codes 256 FPN channels.
        stage_channels = [body.inplanes // 8 * 2**i for i in range(4)]
        backbone = BackboneWithFPN(
            body,
            return_layers={f"layer{k + 1}": str(k) for k in range(4)},
            in_channels_list=stage_channels,
            out_channels=cfg.fpn_channels,
            norm_layer=_group_norm if cfg.fpn_norm else None,
        )
        num_levels = 5  # layer1..layer4 + the max-pool level
        if len(sizes) != num_levels:
            raise ValueError(f"FPN needs anchor sizes for {num_levels} levels, got {sizes}")
        anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * num_levels)
        roi_pool = SparseMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    else:
        backbone = C4Backbone(body)
        anchors = AnchorGenerator((sum(sizes, ()),), (tuple(cfg.aspect_ratios),))
        roi_pool = SparseMultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)

    if cfg.box_head == "2mlp":
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, cfg.box_representation_size)
    elif cfg.box_head == "4conv1fc":
        box_head = FastRCNNConvFCHead((backbone.out_channels, 7, 7), [backbone.out_channels] * 4,
                                      [cfg.box_representation_size], norm_layer=_group_norm)
    else:
        raise ValueError(f"unknown box_head {cfg.box_head!r}; choose 2mlp or 4conv1fc")
    return FasterRCNN(
        backbone,
        min_size=round(cfg.min_size * image_scale),
        max_size=round(cfg.max_size * image_scale),
        rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_representation_size, num_classes),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        _skip_resize=not resize_in_training,
    )

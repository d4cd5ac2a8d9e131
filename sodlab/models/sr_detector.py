"""The paper's detector: a torchvision Faster R-CNN whose small proposals go through G and D.

Inference (``SRDetector.forward`` in eval mode), step by step as torchvision's GeneralizedRCNN:
transform -> backbone -> RPN proposals -> box head logits and deltas for every proposal; then
the proposals whose area (in input-image pixels) is under ``area_threshold`` are cut from the
image as LR patches, super-resolved by G, and scored by D. D's class logits and its box deltas
t_SR (torchvision's BoxCoder encoding, relative to the same proposal) replace the box head's for
those proposals (``fusion="replace"``) or are averaged with them (``fusion="mean"``), and
torchvision's own ``postprocess_detections`` (softmax, decode, clip, per-class NMS) finishes.
The output is torchvision's detection format, so evaluation, FiftyOne and SAHI work unchanged.

Training (``training_forward``) returns the detector's losses plus a batch of sampled small RoIs
(proposals and jittered ground truth) as (z_LR, z_HR, labels u_i, targets t*); the training loop
then takes the D step and the G step on it (sodlab/train.py).

Patches are always cut from the original [0, 1] images (boxes mapped back from the detector's
resized frame); BoxCoder deltas are invariant to a per-axis rescaling of the proposal, so D's
deltas computed in the original frame apply unchanged to the resized proposals.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_area, box_iou

from sodlab.losses import GANLossWeights
from sodlab.models.discriminator import MultiTaskDiscriminator
from sodlab.models.generator import SRGenerator
from sodlab.patches import DEFAULT_CONTEXT, lr_hr_pairs, lr_patches


@dataclass
class SRConfig:
    # patches
    lr_size: int = 16  # z_LR side; G outputs lr_size * scale
    scale: int = 4
    context: float = DEFAULT_CONTEXT  # relative margin around each RoI
    hr_source: str = "image"  # image: SOD-MTGAN's protocol (HR = RoI at hr_size, LR = HR reduced) | twin: exact xk twins
    # which proposals go through G and D
    area_threshold: float = 32.0**2  # input-image px^2 (COCO's "small")
    sr_scope: str = "small"  # small | all
    fusion: str = "replace"  # replace: D's scores/boxes stand in for the box head's | mean: averaged
    # the variant switches (one field per ablation row)
    use_generator: bool = True  # False = sr-no-recon: D sees bilinear-upsampled patches, there is no G
    boxes_from: str = "discriminator"  # detector = sr-cls-only: SR serves classification only
    weights: GANLossWeights = field(default_factory=GANLossWeights)
    # training
    schedule: str = "joint"  # joint: detector, D and G every step | staged: detector frozen (init_from a run)
    rois_per_image: int = 16
    # RoIs large enough for a real HR target (jittered ground truth, any size): with
    # hr_source="image" small RoIs never have one, so without these L_MSE, L_TV and D's real term
    # would get no data. Their LR patch is their HR patch reduced: SOD-MTGAN's protocol.
    hr_rois_per_image: int = 4
    # Fast R-CNN's 25% foreground, closer to what D scores at inference (every small proposal,
    # nearly all background). The 3-seed runs used 25%; 50% was not compared with it in isolation.
    fg_fraction: float = 0.25
    gt_jitter: float = 0.15  # relative shift/scale of the jittered ground-truth RoIs
    jitters_per_gt: int = 2
    lr_generator: float = 1e-4  # Adam, SRGAN's learning rate
    # D learns a classifier and a box regressor from scratch besides real/fake: at SRGAN's 1e-4 its
    # class loss fell only from 1.92 to 1.57 in 300 CPU iterations; the 3-seed runs used 5e-4.
    lr_discriminator: float = 5e-4
    # model size (compact for the CPU preset; the paper's scale is trunk resnet50/101, channels 64)
    generator_channels: int = 32
    generator_blocks: int = 4
    discriminator_trunk: str = "compact"

    def __post_init__(self):
        if isinstance(self.weights, dict):
            self.weights = GANLossWeights(**self.weights)
        for name, allowed in (("hr_source", ("image", "twin")), ("sr_scope", ("small", "all")),
                              ("fusion", ("replace", "mean")), ("boxes_from", ("discriminator", "detector")),
                              ("schedule", ("joint", "staged"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SRConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")


def sr_config_for(method: str, base: SRConfig | None = None) -> SRConfig:
    """The SRConfig of a --method name: each ablation changes exactly one switch of ``base``."""
    base = base or SRConfig()
    w = base.weights
    variants = {
        "sr": {},
        "sr-no-recon": {"use_generator": False},
        "sr-no-adv": {"weights": dataclasses.replace(w, adv=0.0, d_adv=0.0)},
        "sr-no-cls": {"weights": dataclasses.replace(w, cls=0.0, d_cls=0.0)},
        "sr-cls-only": {"boxes_from": "detector", "weights": dataclasses.replace(w, reg=0.0, d_reg=0.0)},
    }
    if method not in variants:
        raise ValueError(f"{method!r} is not an SR method; choose one of {sorted(variants)}")
    return dataclasses.replace(base, **variants[method])


def _at_least_a_pixel(boxes: Tensor) -> Tensor:
    return (boxes[:, 2:] - boxes[:, :2] >= 1).all(dim=1)


class SRDetector(nn.Module):
    """Faster R-CNN + reconstruction generator G + multi-task discriminator D."""

    def __init__(self, detector: FasterRCNN, num_classes: int, cfg: SRConfig):
        super().__init__()
        self.detector = detector
        self.cfg = cfg
        # G and D draw their initial weights from a fork of the global RNG, seeded from it: building
        # them leaves the global stream (which the data flips and the detector's RoI samplers draw
        # from) untouched, so in the joint schedule the detector trains exactly as the baseline of
        # the same seed does, and an SR row differs from its baseline by the SR branch alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + 1)
            self.generator = (SRGenerator(cfg.generator_channels, cfg.generator_blocks, cfg.scale)
                              if cfg.use_generator else None)
            self.discriminator = MultiTaskDiscriminator(num_classes, trunk=cfg.discriminator_trunk)
        # The box head's coder (weights 10, 10, 5, 5), so t_SR and the head's deltas are interchangeable.
        self.box_coder = detector.roi_heads.box_coder
        # RoI sampling for the SR branch draws from its own generator, so adding the branch leaves
        # the detector's random stream (and so its weights, in the joint schedule) untouched.
        self.sampling_rng = torch.Generator().manual_seed(0)

    # -- the reconstruction module --------------------------------------------------------------
    def super_resolve(self, lr: Tensor) -> Tensor:
        """G(z_LR), or plain bilinear upsampling without the reconstruction module (sr-no-recon)."""
        if self.generator is None:
            return F.interpolate(lr, scale_factor=self.cfg.scale, mode="bilinear", align_corners=False)
        return self.generator(lr)

    def _selected(self, boxes: Tensor) -> Tensor:
        """Which boxes (original-image pixels) the SR branch serves."""
        if self.cfg.sr_scope == "all":
            return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        return box_area(boxes) < self.cfg.area_threshold

    # -- detector internals, as in GeneralizedRCNN.forward -----------------------------------------
    def _proposals(self, images: list[Tensor], targets=None):
        det = self.detector
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets_t = det.transform(images, targets)
        features = det.backbone(image_list.tensors)
        if isinstance(features, Tensor):  # a single C4 map (non-FPN presets), as GeneralizedRCNN wraps it
            features = OrderedDict([("0", features)])
        proposals, rpn_losses = det.rpn(image_list, features, targets_t)
        return image_list, targets_t, features, proposals, rpn_losses, original_sizes

    @staticmethod
    def _to_original(boxes: list[Tensor], resized_sizes, original_sizes) -> list[Tensor]:
        out = []
        for b, (rh, rw), (oh, ow) in zip(boxes, resized_sizes, original_sizes):
            ratio = torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh], device=b.device)
            out.append(b * ratio)
        return out

    # -- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score_proposals(self, images: list[Tensor]) -> dict:
        """Every proposal's class logits and box deltas, with the SR branch's in place for small ones.

        Returns the proposals (detector frame and original-image pixels), the box head's logits
        and deltas, the final ones after replacement/fusion, and ``sr_mask`` (which proposals went
        through G and D). Visualisation and tests read this; ``forward`` post-processes it.
        """
        det = self.detector
        image_list, _, features, proposals, _, original_sizes = self._proposals(images)
        heads = det.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
        head_logits, head_deltas = heads.box_predictor(box_features)

        rois = self._to_original(proposals, image_list.image_sizes, original_sizes)
        chosen = [self._selected(r) for r in rois]
        sr_mask = torch.cat(chosen)
        class_logits, box_regression = head_logits.clone(), head_deltas.clone()
        if sr_mask.any():
            lr = lr_patches(images, [r[c] for r, c in zip(rois, chosen)], self.cfg.lr_size, self.cfg.context)
            d = self.discriminator(self.super_resolve(lr))
            if self.cfg.fusion == "replace":
                class_logits[sr_mask] = d["cls"]
            else:  # average the two classifiers' probabilities
                mean = (head_logits[sr_mask].softmax(-1) + d["cls"].softmax(-1)) / 2
                class_logits[sr_mask] = mean.clamp_min(1e-12).log()
            if self.cfg.boxes_from == "discriminator":
                box_regression[sr_mask] = d["box"] if self.cfg.fusion == "replace" else (head_deltas[sr_mask] + d["box"]) / 2
        return {"image_list": image_list, "original_sizes": original_sizes, "proposals": proposals, "rois": rois,
                "head_logits": head_logits, "head_deltas": head_deltas, "class_logits": class_logits,
                "box_regression": box_regression, "sr_mask": sr_mask}

    @torch.no_grad()
    def forward(self, images: list[Tensor], targets=None):
        if self.training:
            raise RuntimeError("SRDetector.forward is inference; training uses training_forward()")
        s = self.score_proposals(images)
        sizes = s["image_list"].image_sizes
        boxes, scores, labels = self.detector.roi_heads.postprocess_detections(
            s["class_logits"], s["box_regression"], s["proposals"], sizes)
        detections = [{"boxes": b, "labels": lab, "scores": sc} for b, sc, lab in zip(boxes, scores, labels)]
        return self.detector.transform.postprocess(detections, sizes, s["original_sizes"])

    # -- training ----------------------------------------------------------------------------------
    def training_forward(self, images: list[Tensor], targets: list[dict], hr_images: list[Tensor] | None = None):
        """Detector losses (empty in the staged schedule) and the SR branch's sampled RoI batch."""
        det = self.detector
        if self.cfg.schedule == "staged":
            # The detector is frozen: its proposals come from the eval-mode RPN, with no losses.
            det.eval()
            with torch.no_grad():
                image_list, _, _, proposals, _, original_sizes = self._proposals(images)
            losses = {}
        else:
            image_list, targets_t, features, proposals, rpn_losses, original_sizes = self._proposals(images, targets)
            _, roi_losses = det.roi_heads(features, proposals, image_list.image_sizes, targets_t)
            losses = {**rpn_losses, **roi_losses}
        proposals = self._to_original([p.detach() for p in proposals], image_list.image_sizes, original_sizes)
        twins = hr_images is not None and self.cfg.hr_source == "twin"
        rois, labels, regression_targets = self.sample_rois(proposals, targets, self.cfg.scale if twins else 1)
        lr, hr, hr_valid = lr_hr_pairs(
            images, rois, self.cfg.lr_size, self.cfg.scale, self.cfg.context,
            hr_images=hr_images if twins else None)
        batch = {"lr": lr, "hr": hr, "hr_valid": hr_valid, "labels": torch.cat(labels),
                 "regression_targets": torch.cat(regression_targets), "rois": rois}
        return losses, batch

    def _jitter(self, boxes: Tensor, copies: int) -> Tensor:
        """``copies`` randomly shifted and rescaled versions of each box (relative ``gt_jitter``)."""
        g, j = self.sampling_rng, self.cfg.gt_jitter
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(copies, 1)
        centre = (boxes[:, 2:] + boxes[:, :2]).repeat(copies, 1) / 2
        shift = torch.rand(centre.shape, generator=g).to(wh.device) * 2 - 1
        stretch = torch.rand(wh.shape, generator=g).to(wh.device) * 2 - 1
        centre = centre + shift * j * wh
        wh = wh * torch.exp(stretch * j)
        return torch.cat([centre - wh / 2, centre + wh / 2], dim=1)

    def sample_rois(self, proposals: list[Tensor], targets: list[dict], hr_scale: int = 1):
        """RoIs for the SR branch, labelled by IoU >= 0.5 with the ground truth.

        Up to ``rois_per_image`` small ones per image (proposals plus jittered ground truth),
        ``fg_fraction`` of them foreground where there are enough, as Fast R-CNN samples its RoIs;
        plus up to ``hr_rois_per_image`` jittered ground truth boxes big enough for a real HR
        target in a grid ``hr_scale`` x finer than the image. Returns per-image rois, labels u_i
        and regression targets t*.
        """
        cfg, g = self.cfg, self.sampling_rng
        hr_size = cfg.lr_size * cfg.scale
        out_rois, out_labels, out_targets = [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].as_subclass(Tensor), target["labels"]
            gt_small = gt_boxes[self._selected(gt_boxes)]
            candidates = torch.cat([props, gt_small, self._jitter(gt_small, cfg.jitters_per_gt)])
            candidates = candidates[self._selected(candidates) & _at_least_a_pixel(candidates)]
            side = (gt_boxes[:, 2:] - gt_boxes[:, :2]).min(dim=1).values
            hr_capable = self._jitter(gt_boxes[side * (1 + 2 * cfg.context) * hr_scale >= hr_size], 1)
            hr_capable = hr_capable[_at_least_a_pixel(hr_capable)]
            hr_capable = hr_capable[torch.randperm(len(hr_capable), generator=g)[:cfg.hr_rois_per_image].to(hr_capable.device)]
            num_small = len(candidates)
            candidates = torch.cat([candidates, hr_capable])

            if len(gt_boxes):
                iou, matched = box_iou(candidates, gt_boxes).max(dim=1)
                labels = torch.where(iou >= 0.5, gt_labels[matched], torch.zeros_like(matched))
                matched_boxes = gt_boxes[matched]
            else:
                labels = torch.zeros(len(candidates), dtype=torch.int64, device=candidates.device)
                matched_boxes = candidates
            is_small = torch.arange(len(candidates), device=labels.device) < num_small
            fg, bg = torch.where((labels > 0) & is_small)[0], torch.where((labels == 0) & is_small)[0]
            num_fg = min(len(fg), round(cfg.rois_per_image * cfg.fg_fraction))
            num_bg = min(len(bg), cfg.rois_per_image - num_fg)
            keep = torch.cat([fg[torch.randperm(len(fg), generator=g)[:num_fg].to(fg.device)],
                              bg[torch.randperm(len(bg), generator=g)[:num_bg].to(bg.device)],
                              torch.where(~is_small)[0]])
            rois = candidates[keep]
            out_rois.append(rois)
            out_labels.append(labels[keep])
            out_targets.append(self.box_coder.encode_single(matched_boxes[keep], rois))
        return out_rois, out_labels, out_targets

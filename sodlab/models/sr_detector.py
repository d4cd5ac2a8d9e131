"""The paper's detector: a torchvision Faster R-CNN whose small proposals go through G and D.

Inference (``SRDetector.forward`` in eval mode), step by step as torchvision's GeneralizedRCNN:
transform -> backbone -> RPN proposals -> box head logits and deltas for every proposal; then
the proposals whose area (in input-image pixels) is under ``area_threshold`` are cut from the
image as LR patches, super-resolved by G, and scored by D (with ``large_rois="native"``, those too
large for the LR patch are cut at D's patch size instead and skip G). D's class logits and its box
deltas t_SR (torchvision's BoxCoder encoding, relative to the same proposal) replace the box head's for
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

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_area, box_iou, nms

from sodlab.models import fast_autocast_dtype
from sodlab.models.roi_pool import set_levels
from sodlab.patches import DEFAULT_CONTEXT, fits_lr_patch, lr_hr_pairs, lr_patches


def _at_least_a_pixel(boxes: Tensor) -> Tensor:
    return (boxes[:, 2:] - boxes[:, :2] >= 1).all(dim=1)


class SRDetector(nn.Module):
    """Faster R-CNN + reconstruction generator G + multi-task discriminator D.

    Args:
        detector: the torchvision Faster R-CNN whose small proposals the branch serves.
        generator: G, or None for plain bilinear upsampling (sr-no-recon).
        discriminator: D (real/fake, class, box).
        lr_size, scale, context: z_LR's side, G's factor, the margin around each RoI.
        area_threshold, sr_scope: which proposals go through G and D ("small": area under the
            threshold, in original-image px^2; "all").
        large_rois: RoIs whose context box does not fit the LR patch: "generator" (cut at lr_size,
            so downsampled, and super-resolved like the others) or "native" (cut at D's patch size,
            lr_size * scale, and judged by D as they are: G serves the low-resolution RoIs only).
        gate_top_k: at inference, only k proposals in scope per image go through G and D (0: all of them).
        gate_rank: which k (``gate_priority``): those the box head finds most likely foreground
            ("foreground"), the RPN's likeliest objects ("objectness"), or the best by the sum of
            the two ranks ("both").
        gate_share_iou: t > 0: the gate sends one proposal per object (NMS at IoU t in its rank
            order), and the small proposals it does not send take the answers of the sent one they
            overlap most above t (``_gate``, ``shared_answers``). 0: the plain top k.
        fusion: "replace" (D's answers stand in for the box head's) or "mean".
        amp: at inference, G and D under autocast where the hardware runs it natively
            (``fast_autocast_dtype``: bf16 on a CPU with native bf16, float16 on CUDA).
        patches: what D judges at inference: "generator" (G(z_LR); bilinear without G),
            "bilinear" (G bypassed) or "twin" (the box cut from the image's exact xk twin, an
            oracle G; inference then needs ``hr_images``). Measures how much G matters.
        boxes_from: "discriminator" (t_SR replaces/joins the head's deltas) or "detector".
        rois_per_image, hr_rois_per_image, fg_fraction, gt_jitter, jitters_per_gt: the training
            RoI sample of ``sample_rois``, as torchvision's RoIHeads takes its sampler's sizes.
    """

    def __init__(self, detector: FasterRCNN, generator: nn.Module | None, discriminator: nn.Module, *,
                 lr_size: int = 16, scale: int = 4, context: float = DEFAULT_CONTEXT,
                 area_threshold: float = 32.0**2, sr_scope: str = "small", large_rois: str = "generator",
                 gate_top_k: int = 0, gate_rank: str = "foreground", gate_share_iou: float = 0.0,
                 fusion: str = "replace", amp: bool = False,
                 patches: str = "generator", boxes_from: str = "discriminator", rois_per_image: int = 16,
                 hr_rois_per_image: int = 4, fg_fraction: float = 0.25, gt_jitter: float = 0.15,
                 jitters_per_gt: int = 2):
        super().__init__()
        self.detector, self.generator, self.discriminator = detector, generator, discriminator
        self.lr_size, self.scale, self.context = lr_size, scale, context
        self.area_threshold, self.sr_scope, self.gate_top_k = area_threshold, sr_scope, gate_top_k
        self.large_rois, self.gate_rank, self.gate_share_iou = large_rois, gate_rank, gate_share_iou
        self.fusion, self.boxes_from, self.amp, self.patches = fusion, boxes_from, amp, patches
        self.rois_per_image, self.hr_rois_per_image, self.fg_fraction = rois_per_image, hr_rois_per_image, fg_fraction
        self.gt_jitter, self.jitters_per_gt = gt_jitter, jitters_per_gt
        # The box head's coder (weights 10, 10, 5, 5), so t_SR and the head's deltas are interchangeable.
        self.box_coder = detector.roi_heads.box_coder
        # RoI sampling for the SR branch draws from its own generator, so adding the branch leaves
        # the detector's random stream (and so its weights, in the joint schedule) untouched.
        self.sampling_rng = torch.Generator().manual_seed(0)
        # The box head's and D's box regression error (smooth L1 per foreground RoI, a running mean
        # over the SR branch's training RoIs): "mean" fusion weights the two heads' deltas by them,
        # so a D whose box head has not learned yet never halves the box head's corrections.
        self.register_buffer("box_errors", torch.full((2,), float("nan")))

    # -- the reconstruction module: the one patches -> G -> D path ------------------------------
    def super_resolve(self, lr_patch: Tensor) -> Tensor:
        """G(z_LR), or plain bilinear upsampling without the reconstruction module (sr-no-recon)."""
        if self.generator is None:
            return self.upsample(lr_patch)
        return self.generator(lr_patch)

    def upsample(self, lr_patch: Tensor) -> Tensor:
        """z_LR upsampled bilinearly to G's output size: sr-no-recon's patches, and D's with patches="bilinear"."""
        return F.interpolate(lr_patch, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def generated(self, rois: Tensor) -> Tensor:
        """Which RoIs [N, 4] (original-image pixels) G serves: every one, or with
        ``large_rois="native"`` those that fit the LR patch (``patches.fits_lr_patch``)."""
        if self.large_rois == "native":
            return fits_lr_patch(rois, self.lr_size, self.context)
        return torch.ones(len(rois), dtype=torch.bool, device=rois.device)

    def native_patches(self, images: list[Tensor], rois: list[Tensor]) -> Tensor:
        """RoIs cut from the image at D's patch size: what D judges of the RoIs G does not serve."""
        return lr_patches(images, rois, self.lr_size * self.scale, self.context)

    @staticmethod
    def in_roi_order(generated: Tensor, from_g: Tensor, native: Tensor) -> Tensor:
        """One batch of D's patches in RoI order: ``from_g`` where ``generated``, ``native`` elsewhere.
        Gradients reach G through ``from_g``."""
        if bool(generated.all()):
            return from_g
        patches = from_g.new_empty(len(generated), *from_g.shape[1:])
        patches[generated] = from_g
        patches[~generated] = native.to(from_g.dtype)
        return patches

    def reconstruct(self, images: list[Tensor], rois: list[Tensor], hr_images: list[Tensor] | None = None,
                    judge: bool = True, every_roi_through_g: bool = False) -> dict[str, Tensor]:
        """RoIs (per image, original-image pixels) through the module, as inference runs it.

        Returns "lr_patch" (z_LR, cut by ``lr_patches``), "generated" (which RoIs G serves), "sr_patch"
        (what D judges: G(z_LR), unclamped, or the patch ``patches`` names, and for the RoIs G does
        not serve their native cut) and D's outputs "adv" [N], "cls" [N, C] and "box" [N, 4C] (t_SR),
        batched over all RoIs. Scoring, the notebooks' widgets and the SR quality report all go
        through here, so all three see G and D at the same precision (``amp``); every output is
        float32. ``hr_images``: the images' exact xk twins, which ``patches="twin"`` cuts D's
        patches from. ``judge=False`` stops before D: the patches only. ``every_roi_through_g``:
        G's patch for every RoI, large ones included (the SR quality report measures G itself).
        """
        lr_patch = lr_patches(images, rois, self.lr_size, self.context)
        by_image = [torch.ones(len(r), dtype=torch.bool, device=r.device) if every_roi_through_g else self.generated(r)
                    for r in rois]
        generated = torch.cat(by_image) if by_image else torch.zeros(0, dtype=torch.bool)
        dtype = fast_autocast_dtype(lr_patch.device) if self.amp else None
        with torch.autocast(lr_patch.device.type, dtype=dtype, enabled=dtype is not None):
            if self.patches == "twin":
                if hr_images is None:
                    raise ValueError("patches='twin' has D judge the exact xk twin's patches: pass the images' "
                                     "twins (hr_images; a split loaded with hr_scale=k holds them)")
                _, sr, _ = lr_hr_pairs(images, [r[g] for r, g in zip(rois, by_image)], self.lr_size, self.scale,
                                       self.context, hr_images=hr_images)
            elif self.patches == "bilinear":
                sr = self.upsample(lr_patch[generated])
            else:
                sr = self.super_resolve(lr_patch[generated])
            if not bool(generated.all()):
                native = self.native_patches(images, [r[~g] for r, g in zip(rois, by_image)])
                sr = self.in_roi_order(generated, sr, native)
            d = self.discriminator(sr) if judge else {}
        return {"lr_patch": lr_patch, "generated": generated, "sr_patch": sr.float(),
                **{k: v.float() for k, v in d.items()}}

    def _selected(self, boxes: Tensor) -> Tensor:
        """Which boxes (original-image pixels) the SR branch serves."""
        if self.sr_scope == "all":
            return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        return box_area(boxes) < self.area_threshold

    def gate_priority(self, foreground: Tensor) -> Tensor:
        """Each of an image's proposals' priority for the gate (higher first), from the box head's
        foreground probabilities ``foreground`` [N] and the proposals' order.

        torchvision's RPN returns an image's proposals in decreasing objectness (its NMS sorts
        them, and it keeps no scores), so a proposal's index is its objectness rank. "both" adds
        the proposal's rank by each score, and breaks ties by objectness.
        """
        if self.gate_rank == "foreground":
            return foreground
        n = len(foreground)
        objectness_rank = torch.arange(n, dtype=torch.float64, device=foreground.device)
        if self.gate_rank == "objectness":
            return -objectness_rank
        foreground_rank = torch.empty_like(objectness_rank)
        foreground_rank[foreground.argsort(descending=True, stable=True)] = objectness_rank
        return -((foreground_rank + objectness_rank) * n + objectness_rank)

    def _gate(self, in_scope: Tensor, foreground: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """The gate on one image's proposals (``boxes`` [N, 4]): which go through G and D (the
        ``gate_top_k`` in scope with the highest ``gate_priority``), and for each proposal the
        index of the sent one whose answers it takes (itself if sent, -1 for none).

        With ``gate_share_iou`` t, a proposal overlapping one already sent at IoU above t is
        skipped (torchvision's NMS over the ranks), so that the k patches reach k objects, and
        every other proposal in scope takes the answers of the sent one it overlaps most, if
        that IoU is above t.
        """
        candidates = torch.where(in_scope)[0]
        priority = self.gate_priority(foreground)
        if not self.gate_share_iou:
            keep = candidates[priority[candidates].topk(min(self.gate_top_k, len(candidates))).indices]
        else:
            # NMS visits the candidates in priority order (its scores) and returns them in that order;
            # in float64, as the priority is, whose Borda scores float32 holds exactly only for a few
            # thousand proposals
            kept = nms(boxes[candidates].double(), priority[candidates].double(), self.gate_share_iou)
            keep = candidates[kept[:self.gate_top_k]]
        sent = torch.zeros_like(in_scope)
        sent[keep] = True
        source = torch.full((len(in_scope),), -1, dtype=torch.long, device=in_scope.device)
        source[keep] = keep
        rest = torch.where(in_scope & ~sent)[0]
        if self.gate_share_iou and len(rest) and len(keep):
            overlap, nearest = box_iou(boxes[rest], boxes[keep]).max(dim=1)
            near = overlap > self.gate_share_iou
            source[rest[near]] = keep[nearest[near]]
        return sent, source

    def shared_answers(self, d: dict, sr_mask: Tensor, source: Tensor, proposals: Tensor) -> dict:
        """D's answers for every proposal (rows of the others are unused): the sent proposals'
        own (``d``'s rows, in their order) and, for a proposal that takes a sent one's answers
        (``source``, global indices), that one's class logits and its box, D's deltas decoded at
        the sent proposal and encoded again relative to the taking one. ``proposals`` [N, 4], one frame."""
        cls = d["cls"].new_zeros(len(source), d["cls"].shape[1])
        box = d["box"].new_zeros(len(source), d["box"].shape[1])
        cls[sr_mask], box[sr_mask] = d["cls"], d["box"]
        taking = (source >= 0) & ~sr_mask
        if taking.any():
            sent = source[taking]
            cls[taking] = cls[sent]
            num_classes = box.shape[1] // 4
            decoded = self.box_coder.decode(box[sent], [proposals[sent]]).reshape(-1, 4)
            box[taking] = self.box_coder.encode_single(
                decoded, proposals[taking].repeat_interleave(num_classes, dim=0)).reshape(len(sent), -1)
        return {"cls": cls, "box": box}

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
    def _to_frame(boxes: list[Tensor], from_sizes, to_sizes) -> list[Tensor]:
        """Boxes per image from one image size (h, w) to another."""
        out = []
        for b, (fh, fw), (th, tw) in zip(boxes, from_sizes, to_sizes):
            ratio = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], device=b.device)
            out.append(b * ratio)
        return out

    # -- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> dict:
        """The detector's part of inference: its proposals (detector frame and original-image
        pixels) and the box head's logits and deltas for each. SR branches on the same detector
        weights (a bench seed's variants, D on other patches) can share one ``detect`` per batch."""
        heads = self.detector.roi_heads
        image_list, _, features, proposals, _, original_sizes = self._proposals(images)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
        head_logits, head_deltas = heads.box_predictor(box_features)
        return {"image_list": image_list, "original_sizes": original_sizes, "proposals": proposals,
                "rois": self._to_frame(proposals, image_list.image_sizes, original_sizes),
                "head_logits": head_logits, "head_deltas": head_deltas}

    @torch.no_grad()
    def score_proposals(self, images: list[Tensor], hr_images: list[Tensor] | None = None,
                        detected: dict | None = None) -> dict:
        """Every proposal's class logits and box deltas, with the SR branch's in place for small ones.

        Returns ``detect``'s proposals and box head answers, the final logits and deltas after
        replacement/fusion, ``sr_mask`` (which proposals went through G and D), ``shared_mask``
        (which took the answers of one that did: ``gate_share_iou``) and ``answered_by`` (for each
        proposal, the index among the batch's proposals of the one whose patch D judged for it:
        itself when sent, -1 where the box head answers alone). ``detected``:
        what this model's ``detect`` gives for these images, computed once for several branches.
        Visualisation and tests read this; ``forward`` post-processes it.
        """
        detected = detected or self.detect(images)
        rois, head_logits, head_deltas = detected["rois"], detected["head_logits"], detected["head_deltas"]
        chosen = [self._selected(r) for r in rois]
        sizes = [len(r) for r in rois]
        if self.gate_top_k:
            foreground = 1 - head_logits.softmax(-1)[:, 0]
            gates = [self._gate(c, f, r) for c, f, r in zip(chosen, foreground.split(sizes), rois)]
            chosen = [sent for sent, _ in gates]
            offsets = torch.tensor([0, *sizes[:-1]], device=head_logits.device).cumsum(0)
            # per proposal, the sent one whose answers it takes, as an index among the batch's proposals
            source = torch.cat([torch.where(s >= 0, s + o, s) for (_, s), o in zip(gates, offsets)])
        sr_mask = torch.cat(chosen)
        if not self.gate_top_k:  # ungated, a proposal has D's answers exactly when it is in scope
            source = torch.where(sr_mask, torch.arange(len(sr_mask), device=sr_mask.device), -1)
        sharing = bool(self.gate_top_k and self.gate_share_iou)
        answered = source >= 0
        class_logits, box_regression = head_logits.clone(), head_deltas.clone()
        if sr_mask.any():
            d = self.reconstruct(images, [r[c] for r, c in zip(rois, chosen)], hr_images)
            if sharing:  # spread to the proposals that take a sent one's answers
                d = {k: v[answered] for k, v in self.shared_answers(d, sr_mask, source, torch.cat(rois)).items()}
            if self.fusion == "replace":
                class_logits[answered] = d["cls"]
            else:  # average the two classifiers' probabilities
                mean = (head_logits[answered].softmax(-1) + d["cls"].softmax(-1)) / 2
                class_logits[answered] = mean.clamp_min(1e-12).log()
            if self.boxes_from == "discriminator":
                w = 1.0 if self.fusion == "replace" else self.box_fusion_weight()
                box_regression[answered] = (1 - w) * head_deltas[answered] + w * d["box"]
        return {**detected, "class_logits": class_logits, "box_regression": box_regression, "sr_mask": sr_mask,
                "shared_mask": answered & ~sr_mask, "answered_by": source}

    def box_fusion_weight(self) -> float:
        """D's share of the fused box deltas: e_head / (e_head + e_D), inverse-error weighting of the
        two regressors; 0 (the box head alone) until both errors have been measured in training."""
        head_error, d_error = self.box_errors.tolist()
        if not (math.isfinite(head_error) and math.isfinite(d_error)) or head_error + d_error == 0:
            return 0.0
        return head_error / (head_error + d_error)

    @torch.no_grad()
    def update_box_errors(self, head_deltas: Tensor, d_deltas: Tensor, labels: Tensor, targets: Tensor,
                          momentum: float = 0.98) -> None:
        """Fold one batch's box errors of both heads (foreground RoIs only) into ``box_errors``."""
        fg = torch.where(labels > 0)[0]
        if len(fg) == 0:
            return
        errors = []
        for deltas in (head_deltas, d_deltas):
            at_class = deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
            errors.append(F.smooth_l1_loss(at_class.float(), targets[fg].float(), beta=1 / 9, reduction="sum")
                          / len(fg))
        batch = torch.stack(errors)
        known = torch.isfinite(self.box_errors)
        self.box_errors.copy_(torch.where(known, momentum * self.box_errors + (1 - momentum) * batch, batch))

    @torch.no_grad()
    def forward(self, images: list[Tensor], targets=None, hr_images: list[Tensor] | None = None,
                detected: dict | None = None):
        """Detections in torchvision's format; ``hr_images`` only for ``patches="twin"``, ``detected``
        as ``score_proposals`` takes it."""
        if self.training:
            raise RuntimeError("SRDetector.forward is inference; training uses training_forward()")
        s = self.score_proposals(images, hr_images, detected)
        sizes = s["image_list"].image_sizes
        boxes, scores, labels = self.detector.roi_heads.postprocess_detections(
            s["class_logits"], s["box_regression"], s["proposals"], sizes)
        detections = [{"boxes": b, "labels": lab, "scores": sc} for b, sc, lab in zip(boxes, scores, labels)]
        return self.detector.transform.postprocess(detections, sizes, s["original_sizes"])

    # -- training ----------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, images: list[Tensor]) -> tuple:
        """The frozen detector's eval-mode proposals for a training batch, with its features: what
        the staged schedule's SR branch samples from (``training_forward(proposed=...)``)."""
        self.detector.eval()
        image_list, _, features, proposals, _, original_sizes = self._proposals(images)
        return image_list, features, proposals, original_sizes

    def training_forward(self, images: list[Tensor], targets: list[dict], hr_images: list[Tensor] | None = None,
                         train_detector: bool = True, proposed: tuple | None = None, shared=None):
        """Detector losses and the SR branch's sampled RoI batch.

        ``hr_images`` are the images' exact xk twins (k = scale) when the HR targets come from
        them, else None (SOD-MTGAN's protocol: HR from the image itself). With
        ``train_detector=False`` (the staged schedule) the frozen detector only proposes: its
        proposals come from the eval-mode RPN (``propose``, or ``proposed``, what ``propose`` gave
        for these images, when several branches share one frozen detector), and there are no
        detector losses. ``shared`` (a ``train.SharedWork`` of this batch) lets such branches cut
        the patches of RoIs they drew alike once.
        """
        det = self.detector
        if not train_detector:
            det.eval()
            image_list, features, proposals, original_sizes = proposed or self.propose(images)
            losses = {}
        else:
            image_list, targets_t, features, proposals, rpn_losses, original_sizes = self._proposals(images, targets)
            _, roi_losses = det.roi_heads(features, proposals, image_list.image_sizes, targets_t)
            losses = {**rpn_losses, **roi_losses}
        proposals = self._to_frame([p.detach() for p in proposals], image_list.image_sizes, original_sizes)
        rois, labels, regression_targets = self.sample_rois(proposals, targets, self.scale if hr_images else 1)

        def cut():
            lr_patch, hr_patch, hr_valid = lr_hr_pairs(images, rois, self.lr_size, self.scale, self.context,
                                                       hr_images=hr_images)
            if hr_images is not None:
                # From exact twins every RoI, the tiniest included, has a real target: z_HR holds k x the
                # image's detail. z_LR is then what inference gives G, for every RoI: pixel supervision
                # and D's real/fake judgement reach the same RoIs (paired), whatever their size.
                lr_patch = lr_patches(images, rois, self.lr_size, self.context)
                hr_valid = torch.ones_like(hr_valid)
            by_image = [self.generated(r) for r in rois]
            native = self.native_patches(images, [r[~g] for r, g in zip(rois, by_image)])
            with torch.no_grad():  # the box head's own answer on the same RoIs, for the fusion's weights
                heads = det.roi_heads
                resized = self._to_frame(rois, original_sizes, image_list.image_sizes)
                _, head_deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, resized,
                                                                                       image_list.image_sizes)))
            return lr_patch, hr_patch, hr_valid, head_deltas, torch.cat(by_image), native

        # The key holds every setting the cut reads; the batch's images and the frozen detector are
        # the pass's own, and ``shared`` compares the RoIs. D's read looks up the box head's pooler
        # levels, which the cut's pooling sets on first use: set here, whoever cuts.
        set_levels(det.roi_heads.box_roi_pool, features, image_list.image_sizes)
        key = ("patches", self.lr_size, self.scale, self.context, hr_images is not None, self.large_rois)
        lr_patch, hr_patch, hr_valid, head_deltas, generated, native_patch = (
            cut() if shared is None else shared.once(key, rois, cut))
        batch = {"lr_patch": lr_patch, "hr_patch": hr_patch, "hr_valid": hr_valid, "head_deltas": head_deltas,
                 "generated": generated, "native_patch": native_patch, "labels": torch.cat(labels),
                 "regression_targets": torch.cat(regression_targets), "rois": rois}
        return losses, batch

    def _jitter(self, boxes: Tensor, copies: int) -> Tensor:
        """``copies`` randomly shifted and rescaled versions of each box (relative ``gt_jitter``)."""
        g, j = self.sampling_rng, self.gt_jitter
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
        g = self.sampling_rng
        hr_size = self.lr_size * self.scale
        out_rois, out_labels, out_targets = [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].as_subclass(Tensor), target["labels"]
            gt_small = gt_boxes[self._selected(gt_boxes)]
            candidates = torch.cat([props, gt_small, self._jitter(gt_small, self.jitters_per_gt)])
            candidates = candidates[self._selected(candidates) & _at_least_a_pixel(candidates)]
            side = (gt_boxes[:, 2:] - gt_boxes[:, :2]).min(dim=1).values
            hr_capable = self._jitter(gt_boxes[side * (1 + 2 * self.context) * hr_scale >= hr_size], 1)
            hr_capable = hr_capable[_at_least_a_pixel(hr_capable)]
            hr_capable = hr_capable[torch.randperm(len(hr_capable), generator=g)[:self.hr_rois_per_image].to(hr_capable.device)]
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
            num_fg = min(len(fg), round(self.rois_per_image * self.fg_fraction))
            num_bg = min(len(bg), self.rois_per_image - num_fg)
            keep = torch.cat([fg[torch.randperm(len(fg), generator=g)[:num_fg].to(fg.device)],
                              bg[torch.randperm(len(bg), generator=g)[:num_bg].to(bg.device)],
                              torch.where(~is_small)[0]])
            rois = candidates[keep]
            out_rois.append(rois)
            out_labels.append(labels[keep])
            out_targets.append(self.box_coder.encode_single(matched_boxes[keep], rois))
        return out_rois, out_labels, out_targets

"""RoI patches for the reconstruction module: LR inputs for G and (LR, HR) training pairs.

Every patch is cut with torchvision.ops.roi_align from the [0, 1] image tensor (aligned=True, so a
box [x1, y1, x2, y2] in pixel coordinates, where pixel i covers [i, i + 1), is sampled exactly;
adaptive sampling_ratio, so a RoI larger than the output averages ceil(side / size) samples per bin
per axis, i.e. it is area-averaged rather than aliased).

Choices made here (the rest of sodlab relies on them):

* Context. A patch covers the RoI enlarged by ``DEFAULT_CONTEXT`` = 0.1 of its width (height) on
  each side, i.e. 1.2x the box. SOD-MTGAN crops the box region itself; a small margin lets D see
  the object's edges when the proposal cuts through the object, which the box regression head
  needs, at the cost of a few background pixels. The patch is *not* squared by default: the patch
  then maps linearly onto the proposal along each axis (the same frame as the BoxCoder deltas and
  as RoIAlign in Faster R-CNN); ``square=True`` is available.
  Samples that fall more than one pixel outside the image read as 0, as in roi_align.

* HR targets (``lr_hr_pairs``), the published SOD-MTGAN protocol: HR = the RoI resampled at
  hr_size = lr_size * scale; LR = HR reduced by area averaging (avg_pool2d with kernel ``scale``).
  An HR patch is only a real target when the pixel grid it comes from has at least hr_size pixels
  across the (expanded) RoI in both directions; otherwise roi_align *interpolates* it and it holds
  no more detail than the LR patch. ``hr_valid`` marks the real ones; only they count for L_MSE,
  L_TV and D's real term (and D's class/box losses on HR patches).
  - From the image itself: valid iff min(expanded box side) >= hr_size image pixels.
  - From an exact xk twin (``hr_images``, k = ``hr_scale``): the HR patch is cut from the twin at
    box * k, which has k x more pixels across the box, so valid iff min(expanded side) * k >=
    hr_size, i.e. side >= hr_size / k LR pixels (>= 16 px for hr_size 64, k 4).

* Train/inference consistency of the LR patch. At inference only the image exists, and
  ``lr_patches`` cuts the LR patch with roi_align at lr_size. In training:
  - valid RoIs get LR = avg_pool(HR) exactly (the protocol above). For them the RoI is at least
    lr_size pixels across in the LR grid, so roi_align at lr_size is itself an area average of the
    same region and the two agree closely (exactly, for a grid-aligned box whose side is a multiple
    of lr_size; tested);
  - invalid RoIs (smaller than the HR grid supports) have no real HR target anyway, so by default
    (``small_lr="inference"``) their LR patch is ``lr_patches`` exactly: G, and through it D's class
    and box heads, train on the very input they will get at inference. Pooling an interpolated HR
    patch instead (``small_lr="pooled"``, the literal protocol) would give small RoIs an extra
    triangle blur (or, from a twin, detail the image does not have) that inference never shows.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_area, roi_align

from sodlab.config import DEFAULT_CONTEXT

Images = Union[Tensor, Sequence[Tensor]]


def expand_boxes(boxes: Tensor, context: float = DEFAULT_CONTEXT, square: bool = False) -> Tensor:
    """Enlarge xyxy boxes [N, 4] by ``context`` x their width (height) on each side.

    With ``square=True`` the shorter side is first grown to the longer one about the centre,
    so the patch keeps the object's aspect ratio instead of stretching it.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"expand_boxes: expected boxes [N, 4] xyxy, got {tuple(boxes.shape)}")
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    if square:
        width = height = torch.maximum(width, height)
    half_w = width * (0.5 + context)
    half_h = height * (0.5 + context)
    return torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=1)


def _check_inputs(images: Images, boxes: Sequence[Tensor], name: str) -> list[Tensor]:
    """Return the images as a list of [3, H, W] float tensors, with clear errors for bad input."""
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(f"{name}: images must be [B, 3, H, W] or a list of [3, H, W], got {tuple(images.shape)}")
    image_list = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
    if len(image_list) != len(boxes):
        raise ValueError(f"{name}: {len(image_list)} images but {len(boxes)} box tensors")
    for i, (image, image_boxes) in enumerate(zip(image_list, boxes)):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: image {i} must be [3, H, W], got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"{name}: image {i} has dtype {image.dtype}; expected a float image in [0, 1]")
        if image_boxes.dim() != 2 or image_boxes.shape[-1] != 4:
            raise ValueError(f"{name}: boxes of image {i} must be [N, 4] xyxy, got {tuple(image_boxes.shape)}")
        bad = (image_boxes[:, 2] <= image_boxes[:, 0]) | (image_boxes[:, 3] <= image_boxes[:, 1])
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"{name}: image {i} box {j} {image_boxes[j].tolist()} has non-positive width or height")
    return image_list


def _roi_align_patches(
    image_list: list[Tensor], boxes: Sequence[Tensor], size: int, spatial_scale: float = 1.0
) -> Tensor:
    """roi_align each image's boxes at size x size; returns [sum N_i, 3, size, size] in box order."""
    patches = []
    for image, image_boxes in zip(image_list, boxes):
        # One call per image: images of a list may differ in size, and one image is the common case.
        patches.append(
            roi_align(
                image[None],
                [image_boxes.to(image.dtype)],
                output_size=(size, size),
                spatial_scale=spatial_scale,
                sampling_ratio=-1,  # adaptive: ceil(roi_side / size) samples per bin per axis
                aligned=True,  # pixel i covers [i, i + 1): no half-pixel shift of the sampling grid
            )
        )
    if not patches:
        return torch.zeros(0, 3, size, size)
    return torch.cat(patches, dim=0)


def box_side(boxes: Tensor) -> Tensor:
    """sqrt(w * h) of xyxy boxes: the side of the square of the same area. An RoI's size, as the
    SR scope (a box area threshold), G's pretraining bins and the SR quality report measure it."""
    return box_area(boxes).clamp_min(0).sqrt()


def fits_lr_patch(boxes: Tensor, lr_size: int, context: float = DEFAULT_CONTEXT) -> Tensor:
    """Which boxes [N, 4] are low-resolution: their context box is at most ``lr_size`` px on both
    axes, so the LR cut at ``lr_size`` upsamples them or keeps them as they are. A larger box
    would be downsampled before G, which then has detail to recover that its input no longer holds.
    """
    expanded = expand_boxes(boxes, context)
    return ((expanded[:, 2:] - expanded[:, :2]) <= lr_size).all(dim=1)


def extract_patches(
    images: Images,
    boxes: Sequence[Tensor],
    size: int,
    context: float = DEFAULT_CONTEXT,
    square: bool = False,
) -> Tensor:
    """Cut every (context-expanded) box out of its image as a [size, size] patch.

    Args:
        images: [B, 3, H, W] float tensor in [0, 1], or a list of [3, H_i, W_i].
        boxes: one [N_i, 4] xyxy tensor (pixels) per image.
    Returns:
        [sum N_i, 3, size, size], in the order of the boxes, image after image.
    """
    image_list = _check_inputs(images, boxes, "extract_patches")
    expanded = [expand_boxes(b, context, square) for b in boxes]
    return _roi_align_patches(image_list, expanded, size)


def lr_patches(
    images: Images,
    boxes: Sequence[Tensor],
    lr_size: int = 16,
    context: float = DEFAULT_CONTEXT,
    square: bool = False,
) -> Tensor:
    """The LR patches G gets at inference: roi_align of the image at lr_size (see module docstring)."""
    return extract_patches(images, boxes, lr_size, context, square)


def lr_hr_pairs(
    images: Images,
    boxes: Sequence[Tensor],
    lr_size: int = 16,
    scale: int = 4,
    context: float = DEFAULT_CONTEXT,
    hr_images: Images | None = None,
    hr_scale: int | None = None,
    square: bool = False,
    small_lr: str = "inference",
) -> tuple[Tensor, Tensor, Tensor]:
    """Training pairs (z_LR, z_HR) for every box, and which HR patches are real targets.

    Args:
        images: the detector's input images, [B, 3, H, W] or a list of [3, H_i, W_i], in [0, 1].
        boxes: one [N_i, 4] xyxy tensor per image, in the pixels of ``images``.
        lr_size, scale: LR patch side and SR factor; hr_size = lr_size * scale.
        hr_images: optional exact xk twins of ``images`` (k = hr_scale, e.g. the embedded
            benchmark's {split}_x4 images); the HR patch is then cut from the twin.
        hr_scale: k; inferred from the shapes when omitted.
        small_lr: "inference" (default): RoIs without a real HR target get the inference LR patch
            (``lr_patches``); "pooled": every LR patch is avg_pool(HR) (literal SOD-MTGAN).

    Returns:
        lr [M, 3, lr_size, lr_size], hr [M, 3, hr_size, hr_size], hr_valid [M] bool, where
        lr[hr_valid] == avg_pool2d(hr[hr_valid], scale) exactly.
    """
    if small_lr not in ("inference", "pooled"):
        raise ValueError(f"lr_hr_pairs: small_lr must be 'inference' or 'pooled', got {small_lr!r}")
    hr_size = lr_size * scale
    image_list = _check_inputs(images, boxes, "lr_hr_pairs")
    expanded = [expand_boxes(b, context, square) for b in boxes]

    if hr_images is None:
        if hr_scale not in (None, 1):
            raise ValueError(f"lr_hr_pairs: hr_scale={hr_scale} given without hr_images (the xk twins)")
        source, k = image_list, 1
    else:
        source = _check_inputs(hr_images, boxes, "lr_hr_pairs (hr_images)")
        for i, (image, twin) in enumerate(zip(image_list, source)):
            ratio_h = twin.shape[-2] / image.shape[-2]
            ratio_w = twin.shape[-1] / image.shape[-1]
            expected = hr_scale if hr_scale is not None else ratio_h
            if ratio_h != ratio_w or ratio_h != expected or ratio_h != int(ratio_h):
                raise ValueError(
                    f"lr_hr_pairs: hr_images[{i}] is {tuple(twin.shape[-2:])} but image {i} is "
                    f"{tuple(image.shape[-2:])}; expected an exact integer x{hr_scale or 'k'} twin"
                )
        k = hr_scale if hr_scale is not None else (source[0].shape[-2] // image_list[0].shape[-2] if source else 1)

    # spatial_scale=k maps the boxes (LR pixels) onto the twin's pixel grid.
    hr = _roi_align_patches(source, expanded, hr_size, spatial_scale=float(k))
    lr = F.avg_pool2d(hr, kernel_size=scale)  # area averaging: the degradation G learns to invert

    all_expanded = torch.cat(expanded) if expanded else torch.zeros(0, 4)
    native_side = torch.minimum(all_expanded[:, 2] - all_expanded[:, 0], all_expanded[:, 3] - all_expanded[:, 1]) * k
    hr_valid = native_side >= hr_size - 1e-4  # tolerance for float error in the expansion arithmetic

    if small_lr == "inference" and not bool(hr_valid.all()):
        inference_lr = _roi_align_patches(image_list, expanded, lr_size)
        lr = torch.where(hr_valid[:, None, None, None], lr, inference_lr)
    return lr, hr, hr_valid

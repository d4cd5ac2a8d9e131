"""Native resolution for small objects: training on tiles, sliced inference, and what a resize costs.

Small objects in large images (aerial, drone, thermal) are destroyed by the resize to a preset's
input size: HIT-UAV's 640x512 images go to 256x205 under the cpu preset (x0.4), and half of its
objects fall under 8 px. SAHI's remedy ("Slicing Aided Hyper Inference and Fine-tuning for Small
Object Detection", Akyon et al. 2022) is to work on tiles at native resolution:

- ``TiledDataset`` samples one fixed-size crop per image and visit, at native resolution, with
  the boxes clipped to the crop under the cut-box policy of ``crop_target``. A crop of
  ``tile`` px is not resized by a detector whose min_size = max_size = tile.
- ``sliced_predict`` runs a torchvision detector on overlapping tiles plus one full-image pass,
  shifts the tiles' boxes back into the image and merges everything by class-wise NMS, so that
  ``sodlab.evaluate.coco_eval`` scores it against the native-resolution ground truth.
- ``count_pushed_under`` counts the objects a resize puts under 8 px that were not under 8 px
  at native scale, for a warning at train time.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors
from torchvision.ops import batched_nms
from torchvision.transforms import v2

from sodlab.data.coco import CocoDetection, load_coco_json

# A box cut by the crop edge stays an object when at least this fraction of its area is inside the
# crop: the rule the embedded benchmark applies to occluded objects (synth.MIN_VISIBLE_FRACTION).
MIN_VISIBLE = 0.5


# --- the cut-box policy ----------------------------------------------------------------------------

def crop_target(boxes: torch.Tensor, iscrowd: torch.Tensor, window: Sequence[int],
                min_visible: float = MIN_VISIBLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes (xyxy, image pixels) seen through ``window`` = (x0, y0, x1, y1).

    Returns (boxes in window pixels, the index of each into the input, iscrowd). Policy:

    - a box entirely inside the window is kept unchanged (shifted by the window's origin);
    - a box the window edge cuts is clipped to the window; it stays an object when at least
      ``min_visible`` of its area is inside, and becomes a crowd (ignore) region otherwise, so a
      sliver of an object is neither an object to find nor background to learn;
    - a crowd box stays a crowd box, clipped, whatever part of it is inside;
    - a box with no area inside the window (outside it, or only touching its edge) is dropped.
    """
    x0, y0, x1, y1 = (float(v) for v in window)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    iscrowd = torch.as_tensor(iscrowd, dtype=torch.int64).reshape(-1)
    clipped = torch.stack([boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1),
                           boxes[:, 2].clamp(x0, x1), boxes[:, 3].clamp(y0, y1)], dim=1)
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]) & (full > 0)
    fraction = torch.where(visible, inside / full.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(full))
    crowd = (iscrowd != 0) | (fraction < min_visible)
    index = torch.nonzero(visible).flatten()
    shifted = clipped[index] - torch.tensor([x0, y0, x0, y0])
    return shifted, index, crowd[index].long()


def _labels_area_iscrowd(inputs) -> tuple[torch.Tensor, ...]:
    """For SanitizeBoundingBoxes: every per-box tensor of the target, so they stay aligned."""
    target = inputs[1]
    return target["labels"], target["area"], target["iscrowd"]


class TiledDataset(Dataset):
    """One random ``tile`` x ``tile`` crop of each image per visit, at native resolution.

    Wraps a ``CocoDetection`` that does not resize (``load_split(..., scale=1.0)``; its flips,
    dtype conversion and box sanitising stay as they are: a flip before the crop is a crop of
    the mirrored image). Returns ``(image, target)`` in the wrapped dataset's format: ``boxes``
    (``BoundingBoxes`` in crop pixels), ``labels``, ``image_id``, ``area`` (native pixels, times
    the visible fraction for a cut box), ``iscrowd`` and, with twins, ``hr_image`` cropped to the
    same region at k times the size; plus ``tile``, the crop (x0, y0, x1, y1) in the
    (possibly flipped) image. An image smaller than ``tile`` along a side is taken whole along it.

    Cut boxes follow ``crop_target``. torchvision's detectors train on every box they are given
    and have no ignore label, so the target keeps only iscrowd 0 boxes: a box less than
    ``min_visible`` inside the crop is not a training target (as the wrapped dataset already
    leaves out the json's crowd regions).

    Crop positions are drawn from ``generator``, by default torch's global RNG, the one the
    dataset's random flips draw from: ``train.py`` seeds it and stores its state in checkpoints,
    so a run on tiles is reproducible from its seed, and resumable, exactly as a run on images.

    ``native_resolution=False`` also crops a resizing dataset, at its own scale: TrainConfig.crop,
    random-crop training of the x2 upscale baseline, whose evaluation sees whole images.
    """

    def __init__(self, dataset: CocoDetection, tile: int, min_visible: float = MIN_VISIBLE,
                 generator: torch.Generator | None = None, native_resolution: bool = True) -> None:
        if not (isinstance(tile, int) and tile > 0):
            raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be a fraction in [0, 1], got {min_visible}")
        if native_resolution and dataset.scale != 1.0:
            raise ValueError(f"{dataset.ann_file}: tiles are cut at native resolution; the dataset resizes by "
                             f"{dataset.scale} (load it with scale=1.0)")
        self.dataset, self.tile, self.min_visible, self.generator = dataset, tile, min_visible, generator
        self._sanitize = v2.SanitizeBoundingBoxes(labels_getter=_labels_area_iscrowd)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # ids, class_names, num_classes, label_to_cat_id, ann_file, ...: the wrapped dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """A crop position drawn uniformly over the image: (x0, y0, x1, y1)."""
        crop_h, crop_w = min(self.tile, height), min(self.tile, width)
        y0 = int(torch.randint(height - crop_h + 1, (1,), generator=self.generator))
        x0 = int(torch.randint(width - crop_w + 1, (1,), generator=self.generator))
        return x0, y0, x0 + crop_w, y0 + crop_h

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        height, width = image.shape[-2:]
        x0, y0, x1, y1 = self.window(height, width)
        boxes, kept, crowd = crop_target(target["boxes"].as_subclass(torch.Tensor), target["iscrowd"],
                                         (x0, y0, x1, y1), self.min_visible)
        full = target["boxes"].as_subclass(torch.Tensor)[kept]
        fraction = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                    / ((full[:, 2] - full[:, 0]) * (full[:, 3] - full[:, 1])))
        objects = crowd == 0
        kept, boxes, fraction = kept[objects], boxes[objects], fraction[objects]
        cropped = {
            **target,
            "boxes": tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY,
                                              canvas_size=(y1 - y0, x1 - x0)),
            "labels": target["labels"][kept],
            "area": target["area"][kept] * fraction,
            "iscrowd": torch.zeros(len(kept), dtype=torch.int64),
            "tile": (x0, y0, x1, y1),
        }
        if "hr_image" in target:
            hr = target["hr_image"]
            k = hr.shape[-1] // width
            if hr.shape[-2:] != (height * k, width * k):
                raise ValueError(f"{self.dataset.image_path(target['image_id'])}: twin of {tuple(hr.shape[-2:])} "
                                 f"is not an integer multiple of the image's {(height, width)}")
            cropped["hr_image"] = tv_tensors.wrap(hr[..., k * y0:k * y1, k * x0:k * x1].contiguous(), like=hr)
        crop = tv_tensors.wrap(image[..., y0:y1, x0:x1].contiguous(), like=image)
        return self._sanitize(crop, cropped)


# --- sliced inference ------------------------------------------------------------------------------

def _starts(length: int, tile: int, step: int) -> list[int]:
    """Tile origins along one axis: every ``step`` px, the last one moved back to end at the edge."""
    starts, position = [], 0
    while position + tile < length:
        starts.append(position)
        position += step
    starts.append(max(0, length - tile))
    return starts


def tile_windows(height: int, width: int, tile: int, overlap: float = 0.2) -> list[tuple[int, int, int, int]]:
    """Overlapping square windows (x0, y0, x1, y1) covering the image, row by row.

    Neighbours overlap by int(overlap * tile) px; the last row and column are moved back inside
    the image, so every window is tile x tile (or the whole side, for an image smaller than a
    tile). These are the windows of SAHI's ``get_slice_bboxes`` (sahi.slicing), so a sliced
    evaluation here and the bench's ``sahi`` row see the same tiles.
    """
    if not (isinstance(tile, int) and tile > 0):
        raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be a fraction in [0, 1), got {overlap}")
    step = tile - int(overlap * tile)
    return [(x0, y0, min(x0 + tile, width), min(y0 + tile, height))
            for y0 in _starts(height, tile, step) for x0 in _starts(width, tile, step)]


@torch.no_grad()
def sliced_predict(model: Callable, image: torch.Tensor, tile: int, overlap: float = 0.2, full_image: bool = True,
                   iou_threshold: float = 0.5, max_detections: int | None = 100,
                   batch_size: int = 4) -> dict[str, torch.Tensor]:
    """A torchvision-format detector on overlapping tiles of ``image`` (+ one full-image pass), merged.

    ``model(list of [3, h, w] images) -> [{"boxes" xyxy, "labels", "scores"}]`` in eval mode
    (a torchvision detector, or anything with that contract); ``image`` is [3, H, W] as the
    model takes it, on the model's device. Each tile's boxes are shifted back into the image;
    the full-image pass (through the model's own resize, SAHI's "standard prediction") finds the
    objects larger than a tile. All boxes are merged by class-wise NMS at ``iou_threshold``
    (``torchvision.ops.batched_nms``: the bench's SAHI setting, NMS at IoU 0.5, since merging boxes
    instead would enlarge them and cost AP at strict IoU) and the ``max_detections`` best are kept
    (torchvision's detections_per_img and COCOeval's maxDets: 100). Returns CPU tensors in
    image pixels.
    """
    height, width = image.shape[-2:]
    windows = tile_windows(height, width, tile, overlap)
    boxes, labels, scores = [], [], []

    def collect(outputs, origins):
        for output, (x0, y0) in zip(outputs, origins):
            shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            boxes.append(output["boxes"].detach().float().cpu().reshape(-1, 4) + shift)
            labels.append(output["labels"].detach().cpu().long())
            scores.append(output["scores"].detach().float().cpu())

    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        collect(model([image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in batch]), [(w[0], w[1]) for w in batch])
    # One window covering the whole image already is the full-image pass.
    if full_image and windows != [(0, 0, width, height)]:
        collect(model([image]), [(0, 0)])
    boxes, labels, scores = torch.cat(boxes), torch.cat(labels), torch.cat(scores)
    keep = batched_nms(boxes, scores, labels, iou_threshold)  # sorted by decreasing score
    if max_detections is not None:
        keep = keep[:max_detections]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def _base_dataset(dataset) -> CocoDetection:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def sliced_outputs(model: torch.nn.Module, dataset: CocoDetection | Subset, tile: int, overlap: float = 0.2,
                   device: str | torch.device = "cpu", progress: bool = False,
                   **options) -> dict[int, dict[str, torch.Tensor]]:
    """``sliced_predict`` on every image of ``dataset``: {image_id: output}, boxes in image pixels.

    The dataset must not resize (``load_split(..., train=False)``), so boxes are native pixels,
    the frame of its json. The result goes to ``sodlab.evaluate``: ``predictions_to_coco_results(
    outputs, base.label_to_cat_id)`` then ``coco_eval(base.ann_file, results, image_ids=outputs)``.
    The model's train/eval mode is restored afterwards. ``options`` go to ``sliced_predict``.
    """
    from tqdm.auto import tqdm

    base = _base_dataset(dataset)
    if base.scale != 1.0:
        raise ValueError(f"{base.ann_file}: sliced inference runs at native resolution; the dataset resizes by "
                         f"{base.scale} (load it with scale=1.0)")
    was_training = model.training
    model.eval()
    outputs = {}
    try:
        for index in tqdm(range(len(dataset)), desc="sliced evaluate", disable=not progress, leave=False):
            image, target = dataset[index]
            outputs[int(target["image_id"])] = sliced_predict(model, image.to(device), tile, overlap, **options)
    finally:
        model.train(was_training)
    return outputs


# --- what a resize does to small objects -----------------------------------------------------------

def resize_factor(height: int, width: int, min_size: float, max_size: float) -> float:
    """The factor torchvision's GeneralizedRCNNTransform resizes an image by at inference (and at
    training for a single min_size): the short side to min_size, unless the long side would then
    exceed max_size."""
    return min(min_size / min(height, width), max_size / max(height, width))


@dataclass(frozen=True)
class Shrinkage:
    """How many objects (non-crowd) a resize puts under ``threshold`` px of side (sqrt of area)."""

    objects: int
    under_native: int  # under threshold at native resolution
    under_resized: int  # under threshold after the resize
    pushed_under: int  # not under threshold natively, under it after the resize
    threshold: float
    factor_range: tuple[float, float]  # smallest and largest resize factor over the images

    @property
    def fraction_pushed(self) -> float:
        return self.pushed_under / self.objects if self.objects else 0.0

    def warning(self, min_fraction: float = 0.05) -> str | None:
        """One line for the run log when at least ``min_fraction`` of the objects are pushed under."""
        if self.fraction_pushed < min_fraction:
            return None
        lo, hi = self.factor_range
        factor = f"x{lo:.3g}" if math.isclose(lo, hi) else f"x{lo:.3g}-x{hi:.3g}"
        return (f"the input resize ({factor}) puts {self.pushed_under} of {self.objects} objects "
                f"({100 * self.fraction_pushed:.0f}%) under {self.threshold:g} px that are larger at native "
                f"resolution ({100 * self.under_resized / self.objects:.0f}% under {self.threshold:g} px in all, "
                f"{100 * self.under_native / self.objects:.0f}% natively); train on native-resolution tiles "
                "(--tile) to keep them")


def count_pushed_under(ann_file: str | os.PathLike, min_size: float, max_size: float, tile: int | None = None,
                       input_scale: float = 1.0, threshold: float = 8.0) -> Shrinkage:
    """Count the objects of a COCO json that the detector's input resize puts under ``threshold`` px.

    An object's size is the side of its area (sqrt of the json's ``area``, else of w*h), as
    ``sodlab.evaluate``'s fine size bins measure it. The detector resizes what it is given by
    ``resize_factor`` with its transform's ``min_size`` / ``max_size`` (as built: the upscale
    method's detector has them multiplied by its ``input_scale``, which the dataset first
    resizes the image by). With ``tile``, the detector is given crops of at most tile x tile.
    """
    data = load_coco_json(ann_file)
    factors = {}
    for image in data["images"]:
        height, width = image["height"] * input_scale, image["width"] * input_scale
        if tile is not None:
            height, width = min(height, tile), min(width, tile)
        factors[image["id"]] = input_scale * resize_factor(height, width, min_size, max_size)
    objects = under_native = under_resized = pushed = 0
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        area = ann.get("area")
        if area is None:
            area = float(ann["bbox"][2]) * float(ann["bbox"][3])
        side = math.sqrt(max(float(area), 0.0))
        resized = side * factors[ann["image_id"]]
        objects += 1
        under_native += side < threshold
        under_resized += resized < threshold
        pushed += side >= threshold and resized < threshold
    values = list(factors.values()) or [1.0]
    return Shrinkage(objects, under_native, under_resized, pushed, threshold, (min(values), max(values)))

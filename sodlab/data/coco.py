"""COCO-format detection data as (image, target) pairs for torchvision detectors.

Works for any COCO-format split: COCO 2017, VisDrone/TinyPerson converted to COCO, and the
embedded benchmark written by ``sodlab.data.synth``. The layout is

    DIR/annotations/instances_{split}.json
    DIR/{split}/{file_name}

Targets follow torchvision detection: ``boxes`` xyxy pixels (a ``tv_tensors.BoundingBoxes``),
``labels`` contiguous 1..C (0 is background), ``image_id``, ``area``, ``iscrowd``. The dataset's
own category ids (often non-contiguous, e.g. COCO's 1..90) map to labels and back through
``cat_id_to_label`` / ``label_to_cat_id``.

Crowd annotations are left out of the training targets. Evaluation does not use these targets:
it reads the json through pycocotools, where crowd regions are ignored (see ``sodlab.evaluate``).
Bad boxes meet one policy everywhere, ``apply_box_policy``: training targets, the evaluation
ground truth and the FiftyOne ground truth drop and clip the same boxes, so a detector that
finds exactly the training targets scores AP 1.0.

Images are decoded only when their header's size matches the json and stays under
``MAX_IMAGE_PIXELS``; a ``file_name`` must stay inside its split folder.
"""
from __future__ import annotations

import math
import os
import posixpath
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sodlab.io import read_json

BACKGROUND = "__background__"

# COCO's size buckets by area in image pixels; COCOeval's areaRng intervals are closed, so an
# object of exactly 32**2 pixels is small.
SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2


def size_bucket(area: float) -> str:
    """"small", "medium" or "large", with COCOeval's bounds (inclusive)."""
    if area <= SMALL_MAX_AREA:
        return "small"
    return "medium" if area <= MEDIUM_MAX_AREA else "large"

# The largest image sodlab decodes, in pixels: 8192x8192 is ~200 MB as 8-bit RGB and ~800 MB as
# the float tensor a detector gets. The header's size is checked before decoding, so a 190 KB PNG
# claiming 13000x13000 cannot take gigabytes. Tile larger (e.g. aerial) images first, or pass
# ``max_pixels`` to ``read_rgb_image`` / ``CocoDetection``.
MAX_IMAGE_PIXELS = 8192 * 8192

# Pillow modes holding more than 8 bits per pixel. Pillow's own convert("RGB") clips these at 255
# instead of rescaling, which would turn most of a 16-bit image white.
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_coco_json(ann_file: str | os.PathLike) -> dict:
    """Read a COCO detection json and check its structure; errors name the file and the record.

    Checks: top-level ``images`` / ``annotations`` / ``categories`` lists; every image has an
    integer ``id``, a ``file_name`` and positive ``width`` / ``height``; every category an integer
    ``id`` and a ``name``; every annotation an ``id``, an ``image_id`` and ``category_id`` that
    exist, and a ``bbox`` of 4 numbers. Ids must be unique. A ``file_name`` must be a relative
    path that stays inside the split folder (absolute paths and climbing ``..`` are refused).
    Box values themselves (NaN, zero size, outside the image) are not errors here:
    ``apply_box_policy`` skips or clips them.
    """
    ann_file = Path(ann_file)
    data = read_json(ann_file)
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: expected a COCO json object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(
                f"{ann_file}: missing key {key!r} (a COCO detection json needs images, annotations and categories)"
            )
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")

    image_ids = set()
    for position, image in enumerate(data["images"]):
        where = f"{ann_file}: images[{position}]"
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise ValueError(f"{where}: needs an integer 'id'")
        where = f"{ann_file}: image id {image['id']}"
        if image["id"] in image_ids:
            raise ValueError(f"{where}: duplicate image id")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise ValueError(f"{where}: needs a 'file_name' string")
        check_file_name(image["file_name"], where)
        for key in ("width", "height"):
            if not _is_number(image.get(key)) or not image[key] > 0:
                raise ValueError(f"{where}: needs a positive {key!r}, got {image.get(key)!r}")
        image_ids.add(image["id"])

    category_ids = set()
    for position, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise ValueError(f"{ann_file}: categories[{position}]: needs an integer 'id'")
        where = f"{ann_file}: category id {category['id']}"
        if category["id"] in category_ids:
            raise ValueError(f"{where}: duplicate category id")
        if not isinstance(category.get("name"), str):
            raise ValueError(f"{where}: needs a 'name' string")
        category_ids.add(category["id"])

    annotation_ids = set()
    for position, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise ValueError(f"{ann_file}: annotations[{position}]: needs an integer 'id'")
        where = f"{ann_file}: annotation id {ann['id']}"
        if ann["id"] in annotation_ids:
            raise ValueError(f"{where}: duplicate annotation id")
        annotation_ids.add(ann["id"])
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise ValueError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) or v is None for v in bbox):
            raise ValueError(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
        if "area" in ann and not (_is_number(ann["area"]) or ann["area"] is None):
            raise ValueError(f"{where}: 'area' must be a number, got {ann['area']!r}")
    return data


def check_file_name(file_name: str, where: str) -> None:
    """Refuse a ``file_name`` that is absolute or climbs out of the split folder (``../../x.png``):
    a json must not make sodlab read files outside the dataset. ``where`` starts the error."""
    normalized = posixpath.normpath(file_name)
    if os.path.isabs(file_name) or normalized == ".." or normalized.startswith("../"):
        raise ValueError(f"{where}: file_name {file_name!r} leaves the split folder (absolute or '..'); "
                         "sodlab reads images only from inside it: copy or link the image there")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, RGBA, CMYK, 16-bit grayscale) -> 8-bit RGB."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        # Scale the 16-bit range to 8 bits rather than let Pillow clip it.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB") if image.mode != "RGB" else image


def _bomb_pixels(error: Image.DecompressionBombError) -> str:
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,} pixels" if found else "too many pixels"


def read_rgb_image(
    path: str | os.PathLike,
    image_id: int | None = None,
    expected_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    annotated_in: str = "the json",
) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied; errors name file and image id.

    Before any pixel is decoded, the header's size is checked against ``max_pixels`` and against
    ``expected_size`` = (height, width) as annotated (in ``annotated_in``), which must then also
    hold after the EXIF orientation.
    """
    what = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: image file not found")

    def mismatch(width: int, height: int, when: str) -> ValueError:
        return ValueError(f"{what}: image is {width}x{height}{when} but {annotated_in} says "
                          f"{expected_size[1]}x{expected_size[0]}")

    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 Mpx on; the limit below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what}: image of {_bomb_pixels(e)} is over the limit of {max_pixels:,} "
                         "(sodlab.data.coco.MAX_IMAGE_PIXELS); refused before decoding") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        # Pillow raises SyntaxError for some corrupt PNG chunks.
        raise OSError(f"{what}: cannot read image: {e}") from e
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"{what}: image of {width}x{height} = {width * height:,} pixels is over the limit of "
                             f"{max_pixels:,} (sodlab.data.coco.MAX_IMAGE_PIXELS); refused before decoding")
        # EXIF orientation may swap the sides; the exact check follows the decode.
        if expected_size is not None and tuple(expected_size) not in ((height, width), (width, height)):
            raise mismatch(width, height, " (in its header)")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{what}: image of {_bomb_pixels(e)} is over Pillow's limit; refused") from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise OSError(f"{what}: cannot read image: {e}") from e
    if expected_size is not None and (image.height, image.width) != tuple(expected_size):
        raise mismatch(image.width, image.height, " (after EXIF orientation)")
    return image


# Why apply_box_policy drops a box, in the words of its warning.
_NOT_FINITE, _EMPTY, _OUTSIDE = "with a null, NaN or infinite value", "of zero or negative size", "outside their image"


def _policy_box(bbox: list, width: float, height: float) -> tuple[list[float] | None, str | None]:
    """COCO [x, y, w, h] -> (the box clipped to the image, None) or (None, why it is dropped)."""
    if any(v is None or not math.isfinite(v) for v in bbox):
        return None, _NOT_FINITE
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, _EMPTY
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None, _OUTSIDE
    return [x1, y1, x2 - x1, y2 - y1], None


def apply_box_policy(data: dict, ann_file: str | os.PathLike, used_for: str) -> list[dict]:
    """sodlab's one policy for bad boxes, applied alike to the dataset's (training) targets, the
    evaluation ground truth, the FiftyOne ground truth and the SR patches (crowd regions included).

    ``data`` is a COCO json that passed ``load_coco_json`` (every image has its width and height).
    A box with a null, NaN or infinite value, a width or height <= 0, or no overlap with its image
    is dropped; a box partly outside its image is clipped to it. Returns copies of the kept
    annotations with ``bbox`` the clipped [x, y, w, h] and ``area`` the json's when it is a finite
    number, else the clipped box's w*h. Warns once, naming the file and ``used_for``, with a
    count per reason.
    """
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    kept, dropped, clipped = [], Counter(), 0
    for ann in data["annotations"]:
        box, reason = _policy_box(ann["bbox"], *sizes[ann["image_id"]])
        if box is None:
            dropped[reason] += 1
            continue
        clipped += box != [float(v) for v in ann["bbox"]]
        area = ann.get("area")
        if not _is_number(area) or not math.isfinite(area):
            area = box[2] * box[3]
        kept.append({**ann, "bbox": box, "area": area})
    if dropped or clipped:
        parts = []
        if dropped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
            parts.append(f"skipped {sum(dropped.values())} degenerate annotation(s) from the {used_for} ({reasons})")
        if clipped:
            where = "" if dropped else f" in the {used_for}"
            parts.append(f"clipped {clipped} box(es) partly outside their image{where}")
        warnings.warn(f"{ann_file}: " + "; ".join(parts), stacklevel=2)
    return kept


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split as ``(image, target)`` in torchvision detection format.

    ``image`` is a float ``tv_tensors.Image`` [3, H, W] in [0, 1]. ``target`` holds ``boxes``
    (``tv_tensors.BoundingBoxes`` xyxy, pixels), ``labels`` (int64, 1..C), ``image_id`` (int),
    ``area`` (float, the json's ``area`` in original-image pixels, or w*h when absent) and
    ``iscrowd`` (int64, all 0 because crowd annotations are left out). Images without
    annotations are kept, with ``boxes`` of shape [0, 4].

    ``transforms(image, target)`` sees a uint8 image and the target; see ``make_transforms``.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        hr_dir: str | os.PathLike | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        hr_reduce: int = 1,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        # Exact high-resolution twins (embedded benchmark, DIR/{split}_x{k}/): returned as
        # target["hr_image"], an Image, so transforms.v2 flips it together with the image.
        self.hr_dir = Path(hr_dir) if hr_dir is not None else None
        self.hr_reduce = hr_reduce  # each twin is area-averaged by this first (twins of a multiple of k)
        self.max_pixels = max_pixels
        data = load_coco_json(self.ann_file)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in categories]
        self.cat_id_to_label: dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = [BACKGROUND] + [c["name"] for c in categories]

        self.images: dict[int, dict] = {image["id"]: image for image in data["images"]}
        self.ids: list[int] = sorted(self.images)

        boxes: dict[int, list] = {image_id: [] for image_id in self.ids}
        labels: dict[int, list] = {image_id: [] for image_id in self.ids}
        areas: dict[int, list] = {image_id: [] for image_id in self.ids}
        annotations = apply_box_policy(data, self.ann_file, "dataset's targets")
        self.num_degenerate = len(data["annotations"]) - len(annotations)
        self.num_crowd = 0
        for ann in annotations:
            if ann.get("iscrowd", 0):
                self.num_crowd += 1
                continue
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append((x, y, x + w, y + h))
            labels[ann["image_id"]].append(self.cat_id_to_label[ann["category_id"]])
            areas[ann["image_id"]].append(ann["area"])

        # Tensors built once here, so __getitem__ only reads the image.
        self._boxes = {i: torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4) for i in self.ids}
        self._labels = {i: torch.tensor(labels[i], dtype=torch.int64) for i in self.ids}
        self._areas = {i: torch.tensor(areas[i], dtype=torch.float32) for i in self.ids}

    @property
    def scale(self) -> float:
        """The resize factor of a ``ResizeBy`` in ``transforms`` (1.0 without one)."""
        for transform in getattr(self.transforms, "transforms", [self.transforms]):
            if isinstance(transform, ResizeBy):
                return transform.scale
        return 1.0

    @property
    def num_classes(self) -> int:
        """Number of classes including background (what torchvision's ``num_classes`` expects)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def original_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) of the image as annotated, before any transform."""
        image = self.images[image_id]
        return int(image["height"]), int(image["width"])

    def boxes(self, image_id: int) -> torch.Tensor:
        """The image's non-crowd boxes [N, 4] (xyxy, original pixels), without reading the image."""
        return self._boxes[image_id].clone()

    def load_image(self, image_id: int) -> tv_tensors.Image:
        """The image as a uint8 [3, H, W] tensor; its size must match the json's width/height."""
        image = read_rgb_image(self.image_path(image_id), image_id, self.original_size(image_id),
                               self.max_pixels, self.ann_file.name)
        return tv_tensors.Image(F.pil_to_tensor(image))

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        boxes = self._boxes[image_id]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes.clone(), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(image.shape[-2:])
            ),
            "labels": self._labels[image_id].clone(),
            "image_id": image_id,
            "area": self._areas[image_id].clone(),
            "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        }
        if self.hr_dir is not None:
            hr_image = read_twin((self.hr_dir, self.hr_reduce), self.images[image_id]["file_name"], image_id,
                                 max_pixels=self.max_pixels)
            target["hr_image"] = tv_tensors.Image(F.pil_to_tensor(hr_image))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if not image.is_floating_point():
            image = F.to_dtype(image, torch.float32, scale=True)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.ann_file}, images={len(self)}, "
            f"classes={self.num_classes - 1}, crowd_skipped={self.num_crowd}, degenerate_skipped={self.num_degenerate})"
        )


class ResizeBy(v2.Transform):
    """Resize images and boxes by a constant factor (the "upscale the input" baseline).

    torchvision's ``v2.Resize`` takes a target size; this takes a factor, so images of any size work.
    """

    def __init__(self, scale: float, antialias: bool = True) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale
        self.antialias = antialias

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Image and boxes report the same (H, W), so each gets the same new size.
        height, width = F.get_size(inpt)
        size = [max(1, round(height * self.scale)), max(1, round(width * self.scale))]
        return self._call_kernel(F.resize, inpt, size=size, antialias=self.antialias)


def _labels_area_iscrowd(inputs: Any) -> tuple[torch.Tensor, ...]:
    """For SanitizeBoundingBoxes: every per-box tensor of the target, so they stay aligned."""
    target = inputs[1]
    return target["labels"], target["area"], target["iscrowd"]


def make_transforms(train: bool, hflip_prob: float = 0.5, scale: float = 1.0) -> v2.Compose:
    """Detection transforms: optional resize by ``scale``, random h-flip when training, uint8 -> float.

    ``area`` is left in original-image pixels (the model does not use it; evaluation reads the json).
    """
    transforms: list[Callable] = []
    if scale != 1.0:
        transforms.append(ResizeBy(scale))
    if train and hflip_prob > 0:
        transforms.append(v2.RandomHorizontalFlip(p=hflip_prob))
    transforms += [
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(labels_getter=_labels_area_iscrowd),
    ]
    return v2.Compose(transforms)


def collate_fn(batch: list) -> tuple:
    """Images of different sizes cannot be stacked: keep (images, targets) as tuples."""
    return tuple(zip(*batch))


def coco_paths(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image_dir, ann_file) = (DIR/{split}/, DIR/annotations/instances_{split}.json), checked to exist."""
    data_dir = Path(data_dir)
    image_dir = data_dir / split
    ann_file = data_dir / "annotations" / f"instances_{split}.json"
    missing = [str(p) for p in (ann_file, image_dir) if not p.exists()]
    if missing:
        available = sorted(p.name for p in (data_dir / "annotations").glob("instances_*.json"))
        hint = f"; annotation files present: {', '.join(available)}" if available else ""
        raise FileNotFoundError(
            f"COCO split {split!r} in {data_dir}: not found: {', '.join(missing)} "
            f"(expected DIR/annotations/instances_{{split}}.json and DIR/{{split}}/){hint}"
        )
    return image_dir, ann_file


def twin_dir(data_dir: str | os.PathLike, split: str, k: int) -> Path | None:
    """DIR/{split}_x{k}/, the split's exact xk twins (``sodlab synth --hr-scale k``, ``sodlab convert
    --twins k``), or None when the data has none."""
    path = Path(data_dir) / f"{split}_x{k}"
    return path if path.is_dir() else None


def written_twin_scales(data_dir: str | Path, split: str) -> list[int]:
    """The scales k of the twins written for a split (DIR/{split}_xk/), smallest first."""
    return sorted(int(p.name.rsplit("_x", 1)[1]) for p in Path(data_dir).glob(f"{split}_x*")
                  if p.is_dir() and p.name.rsplit("_x", 1)[1].isdigit())


def twin_source(data_dir: str | os.PathLike, split: str, k: int) -> tuple[Path, int] | None:
    """Where a split's xk twins come from: (DIR/{split}_xk/, 1) when written, else (DIR/{split}_xm/,
    m // k) for the smallest written m that k divides, each twin area-averaged by m // k on
    load (an x4 twin serves a x2 G: the LR image is the same area average, up to uint8 rounding),
    or None when the data has neither."""
    if (folder := twin_dir(data_dir, split, k)) is not None:
        return folder, 1
    for m in written_twin_scales(data_dir, split):
        if m > k and m % k == 0:
            return Path(data_dir) / f"{split}_x{m}", m // k
    return None


def read_twin(source: tuple[Path, int], file_name: str, image_id: int | None = None,
              max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image's twin from a ``twin_source``: read, then area-averaged by its factor."""
    folder, factor = source
    twin = read_rgb_image(Path(folder) / file_name, image_id, max_pixels=max_pixels)
    return twin if factor == 1 else Image.fromarray(area_downsample(np.asarray(twin), factor))


def area_downsample(img: np.ndarray, k: int) -> np.ndarray:
    """Average each k x k block. uint8 in, uint8 out (rounded half up, exactly); float stays float."""
    k = int(k)
    height, width = img.shape[:2]
    if height % k or width % k:
        raise ValueError(f"image of {width}x{height} pixels is not divisible by the factor {k}")
    blocks = img.reshape(height // k, k, width // k, k, *img.shape[2:])
    if img.dtype == np.uint8:
        # Integer sums make the result independent of float summation order: bit-exact anywhere.
        # Adding the k strided slices one by one is ~8x faster than ndarray.sum over axes (1, 3).
        acc = np.uint16 if k * k * 255 <= np.iinfo(np.uint16).max else np.uint32
        rows = blocks[:, 0].astype(acc)
        for i in range(1, k):
            rows += blocks[:, i]
        total = rows[:, :, 0].copy()
        for j in range(1, k):
            total += rows[:, :, j]
        return ((total + (k * k) // 2) // (k * k)).astype(np.uint8)
    return blocks.mean(axis=(1, 3))


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    train: bool,
    scale: float = 1.0,
    hflip_prob: float = 0.5,
    hr_scale: int | None = None,
) -> CocoDetection:
    """The dataset for DIR/{split} with ``make_transforms(train, hflip_prob, scale)``.

    ``hr_scale=k`` also returns the exact xk twin of every image as target["hr_image"], from
    DIR/{split}_x{k}/ (written by ``sodlab synth --hr-scale k``), or area-averaged from written
    twins of a multiple of k (``twin_source``).
    """
    image_dir, ann_file = coco_paths(data_dir, split)
    hr_dir, hr_reduce = None, 1
    if hr_scale is not None:
        source = twin_source(data_dir, split, hr_scale)
        if source is None:
            raise FileNotFoundError(
                f"{Path(data_dir) / f'{split}_x{hr_scale}'}: no x{hr_scale} twins for split {split!r} (nor twins of a "
                f"multiple of {hr_scale}); take HR patches from the images themselves "
                f"(--sr-hr-source image), or train on data with twins: real images as exact twins of an "
                f"area-averaged LR copy (`sodlab convert ... --twins {hr_scale}`), or the embedded benchmark "
                f"(`sodlab synth --hr-scale {hr_scale}`)")
        hr_dir, hr_reduce = source
    return CocoDetection(image_dir, ann_file, make_transforms(train, hflip_prob=hflip_prob, scale=scale), hr_dir,
                         hr_reduce=hr_reduce)

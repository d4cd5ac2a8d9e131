"""Pascal VOC, YOLO and VisDrone-DET annotations -> sodlab's COCO layout, and HR twins from real images.

``convert_voc`` / ``convert_yolo`` / ``convert_visdrone`` (or ``convert(format, ...)``) write

    OUT/annotations/instances_{split}.json   COCO detection json
    OUT/{split}/{file_name}                  the source images, symlinked (or copied)

``make_twins(coco_dir, out_dir, k)`` turns a COCO folder of real images into a working LR dataset
with exact HR twins, the layout the embedded benchmark writes with ``--hr-scale k`` and
``load_split(hr_scale=k)`` reads:

    OUT/{split}_x{k}/{stem}.png   the native images (cropped to a multiple of k): the HR twins
    OUT/{split}/{stem}.png        their k x k area averages: the LR images the detector trains on
    OUT/annotations/instances_{split}.json   boxes and areas scaled by 1/k

Ignore regions become COCO crowd annotations (``iscrowd: 1``): ``CocoDetection`` leaves them out
of the training targets, and COCOeval ignores detections that fall inside them. COCOeval matches
per category, so a class-agnostic ignore region (VOC ``DontCare``, VisDrone's ignored regions) is
written once per category, each copy marked ``"ignore_region": true``; a ``difficult`` VOC object
is a crowd annotation of its own class only.

Boxes are stored as COCO [x, y, w, h] in pixel-edge coordinates (a box of one pixel at column 0 is
x=0, w=1), ``area`` = w * h. A box partly outside its image is clipped to it; a box with no
positive width or height, a non-number or a box entirely outside the image is an error naming the
file and the object. Image sizes come from the image files (after EXIF orientation, as
``read_rgb_image`` applies it), never from the annotation alone.

Outputs appear whole or not at all: everything is written into a hidden sibling folder that is
renamed to OUT at the end.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from sodlab.data.coco import area_downsample, load_coco_json, read_rgb_image
from sodlab.io import atomic_write_json

FORMATS = ("voc", "yolo", "visdrone")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CONVERT_VERSION = 1

# VOC/YOLO class names that mark a region to ignore for every class (KITTI's and HIT-UAV's).
IGNORE_NAMES = ("DontCare",)

# VisDrone-DET's object_category column (the VisDrone2019 toolkit's class list). 0 and 11 are not
# classes: 0 marks ignored regions, 11 "others" objects of no listed class (see VISDRONE_POLICY).
VISDRONE_CLASSES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle",
                    "bus", "motor")
VISDRONE_IGNORED_REGION = 0
VISDRONE_OTHERS = 11
VISDRONE_COLUMNS = ("bbox_left", "bbox_top", "bbox_width", "bbox_height", "score", "object_category",
                    "truncation", "occlusion")
VISDRONE_POLICY = ("categories 1-10 are the COCO categories (same ids); category 0 (ignored regions), any box "
                   "with score 0, and category 11 (others: an object of none of the ten classes, which no "
                   "class should be charged for finding or missing) are ignore regions for every class")

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass
class _Object:
    """One annotated region. ``name`` None: an ignore region for every class."""

    name: str | None
    box: tuple[float, float, float, float]  # xyxy, pixel edges, clipped to the image
    crowd: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class _Image:
    source: Path
    file_name: str  # relative path under OUT/{split}/
    width: int
    height: int
    objects: list[_Object]


# --- shared checks ---------------------------------------------------------------------------------

def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as sodlab will see the image: after its EXIF orientation. Reads the header only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise OSError(f"{path}: cannot read image: {e}") from e
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _number(text, where: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {what} {text!r} is not a finite number")
    return value


def _checked_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int, where: str,
                 counts: dict) -> tuple[float, float, float, float]:
    """xyxy clipped to the image; an error for an empty box or one entirely outside the image."""
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where}: empty box (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}): needs positive width and height")
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
               min(max(y1, 0.0), height))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise ValueError(f"{where}: box (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}) lies outside the "
                         f"{width}x{height} image")
    if clipped != (x0, y0, x1, y1):
        counts["clipped"] = counts.get("clipped", 0) + 1
    return clipped


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# --- Pascal VOC ------------------------------------------------------------------------------------

def voc_splits(src: Path) -> list[str]:
    """The split lists of ImageSets/Main: every NAME.txt except VOC's per-class CLASS_NAME.txt files."""
    main = src / "ImageSets" / "Main"
    names = sorted(p.stem for p in main.glob("*.txt"))
    return [n for n in names if not any(n.endswith(f"_{other}") for other in names if other != n)]


def _voc_text(element: ET.Element, tag: str, where: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _read_voc_xml(path: Path) -> tuple[ET.Element, list[dict]]:
    """The root and the raw objects (name, difficult, the four bndbox numbers) of one VOC file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: invalid XML: {e}") from None
    objects = []
    for number, obj in enumerate(root.findall("object"), start=1):
        name_element = obj.find("name")
        name = name_element.text.strip() if name_element is not None and name_element.text else None
        where = f"{path}: object {number}" + (f" ({name!r})" if name else "")
        if not name:
            raise ValueError(f"{where}: missing <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{where}: missing <bndbox>")
        coords = [_number(_voc_text(bndbox, tag, where), where, tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        difficult = obj.find("difficult")
        difficult = difficult is not None and (difficult.text or "0").strip() not in ("0", "")
        objects.append({"name": name, "difficult": difficult, "coords": coords, "where": where})
    return root, objects


def convert_voc(src: str | os.PathLike, out: str | os.PathLike, splits: Iterable[str] | None = None,
                class_names: Iterable[str] | None = None, ignore_names: Iterable[str] = IGNORE_NAMES,
                coordinates: str = "auto", copy: bool = False, overwrite: bool = False) -> dict:
    """Pascal VOC (``Annotations/ID.xml``, ``JPEGImages/ID.*``, ``ImageSets/Main/SPLIT.txt``) -> COCO.

    ``splits``: the ImageSets/Main lists to convert (default: all, ``voc_splits``). ``class_names``:
    the categories in id order (default: every name found, sorted, minus ``ignore_names``);
    a name outside it is an error. Objects named in ``ignore_names`` are ignore regions for every
    class; ``difficult`` objects are crowd annotations of their class (VOC's protocol: neither a
    true nor a false positive). ``coordinates``: "one-based" is the VOC devkit's convention
    (inclusive 1-based pixel indices: x = xmin - 1, w = xmax - xmin + 1), "zero-based" takes
    xmin..xmax as pixel edges (many converted datasets, HIT-UAV among them); "auto" reads the
    whole dataset first and picks zero-based when some xmin or ymin is 0, which one-based indices
    cannot be, else one-based. The choice is in the summary and in the json's ``info``.
    """
    src, started = Path(src), time.perf_counter()
    _check_out(Path(out), overwrite)  # before reading the whole dataset
    if coordinates not in ("auto", "one-based", "zero-based"):
        raise ValueError(f"coordinates must be auto, one-based or zero-based, got {coordinates!r}")
    main = src / "ImageSets" / "Main"
    if not main.is_dir() or not (src / "Annotations").is_dir():
        raise FileNotFoundError(f"{src}: not a Pascal VOC folder (expected Annotations/, JPEGImages/ and "
                                "ImageSets/Main/SPLIT.txt)")
    splits = list(splits) if splits is not None else voc_splits(src)
    if not splits:
        raise FileNotFoundError(f"{main}: no split lists (SPLIT.txt)")
    image_files = {p.stem: p for p in sorted((src / "JPEGImages").iterdir())
                   if p.suffix.lower() in IMAGE_SUFFIXES} if (src / "JPEGImages").is_dir() else {}

    raw: dict[str, list[tuple[str, Path, list[dict], ET.Element]]] = {}
    for split in splits:
        list_file = main / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: no such split list (present: {', '.join(voc_splits(src))})")
        entries = []
        for line_number, line in enumerate(list_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            image_id = line.split()[0]
            xml = src / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise FileNotFoundError(f"{list_file}, line {line_number}: {xml} not found")
            if image_id not in image_files:
                raise FileNotFoundError(f"{list_file}, line {line_number}: no image {image_id}.* in "
                                        f"{src / 'JPEGImages'}")
            root, objects = _read_voc_xml(xml)
            entries.append((image_id, xml, objects, root))
        raw[split] = entries

    all_objects = [obj for entries in raw.values() for _, _, objects, _ in entries for obj in objects]
    if coordinates == "auto":
        touches_origin = any(obj["coords"][0] == 0 or obj["coords"][1] == 0 for obj in all_objects)
        coordinates = "zero-based" if touches_origin else "one-based"
    offset = 1.0 if coordinates == "one-based" else 0.0
    ignore = set(ignore_names)
    names = _category_names(class_names, {obj["name"] for obj in all_objects} - ignore, ignore, src)

    records: dict[str, list[_Image]] = {}
    counts: dict[str, dict] = {}
    for split, entries in raw.items():
        counts[split] = {}
        records[split] = []
        for image_id, xml, objects, root in entries:
            path = image_files[image_id]
            width, height = image_size(path)
            size = root.find("size")
            if size is not None:
                declared = [size.findtext(tag, "").strip() for tag in ("width", "height")]
                if all(declared) and declared != ["0", "0"]:
                    declared_wh = tuple(_number(v, f"{xml}: <size>", tag)
                                        for v, tag in zip(declared, ("width", "height")))
                    if declared_wh != (width, height):
                        raise ValueError(f"{xml}: <size> says {declared[0]}x{declared[1]} but {path.name} is "
                                         f"{width}x{height} (after EXIF orientation)")
            converted = []
            for obj in objects:
                name = obj["name"]
                if name not in ignore and name not in names:
                    raise ValueError(f"{obj['where']}: class {name!r} is not one of the class names {names}")
                x0, y0, x1, y1 = obj["coords"]
                box = _checked_box(x0 - offset, y0 - offset, x1, y1, width, height, obj["where"], counts[split])
                if name in ignore:
                    converted.append(_Object(None, box, crowd=True))
                else:
                    converted.append(_Object(name, box, crowd=obj["difficult"],
                                             extra={"difficult": 1} if obj["difficult"] else {}))
            records[split].append(_Image(path, path.name, width, height, converted))
    info = {"format": "voc", "coordinates": coordinates, "ignore_names": sorted(ignore),
            "difficult": "crowd annotation of its class"}
    return _write_dataset(records, names, src, Path(out), info, copy, overwrite, counts, started)


def _category_names(class_names: Iterable[str] | None, found: set[str], ignore: set[str], src: Path) -> list[str]:
    if class_names is None:
        names = sorted(found)
    else:
        names = [n for n in class_names if n not in ignore]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names repeat {duplicates}")
    if not names:
        raise ValueError(f"{src}: no object classes found (every object is an ignore region?)")
    return names


# --- YOLO ------------------------------------------------------------------------------------------

def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (darknet's obj.names, YOLO's classes.txt); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class-names file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names (expected one name per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: class names repeat {duplicates}")
    return names


def convert_yolo(src: str | os.PathLike, out: str | os.PathLike, names: str | os.PathLike | list[str],
                 splits: Iterable[str] | None = None, ignore_names: Iterable[str] = IGNORE_NAMES,
                 copy: bool = False, overwrite: bool = False) -> dict:
    """YOLO (Ultralytics layout: ``images/SPLIT/**/*.jpg`` and ``labels/SPLIT/**/*.txt``) -> COCO.

    ``names``: the class-names file (one per line; class index i is line i) or the list itself.
    A label line is ``class cx cy w h``, the last four as fractions of the image's width and
    height; an image without a label file, or with an empty one, has no objects. Classes named in
    ``ignore_names`` are ignore regions for every class. ``splits``: subfolders of images/
    (default: all).
    """
    src, started = Path(src), time.perf_counter()
    _check_out(Path(out), overwrite)
    class_list = read_class_names(names) if isinstance(names, (str, os.PathLike)) else list(names)
    ignore = set(ignore_names)
    categories = _category_names(class_list, set(class_list) - ignore, ignore, src)
    images_root, labels_root = src / "images", src / "labels"
    if not images_root.is_dir():
        raise FileNotFoundError(f"{src}: not a YOLO folder (expected images/SPLIT/ and labels/SPLIT/)")
    splits = list(splits) if splits is not None else sorted(p.name for p in images_root.iterdir() if p.is_dir())
    if not splits:
        raise FileNotFoundError(f"{images_root}: no split folders (expected images/SPLIT/)")

    records: dict[str, list[_Image]] = {}
    counts: dict[str, dict] = {}
    for split in splits:
        folder = images_root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such split folder")
        counts[split], records[split] = {}, []
        for path in _list_images(folder):
            relative = path.relative_to(folder)
            width, height = image_size(path)
            label_file = labels_root / split / relative.with_suffix(".txt")
            objects = []
            lines = label_file.read_text().splitlines() if label_file.is_file() else []
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{label_file}: line {line_number}"
                values = line.split()
                if len(values) != 5:
                    raise ValueError(f"{where}: expected 'class cx cy w h' (5 values), got {len(values)}: "
                                     f"{line.strip()!r}")
                index = _number(values[0], where, "class")
                if index != int(index) or not 0 <= index < len(class_list):
                    raise ValueError(f"{where}: class {values[0]!r} is not an index of the {len(class_list)} "
                                     "class names")
                name = class_list[int(index)]
                where = f"{where} ({name!r})"
                cx, cy, w, h = (_number(v, where, what) for v, what in zip(values[1:], ("cx", "cy", "w", "h")))
                # Fractions -> pixels; rounding to 1/1000 px removes float noise such as 12.000000001.
                x0, x1 = round((cx - w / 2) * width, 3), round((cx + w / 2) * width, 3)
                y0, y1 = round((cy - h / 2) * height, 3), round((cy + h / 2) * height, 3)
                box = _checked_box(x0, y0, x1, y1, width, height, where, counts[split])
                objects.append(_Object(None, box, crowd=True) if name in ignore else _Object(name, box))
            records[split].append(_Image(path, relative.as_posix(), width, height, objects))
    info = {"format": "yolo", "class_names": class_list, "ignore_names": sorted(ignore)}
    return _write_dataset(records, categories, src, Path(out), info, copy, overwrite, counts, started)


# --- VisDrone-DET ----------------------------------------------------------------------------------

def _visdrone_split_name(folder: Path) -> str:
    """VisDrone2019-DET-train -> train; any other folder name is kept."""
    name = folder.name
    if name.startswith("VisDrone") and "-DET-" in name:
        return name.split("-DET-", 1)[1]
    return name


def convert_visdrone(src: str | os.PathLike, out: str | os.PathLike, splits: Iterable[str] | None = None,
                     copy: bool = False, overwrite: bool = False) -> dict:
    """VisDrone-DET (``SPLITDIR/images/*.jpg`` + ``SPLITDIR/annotations/*.txt``) -> COCO.

    ``src`` is one split folder (holding images/ and annotations/) or a folder of them
    (``VisDrone2019-DET-train`` becomes split ``train``). Each txt line is ``bbox_left, bbox_top,
    bbox_width, bbox_height, score, object_category, truncation, occlusion``; the policy for
    categories 0 and 11 and score 0 is ``VISDRONE_POLICY``. Truncation and occlusion are kept as
    annotation fields.
    """
    src, started = Path(src), time.perf_counter()
    _check_out(Path(out), overwrite)
    if (src / "images").is_dir() and (src / "annotations").is_dir():
        folders = {_visdrone_split_name(src): src}
    else:
        folders = {_visdrone_split_name(p): p for p in sorted(src.iterdir())
                   if (p / "images").is_dir() and (p / "annotations").is_dir()} if src.is_dir() else {}
    if not folders:
        raise FileNotFoundError(f"{src}: no VisDrone-DET split (expected SPLITDIR/images/ and SPLITDIR/annotations/)")
    if splits is not None:
        missing = sorted(set(splits) - set(folders))
        if missing:
            raise FileNotFoundError(f"{src}: no VisDrone split {missing} (present: {sorted(folders)})")
        folders = {s: folders[s] for s in splits}

    records: dict[str, list[_Image]] = {}
    counts: dict[str, dict] = {}
    for split, folder in folders.items():
        counts[split], records[split] = {}, []
        for path in _list_images(folder / "images"):
            relative = path.relative_to(folder / "images")
            width, height = image_size(path)
            ann_file = folder / "annotations" / relative.with_suffix(".txt")
            if not ann_file.is_file():
                raise FileNotFoundError(f"{ann_file}: annotation file of {path.name} not found")
            objects = []
            for line_number, line in enumerate(ann_file.read_text().splitlines(), start=1):
                values = [v.strip() for v in line.strip().rstrip(",").split(",")]
                if values == [""]:
                    continue
                where = f"{ann_file}: line {line_number}"
                if len(values) != len(VISDRONE_COLUMNS):
                    raise ValueError(f"{where}: expected {len(VISDRONE_COLUMNS)} comma-separated values "
                                     f"({','.join(VISDRONE_COLUMNS)}), got {len(values)}")
                left, top, w, h, score, category, truncation, occlusion = (
                    _number(v, where, column) for v, column in zip(values, VISDRONE_COLUMNS))
                if category != int(category) or not 0 <= category <= VISDRONE_OTHERS:
                    raise ValueError(f"{where}: object_category {values[5]!r} is not 0..{VISDRONE_OTHERS}")
                category = int(category)
                name = VISDRONE_CLASSES[category - 1] if 1 <= category <= len(VISDRONE_CLASSES) else None
                where = f"{where} ({name or ('ignored region' if category == 0 else 'others')!r})"
                box = _checked_box(left, top, left + w, top + h, width, height, where, counts[split])
                extra = {"truncation": int(truncation), "occlusion": int(occlusion)}
                if name is None or score == 0:
                    objects.append(_Object(None, box, crowd=True, extra={"visdrone_category": category}))
                else:
                    objects.append(_Object(name, box, extra=extra))
            records[split].append(_Image(path, relative.as_posix(), width, height, objects))
    info = {"format": "visdrone", "policy": VISDRONE_POLICY}
    return _write_dataset(records, list(VISDRONE_CLASSES), src, Path(out), info, copy, overwrite, counts,
                          started)


# --- writing ---------------------------------------------------------------------------------------

def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless overwrite."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: directory is not empty; refusing to write a dataset into it "
                              "(pass overwrite=True / --overwrite)")


def _staging_dir(out: Path, overwrite: bool) -> Path:
    """A fresh hidden sibling of ``out`` to build in (``out`` checked by ``_check_out``)."""
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` folder (a rename: readers see old or new)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def _write_dataset(records: dict[str, list[_Image]], names: list[str], src: Path, out: Path, info: dict,
                   copy: bool, overwrite: bool, counts: dict, started: float) -> dict:
    """Link or copy the images and write one COCO json per split into ``out``; the summary."""
    ids = list(range(1, len(names) + 1))
    name_to_id = dict(zip(names, ids))
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(ids, names)]
    staging = _staging_dir(out, overwrite)
    summary = {"format": info["format"], "src": str(src), "out": str(out), "images": "copied" if copy else "symlinked",
               "categories": names, "splits": {}}
    try:
        for split, images in records.items():
            coco_images, annotations = [], []
            split_dir = staging / split
            split_dir.mkdir()
            ignore_regions = difficult = 0
            for image_id, record in enumerate(images, start=1):
                target = split_dir / record.file_name
                target.parent.mkdir(parents=True, exist_ok=True)
                if copy:
                    shutil.copy2(record.source, target)
                else:
                    target.symlink_to(record.source.resolve())
                coco_images.append({"id": image_id, "file_name": record.file_name, "width": record.width,
                                    "height": record.height})
                for obj in record.objects:
                    x0, y0, x1, y1 = obj.box
                    ann = {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                           "iscrowd": int(obj.crowd), **obj.extra}
                    if obj.name is None:  # class-agnostic: one crowd copy per category
                        ignore_regions += 1
                        copies = [{**ann, "category_id": i, "ignore_region": True} for i in ids]
                    else:
                        difficult += bool(obj.extra.get("difficult"))
                        copies = [{**ann, "category_id": name_to_id[obj.name]}]
                    for c in copies:
                        annotations.append({"id": len(annotations) + 1, "image_id": image_id, **c})
            if not coco_images:
                raise ValueError(f"{src}: split {split!r} has no images")
            atomic_write_json(staging / "annotations" / f"instances_{split}.json",
                              {"info": {"sodlab_convert": {**info, "src": str(src), "version": CONVERT_VERSION}},
                               "images": coco_images, "annotations": annotations, "categories": categories},
                              indent=None)
            summary["splits"][split] = {
                "images": len(coco_images),
                "objects": sum(not a["iscrowd"] for a in annotations),
                "crowd_annotations": sum(a["iscrowd"] for a in annotations),
                "ignore_regions": ignore_regions,  # each written once per category
                "difficult": difficult,
                "clipped_boxes": counts.get(split, {}).get("clipped", 0),
            }
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - started
    if "coordinates" in info:
        summary["coordinates"] = info["coordinates"]
    return summary


def convert(format: str, src: str | os.PathLike, out: str | os.PathLike, names: str | os.PathLike | None = None,
            splits: Iterable[str] | None = None, coordinates: str = "auto", twins: int | None = None,
            copy: bool = False, overwrite: bool = False) -> dict:
    """``sodlab convert``: ``convert_voc`` / ``convert_yolo`` / ``convert_visdrone`` by ``format``.

    ``names``: the class-names file (required for YOLO; for VOC it fixes the category order).
    ``splits``: the splits to convert (default: all). ``coordinates``: VOC's box convention
    (see ``convert_voc``). ``twins=k``: OUT becomes the LR working dataset whose xk HR twins are
    the native images (``make_twins``); the plain COCO conversion is then an intermediate
    (images linked, whatever ``copy`` says) that is removed afterwards.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "yolo" and names is None:
        raise ValueError("YOLO labels hold class indices: give the class-names file (--names FILE)")
    if format == "visdrone" and names is not None:
        raise ValueError("VisDrone has its own class list; --names does not apply")
    if format != "voc" and coordinates != "auto":
        raise ValueError(f"the box coordinate convention is a VOC option; {format} boxes have one convention")
    if twins is not None and not (isinstance(twins, int) and twins >= 2):
        raise ValueError(f"the twin scale must be an integer >= 2, got {twins!r}")
    out = Path(out)
    if twins is None:
        target, intermediate = out, None
    else:
        _check_out(out, overwrite)  # refuse a non-empty OUT before the work, not after it
        intermediate = out.parent / f".{out.name}.coco-{os.getpid()}"
        target, copy = intermediate, False
    overwrite_target = overwrite if twins is None else True
    started = time.perf_counter()
    try:
        if format == "voc":
            class_names = read_class_names(names) if names is not None else None
            summary = convert_voc(src, target, splits, class_names, coordinates=coordinates, copy=copy,
                                  overwrite=overwrite_target)
        elif format == "yolo":
            summary = convert_yolo(src, target, names, splits, copy=copy, overwrite=overwrite_target)
        else:
            summary = convert_visdrone(src, target, splits, copy=copy, overwrite=overwrite_target)
        if twins is not None:
            summary["twins"] = make_twins(intermediate, out, twins, overwrite=overwrite, source=src)
            summary["out"] = str(out)
    finally:
        if intermediate is not None and intermediate.exists():
            shutil.rmtree(intermediate)
    summary["seconds"] = time.perf_counter() - started
    return summary


# --- HR twins from real images ---------------------------------------------------------------------

def _png(path: Path, pixels: np.ndarray) -> None:
    # compress_level 1: the twins are large and read once per epoch; the pixels are what matters.
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def make_twins(src: str | os.PathLike, out: str | os.PathLike, k: int, splits: Iterable[str] | None = None,
               overwrite: bool = False, source: str | os.PathLike | None = None) -> dict:
    """A COCO folder of real images -> an LR dataset whose exact xk HR twins are those images.

    For every split (default: every annotations/instances_SPLIT.json of ``src``) and image:
    the image as sodlab reads it (8-bit, EXIF orientation applied; 16-bit rescaled as
    ``read_rgb_image`` does) is cropped to a multiple of k by dropping the right and bottom
    remainder (fewer than k pixels; the summary counts the cropped images) and written as the HR
    twin ``{split}_x{k}/{stem}.png``; its k x k area average (``synth.area_downsample``: integer
    sums, rounded half up) is the LR image ``{split}/{stem}.png``. Grayscale images stay
    single-channel PNGs. Boxes are clipped to the crop and divided by k, areas by k^2 (a box
    that the crop leaves empty is dropped and counted). ``load_split(out, split, hr_scale=k)``
    then returns each LR image with its twin, as for the embedded benchmark's ``--hr-scale k``.
    ``source`` is the dataset recorded as the twins' origin (info.sodlab_twins.src; default: src):
    ``convert`` names the dataset it converted, not its temporary COCO folder.
    """
    src, out, started = Path(src), Path(out), time.perf_counter()
    source = str(src if source is None else source)
    if not (isinstance(k, int) and k >= 2):
        raise ValueError(f"the twin scale must be an integer >= 2, got {k!r}")
    if splits is None:
        splits = sorted(p.name[len("instances_"):-len(".json")] for p in (src / "annotations").glob("instances_*.json"))
    splits = list(splits)
    if not splits:
        raise FileNotFoundError(f"{src}: no annotations/instances_SPLIT.json to make twins of")
    staging = _staging_dir(out, overwrite)
    summary = {"src": source, "out": str(out), "scale": k, "splits": {}}
    try:
        for split in splits:
            ann_file = src / "annotations" / f"instances_{split}.json"
            if not ann_file.is_file():
                raise FileNotFoundError(f"{ann_file}: not found")
            coco = load_coco_json(ann_file)
            (staging / split).mkdir()
            (staging / f"{split}_x{k}").mkdir()
            images = {image["id"]: image for image in coco["images"]}
            crops: dict[int, tuple[int, int]] = {}
            names_seen: dict[str, int] = {}
            cropped = 0
            for image in coco["images"]:
                path = src / split / image["file_name"]
                pixels = np.asarray(read_rgb_image(path, image["id"]))
                height, width = pixels.shape[:2]
                if (width, height) != (image["width"], image["height"]):
                    raise ValueError(f"{path} (image id {image['id']}): image is {width}x{height} but "
                                     f"{ann_file.name} says {image['width']}x{image['height']}")
                crop_w, crop_h = width - width % k, height - height % k
                if crop_w == 0 or crop_h == 0:
                    raise ValueError(f"{path} (image id {image['id']}): {width}x{height} is smaller than the "
                                     f"twin scale {k}")
                cropped += (crop_w, crop_h) != (width, height)
                crops[image["id"]] = (crop_w, crop_h)
                hr = pixels[:crop_h, :crop_w]
                if (hr[..., 0] == hr[..., 1]).all() and (hr[..., 0] == hr[..., 2]).all():
                    hr = np.ascontiguousarray(hr[..., 0])  # grayscale: sodlab reads it back as RGB
                file_name = Path(image["file_name"]).with_suffix(".png").as_posix()
                if file_name in names_seen:
                    raise ValueError(f"{ann_file}: image ids {names_seen[file_name]} and {image['id']} would both "
                                     f"be written as {file_name}")
                names_seen[file_name] = image["id"]
                for folder, data in ((f"{split}_x{k}", hr), (split, area_downsample(hr, k))):
                    (staging / folder / file_name).parent.mkdir(parents=True, exist_ok=True)
                    _png(staging / folder / file_name, data)
                image.update(file_name=file_name, width=crop_w // k, height=crop_h // k)

            annotations, dropped = [], 0
            for ann in coco["annotations"]:
                crop_w, crop_h = crops[ann["image_id"]]
                x, y, w, h = (float(v) for v in ann["bbox"])
                x0, y0 = min(max(x, 0.0), crop_w), min(max(y, 0.0), crop_h)
                x1, y1 = min(max(x + w, 0.0), crop_w), min(max(y + h, 0.0), crop_h)
                if not (x1 > x0 and y1 > y0):
                    dropped += 1
                    continue
                area = ann.get("area")
                area = (x1 - x0) * (y1 - y0) if area is None else area * ((x1 - x0) * (y1 - y0)) / (w * h)
                annotations.append({**ann, "bbox": [x0 / k, y0 / k, (x1 - x0) / k, (y1 - y0) / k],
                                    "area": area / (k * k)})
            coco["annotations"] = annotations
            coco.setdefault("info", {})["sodlab_twins"] = {
                "scale": k, "src": source, "lr": f"{k}x{k} area average of the HR twin",
                "crop": "right and bottom remainder (< k px) removed before reducing"}
            atomic_write_json(staging / "annotations" / f"instances_{split}.json", coco, indent=None)
            summary["splits"][split] = {"images": len(images), "cropped_images": cropped,
                                        "annotations": len(annotations), "dropped_by_crop": dropped}
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - started
    return summary

"""``sodlab check``: a COCO-format dataset validated without training, every problem at once.

Training stops at the first bad record (``load_coco_json``); this check reads a whole dataset and
lists every problem, one line each naming the file and the record, so a converted dataset is
fixed in one pass instead of one failed run per mistake:

* layout: DIR/annotations/instances_{split}.json and DIR/{split}/ (data/README.md);
* the json: images, annotations and categories lists; ids unique and consistent;
* images: each file present and readable, its size (read from the header, after its EXIF
  rotation, as ``read_rgb_image`` applies it; nothing is decoded) the json's width and height;
* boxes: [x, y, w, h] of finite numbers, positive width and height, inside the image;
* categories: the same list in every split (classes are numbered by category id within each
  json), no class that is an ignore region (``DontCare``).

Near-COCO files are recognised and the fix is named: an ``annotation`` key for ``annotations``,
``filename`` for ``file_name``, a json not named instances_{split}.json, file names that repeat
the split folder, boxes that look like [x1, y1, x2, y2]. Category ids from 0 and images in the
folder that no record names are warnings: sodlab reads them, other tools may not.

Statistics per split: images, objects per class, COCO's size buckets (by area), the finer bins
of object side sqrt(area) under 32 px, and how many objects the detector preset's input resize
puts under 8 px (``sodlab.data.tiles.count_pushed_under``).
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sodlab.config import preset
from sodlab.data.coco import size_bucket
from sodlab.data.convert import IGNORE_NAMES
from sodlab.data.tiles import Shrinkage, count_pushed_under
from sodlab.io import read_json

# Near-COCO spellings of COCO's keys, and the key COCO uses.
KEY_ALIASES = {"images": ("image", "imgs"), "annotations": ("annotation", "anns"),
               "categories": ("category", "classes")}
FILE_NAME_ALIASES = ("filename", "file", "path", "image_path")
# Class names that mark regions to ignore rather than a class (KITTI's and HIT-UAV's DontCare,
# VisDrone's ignored regions), compared in lower case without spaces, '-' and '_'.
IGNORE_CLASS_NAMES = {re.sub(r"[\s_-]", "", n.lower()) for n in (*IGNORE_NAMES, "ignore", "ignored",
                                                                  "ignored regions")}
# Object side sqrt(area) in px: the finer bins under COCO's "small" (sodlab.evaluate's fine bins).
SIDE_BINS = ((0, 8, "<8"), (8, 16, "8-16"), (16, 32, "16-32"), (32, math.inf, ">=32"))
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Problem:
    where: str  # the file and the record
    what: str  # what is wrong, and what to change
    kind: str  # problems of one sort share it: the report counts them together

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class SplitStats:
    split: str
    ann_file: Path
    images: int = 0
    images_without_objects: int = 0
    objects: int = 0  # not crowd
    crowd: int = 0
    classes: Counter = field(default_factory=Counter)
    coco_sizes: Counter = field(default_factory=Counter)
    sides: Counter = field(default_factory=Counter)
    unlisted_files: int = 0  # files in DIR/{split}/ that no image record names
    shrinkage: Shrinkage | None = None


@dataclass
class CheckReport:
    data_dir: Path
    preset: str
    resize: str  # what the preset's resize does, in words
    splits: list[SplitStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def format(self, max_per_kind: int | None = 20) -> str:
        """The statistics, then every problem and warning one line each (at most ``max_per_kind``
        lines of one kind; the count is always complete)."""
        lines = [f"sodlab check {self.data_dir}: splits {', '.join(s.split for s in self.splits) or 'none'}; "
                 f"preset {self.preset}: {self.resize}"]
        for s in self.splits:
            lines += _format_split(s)
        for title, items in (("problem", self.problems), ("warning", self.warnings)):
            shown: Counter = Counter()
            for item in items:
                shown[item.kind] += 1
                if max_per_kind is None or shown[item.kind] <= max_per_kind:
                    lines.append(f"{title}: {item}")
            for kind, count in shown.items():
                if max_per_kind is not None and count > max_per_kind:
                    lines.append(f"{title}: ... {count - max_per_kind} more of '{kind}' (--max-per-kind 0 lists all)")
        kinds = Counter(p.kind for p in self.problems)
        lines.append(f"{len(self.problems)} problem(s)" + (f" ({', '.join(f'{k}: {n}' for k, n in kinds.items())})"
                                                             if kinds else "")
                     + f", {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else str(part)


def _format_split(s: SplitStats) -> list[str]:
    lines = [f"{s.split}: {s.images} images ({s.images_without_objects} without objects), {s.objects} objects"
             + (f" (+{s.crowd} crowd / ignore regions)" if s.crowd else "") + f", {len(s.classes)} classes"]
    if s.objects:
        lines.append("  classes: " + ", ".join(f"{name} {n}" for name, n in s.classes.most_common()))
        lines.append("  COCO sizes (area): " + ", ".join(f"{b} {_percent(s.coco_sizes[b], s.objects)}"
                                                          for b in ("small", "medium", "large")))
        lines.append("  side sqrt(area): " + ", ".join(f"{label} px {_percent(s.sides[label], s.objects)}"
                                                        for _, _, label in SIDE_BINS))
    if s.shrinkage is not None and s.shrinkage.objects:
        sh = s.shrinkage
        lo, hi = sh.factor_range
        factor = f"x{lo:.3g}" if math.isclose(lo, hi) else f"x{lo:.3g}-x{hi:.3g}"
        lines.append(f"  after the resize ({factor}): {_percent(sh.under_resized, sh.objects)} under "
                     f"{sh.threshold:g} px ({_percent(sh.under_native, sh.objects)} natively; "
                     f"{_percent(sh.pushed_under, sh.objects)} pushed under by the resize)")
    if s.unlisted_files:
        lines.append(f"  {s.unlisted_files} file(s) in {s.split}/ that no image record names")
    return lines


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _header_size(path: Path) -> tuple[int, int, bool]:
    """(width, height) as the loader sees the image (EXIF rotation applied), from the header only;
    and whether the rotation swapped them."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(0x0112) in ROTATED
    return (height, width, True) if rotated else (width, height, False)


class _Checker:
    def __init__(self):
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def problem(self, where, what: str, kind: str) -> None:
        self.problems.append(Problem(str(where), what, kind))

    def warn(self, where, what: str, kind: str) -> None:
        self.warnings.append(Problem(str(where), what, kind))

    # -- layout --------------------------------------------------------------------------------
    def find_splits(self, data_dir: Path, splits: list[str] | None) -> list[tuple[str, Path]]:
        """(split, json) pairs to check; a json under another name is checked and named for renaming."""
        ann_dir = data_dir / "annotations"
        if not data_dir.is_dir():
            self.problem(data_dir, "not a directory", "layout")
            return []
        if splits:
            found = []
            for split in splits:
                ann_file = ann_dir / f"instances_{split}.json"
                if ann_file.is_file():
                    found.append((split, ann_file))
                    continue
                near = [p for p in (ann_dir / f"{split}.json", data_dir / f"{split}.json",
                                    data_dir / f"instances_{split}.json") if p.is_file()]
                if near:
                    self.problem(near[0], f"rename to {ann_file} (sodlab reads DIR/annotations/instances_{{split}}"
                                 ".json)", "layout")
                    found.append((split, near[0]))
                else:
                    present = sorted(p.name for p in ann_dir.glob("*.json")) if ann_dir.is_dir() else []
                    self.problem(ann_file, "not found" + (f"; annotations/ holds {', '.join(present)}" if present
                                                          else ""), "layout")
            return found
        found = [(p.name[len("instances_"):-len(".json")], p) for p in sorted(ann_dir.glob("instances_*.json"))]
        if found:
            return found
        near = sorted(ann_dir.glob("*.json")) + sorted(data_dir.glob("*.json"))
        for path in near:
            split = re.sub(r"^(instances|annotations?)_", "", path.stem)
            self.problem(path, f"rename to {ann_dir / f'instances_{split}.json'} (sodlab reads "
                         "DIR/annotations/instances_{split}.json)", "layout")
            found.append((split, path))
        if not found:
            self.problem(ann_dir, "no instances_{split}.json here (the COCO layout: DIR/annotations/"
                         "instances_{split}.json and the images in DIR/{split}/)", "layout")
        return found

    # -- one split's json and images -----------------------------------------------------------
    def check_split(self, data_dir: Path, split: str, ann_file: Path) -> tuple[SplitStats, dict | None, bool]:
        """The split's statistics, its categories {id: name} (None when unreadable) and whether its
        json is structurally sound (so that the strict loader reads it)."""
        stats = SplitStats(split, ann_file)
        count_before = len(self.problems)
        try:
            data = read_json(ann_file)
        except (OSError, ValueError) as e:
            self.problem(ann_file, f"cannot read: {e}".replace(f"{ann_file}: ", ""), "json")
            return stats, None, False
        if not isinstance(data, dict):
            self.problem(ann_file, f"a COCO json is an object with images, annotations and categories; got a "
                         f"{type(data).__name__}", "json")
            return stats, None, False
        for key, aliases in KEY_ALIASES.items():
            if key not in data:
                alias = next((a for a in aliases if a in data), None)
                if alias is not None:
                    self.problem(ann_file, f"key {alias!r}: rename it to {key!r} (COCO's name)", "near-COCO key")
                    data[key] = data[alias]
                else:
                    self.problem(ann_file, f"missing key {key!r} (a COCO detection json needs images, annotations "
                                 "and categories)", "json")
                    data[key] = []
            if not isinstance(data[key], list):
                self.problem(ann_file, f"{key!r} must be a list, got {type(data[key]).__name__}", "json")
                data[key] = []
        categories = self._categories(ann_file, data["categories"])
        images = self._images(data_dir, split, ann_file, data["images"], stats)
        self._annotations(ann_file, data["annotations"], images, categories, stats)
        for cat_id, name in categories.items():
            if re.sub(r"[\s_-]", "", name.lower()) in IGNORE_CLASS_NAMES:
                self.problem(ann_file, f"category id {cat_id} {name!r} ({stats.classes.get(name, 0)} boxes) marks "
                             "regions to ignore, not a class: write its boxes as crowd (iscrowd 1) of every class "
                             "and drop the category, as `sodlab convert` does", "ignore class")
        return stats, categories, len(self.problems) == count_before

    def _categories(self, ann_file: Path, records: list) -> dict[int, str]:
        categories: dict[int, str] = {}
        for position, category in enumerate(records):
            if not isinstance(category, dict) or not _is_int(category.get("id")):
                self.problem(ann_file, f"categories[{position}]: needs an integer 'id'", "category")
                continue
            where = f"{ann_file}: category id {category['id']}"
            if category["id"] in categories:
                self.problem(where, "duplicate category id", "category")
                continue
            if not isinstance(category.get("name"), str):
                self.problem(where, "needs a 'name' string", "category")
                continue
            categories[category["id"]] = category["name"]
        if categories and min(categories) == 0:
            self.warn(ann_file, "category ids start at 0: sodlab numbers classes itself, but COCO's ids start at 1 "
                      "and tools that take 0 for the background will drop a class; renumber them from 1",
                      "category id 0")
        return categories

    def _images(self, data_dir: Path, split: str, ann_file: Path, records: list, stats: SplitStats) -> dict:
        image_dir = data_dir / split
        if not image_dir.is_dir():
            hint = next((f"; the images may be in {d}/: move them to {image_dir}/" for d in
                         (data_dir / "images", data_dir / split / "images") if d.is_dir()), "")
            self.problem(image_dir, f"missing: the images of {ann_file.name} go here{hint}", "layout")
        images: dict[int, tuple[float, float]] = {}
        names: dict[str, int] = {}
        for position, image in enumerate(records):
            if not isinstance(image, dict) or not _is_int(image.get("id")):
                self.problem(ann_file, f"images[{position}]: needs an integer 'id'", "image record")
                continue
            where = f"{ann_file}: image id {image['id']}"
            if image["id"] in images:
                self.problem(where, "duplicate image id", "image record")
                continue
            file_name = image.get("file_name")
            if file_name is None and (alias := next((a for a in FILE_NAME_ALIASES if a in image), None)):
                self.problem(where, f"key {alias!r}: rename it to 'file_name' (COCO's name)", "near-COCO key")
                file_name = image[alias]
            if not isinstance(file_name, str) or not file_name:
                self.problem(where, "needs a 'file_name' string", "image record")
                file_name = None
            elif file_name in names:
                self.problem(where, f"file_name {file_name!r} is also image id {names[file_name]}'s", "image record")
            else:
                names[file_name] = image["id"]
            width, height = image.get("width"), image.get("height")
            sized = all(_is_number(v) and v > 0 for v in (width, height))
            if not sized:
                self.problem(where, f"needs positive 'width' and 'height', got {width!r} x {height!r}", "image record")
            images[image["id"]] = (width, height) if sized else None
            if file_name is not None and image_dir.is_dir():
                self._image_file(data_dir, image_dir, file_name, image["id"], (width, height) if sized else None)
        stats.images = len(images)
        if image_dir.is_dir():
            listed = {Path(n).parts[0] for n in names}
            stats.unlisted_files = sum(1 for p in image_dir.iterdir() if p.name not in listed)
            if stats.unlisted_files:
                self.warn(image_dir, f"{stats.unlisted_files} file(s) that no image record of {ann_file.name} names "
                          "(not used)", "unlisted files")
        return images

    def _image_file(self, data_dir: Path, image_dir: Path, file_name: str, image_id: int, size) -> None:
        path = image_dir / file_name
        where = f"{path} (image id {image_id})"
        if not path.is_file():
            if (data_dir / file_name).is_file():
                self.problem(where, f"not found; {data_dir / file_name} is: file_name is relative to "
                             f"DIR/{image_dir.name}/, drop its {Path(file_name).parts[0]!r} prefix", "image file")
            else:
                self.problem(where, "image file not found", "image file")
            return
        try:
            width, height, rotated = _header_size(path)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            self.problem(where, f"cannot read the image: {e}", "image file")
            return
        if size is not None and (width, height) != tuple(size):
            self.problem(where, f"the json says {size[0]:g}x{size[1]:g}, the file is {width}x{height}"
                         + (" after its EXIF rotation" if rotated else ""), "image size")

    def _annotations(self, ann_file: Path, records: list, images: dict, categories: dict, stats: SplitStats) -> None:
        ids: set[int] = set()
        looks_xyxy = out_of_image = 0
        with_objects: set[int] = set()
        for position, ann in enumerate(records):
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                self.problem(ann_file, f"annotations[{position}]: needs an integer 'id'", "annotation record")
                continue
            where = f"{ann_file}: annotation id {ann['id']}"
            if ann["id"] in ids:
                self.problem(where, "duplicate annotation id", "annotation record")
                continue
            ids.add(ann["id"])
            if ann.get("image_id") not in images:
                self.problem(where, f"image_id {ann.get('image_id')!r} is not in 'images'", "annotation record")
                continue
            if ann.get("category_id") not in categories:
                self.problem(where, f"category_id {ann.get('category_id')!r} is not in 'categories'",
                             "annotation record")
                continue
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                self.problem(where, f"iscrowd must be 0 or 1, got {iscrowd!r}", "annotation record")
            area = ann.get("area")
            if area is not None and not (_is_number(area) and area >= 0):
                self.problem(where, f"'area' must be a number >= 0, got {area!r}", "annotation record")
                area = None
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                self.problem(where, f"'bbox' must be [x, y, w, h], four finite numbers; got {bbox!r}", "bbox")
                continue
            x, y, w, h = bbox
            if w <= 0 or h <= 0:
                self.problem(where, f"bbox {bbox} has no area (width and height must be > 0)", "bbox")
                continue
            size = images[ann["image_id"]]
            if size is not None:
                width, height = size
                # Half a pixel of slack: converters round pixel edges.
                if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                    self.problem(where, f"bbox {bbox} lies outside its {width:g}x{height:g} image (image id "
                                 f"{ann['image_id']})", "bbox outside")
                    out_of_image += 1
                    continue
                if x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5:
                    self.problem(where, f"bbox {bbox} extends beyond its {width:g}x{height:g} image (image id "
                                 f"{ann['image_id']}): clip it", "bbox outside")
                    out_of_image += 1
                    looks_xyxy += w > x and h > y and w <= width and h <= height
            if iscrowd:
                stats.crowd += 1
                continue
            with_objects.add(ann["image_id"])
            area = area if area is not None else w * h
            stats.objects += 1
            stats.classes[categories[ann["category_id"]]] += 1
            stats.coco_sizes[size_bucket(area)] += 1
            side = math.sqrt(area)
            stats.sides[next(label for lo, hi, label in SIDE_BINS if lo <= side < hi)] += 1
        if out_of_image and looks_xyxy >= out_of_image / 2:
            self.problem(ann_file, f"{looks_xyxy} of the boxes outside their image would fit as [x1, y1, x2, y2]: "
                         "COCO's bbox is [x, y, width, height]; convert them", "bbox format")
        stats.images_without_objects = stats.images - len(with_objects)


def check_dataset(data_dir: str | os.PathLike, splits: list[str] | None = None, preset_name: str = "cpu",
                  tile: int = 0) -> CheckReport:
    """Check DIR's splits (default: every annotations/instances_*.json); see the module docstring.

    The resize statistics use the detector preset's min_size/max_size, or ``tile`` x tile crops
    seen at native resolution (``--tile``).
    """
    data_dir = Path(data_dir)
    detector = preset(preset_name)
    min_size, max_size = (tile, tile) if tile else (detector.min_size, detector.max_size)
    resize = (f"native-resolution tiles of {tile} px" if tile else
              f"short side to {min_size} px, long side at most {max_size} px")
    report = CheckReport(data_dir, preset_name, resize)
    checker = _Checker()
    first: tuple[Path, dict] | None = None
    for split, ann_file in checker.find_splits(data_dir, splits):
        stats, categories, sound = checker.check_split(data_dir, split, ann_file)
        report.splits.append(stats)
        if categories is not None:
            if first is None:
                first = (ann_file, categories)
            elif categories != first[1]:
                changed = sorted(set(categories.items()) ^ set(first[1].items()))
                checker.problem(ann_file, f"categories differ from {first[0].name}'s (id, name: "
                                f"{', '.join(f'{i} {n!r}' for i, n in changed)}); classes are numbered by category id "
                                "within each json, so every split needs the same list", "category")
        if sound:
            stats.shrinkage = count_pushed_under(ann_file, min_size, max_size, tile=tile or None)
    report.problems, report.warnings = checker.problems, checker.warnings
    return report

"""Browse a COCO split and every run's detections in FiftyOne, focused on small objects.

`build_dataset` turns a COCO-format split (``DIR/annotations/instances_{split}.json`` +
``DIR/{split}/``) and run directories (``runs/NAME/detections_{split}.json``) into one FiftyOne
dataset, evaluates each run with FiftyOne's COCO matcher at IoU 0.5, counts small-object
TP/FP/FN per image and saves views that answer "which small objects did SR find that the
baseline missed?". `launch` serves it in the FiftyOne App.

Dataset layout (one sample per image; dataset name ``sodlab-{data_name}-{split}-{run+run...}``)
    ground_truth            Detections from the json; each carries ``annotation_id``, ``iscrowd``,
                            ``area_px``, ``size``, ``sr_patch_ids`` and, after evaluation,
                            ``eval_{run}`` in {"tp", "fn"} per run.
    {run}                   Detections from runs/{run}/detections_{split}.json (one field per run,
                            named after the run directory, lowercased, non [a-z0-9_] -> "_");
                            each carries ``area_px``, ``size`` and ``eval_{run}`` in {"tp", "fp"}.
    image_id                the COCO image id.
    small_gt                number of small, non-crowd ground truth objects.
    small_tp_{run}, small_fp_{run}, small_fn_{run}, small_recall_{run}
    small_recall_gain       small_recall_{method} - small_recall_{baseline}; None on images
                            without small ground truth (recall is undefined there).

Sizes follow COCOeval exactly, so that the counts equal pycocotools' per-image matching
(COCOeval.evalImgs, areaRng "small", IoU 0.5, maxDets 100):
    * ``area_px`` of a ground truth object is the annotation's ``area`` (visible pixels, what
      COCOeval bins by) when present, else its box w*h; of a detection it is its box w*h in
      image pixels (what COCO.loadRes computes).
    * ``size`` is "small" for area_px <= 32**2, "medium" for <= 96**2, else "large". COCOeval's
      area ranges are closed intervals, so an object of exactly 32**2 pixels is small there.
    * small TP = small non-crowd GT matched by the run; small FN = small non-crowd GT left
      unmatched; small FP = unmatched detection whose own box area is small. A detection
      matched to a medium/large GT counts nowhere (COCOeval ignores it in the small range), as
      does one matched to a crowd region.
    * Only the 100 highest scoring detections per image and class are loaded (COCOeval's
      maxDets=100 truncation, applied per image and category).
  One case can still differ: a detection overlapping a small and a non-small GT of its class
  with IoU >= 0.5 each. FiftyOne matches it to the higher IoU; COCOeval's small-range pass
  prefers the small GT. Objects of one class rarely overlap that much.

SR patches: ``runs/NAME/sr_patches/index.json`` (written by an SR run) is a json list, one entry
per ground truth RoI:
    {"image_id": 12,          COCO image id in this split
     "annotation_id": 345,    COCO annotation id of the ground truth object the RoI covers
     "label": "car",          its category name (checked against the annotations)
     "lr": "12_345_lr.png",   low-resolution patch z_LR    } paths relative to the sr_patches
     "sr": "12_345_sr.png",   super-resolved patch G(z_LR) } directory (absolute paths work too)
     "hr": "12_345_hr.png"}   high-resolution patch z_HR, or null when there is no HR twin
Extra scalar keys in an entry (e.g. "psnr", "scale") become fields of the patch samples.
The patches go into a grouped twin dataset ``{name}-sr-patches`` (group slices "lr", "sr",
"hr"; "sr" shown first) whose samples carry ``run``, ``image_id``, ``annotation_id``, ``gt_id``
(the ground truth label id in the main dataset), ``source_sample_id``, ``ground_truth`` (a
Classification) and the ground truth's ``eval_{run}`` outcomes. Each ground truth detection
lists its groups in ``sr_patch_ids``; `sr_patches_for` goes from a sample or a label to them.

Saved views (BASELINE and METHOD are the two compared runs, "baseline" and "sr" by default):
    small-missed-by-BASELINE-found-by-METHOD   small GT that BASELINE misses and METHOD finds
    small-regressions                          small GT that BASELINE finds and METHOD misses
    sorted-by-small-recall-gain                images with small GT, largest gain first
    small-gt-patches                           one patch per small GT, with every run's outcome
    small-false-positives-RUN                  small unmatched detections, one view per run
("small GT" is small and not crowd, everywhere.)

Rebuilding is idempotent: a build goes into a temporary non-persistent dataset, then replaces
only the dataset of the same name (and its -sr-patches twin), and only if sodlab built it.
"""
from __future__ import annotations

import os

# Privacy: FiftyOne reads this when it is imported and passes it on to the App server, so it
# must be set before the import below.
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"

import logging
import re
import secrets
import socket
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import fiftyone as fo
import fiftyone.core.context as focx
from fiftyone import ViewField as F
from PIL import Image

from sodlab.data.coco import size_bucket
from sodlab.io import read_json

fo.config.do_not_track = True  # in case fiftyone was imported before this module

GT_FIELD = "ground_truth"
MAX_DETS_PER_CLASS = 100  # COCOeval maxDets[-1], applied per image and category
IOU_THRESHOLD = 0.5
SR_PATCH_SLICES = ("lr", "sr", "hr")
SR_PATCHES_SUFFIX = "-sr-patches"
_RESERVED_FIELDS = {"id", "filepath", "tags", "metadata", "image_id", "group", "small_gt",
                    "small_recall_gain", "created_at", "last_modified_at", GT_FIELD}
_SR_INDEX_KEYS = {"image_id", "annotation_id", "label", "lr", "sr", "hr"}


def field_name(run_name: str) -> str:
    """FiftyOne field name for a run directory name: "SR-x4" -> "sr_x4"."""
    name = re.sub(r"[^0-9a-z_]", "_", run_name.lower())
    if not name or not name[0].isalpha():
        name = "run_" + name
    return name


def dataset_name(data_dir: str | os.PathLike, split: str = "val", run_dirs=()) -> str:
    """Name of the sodlab dataset for a data directory, split and runs, namespaced by sodlab:
    e.g. "sodlab-synth-val-baseline+sr" (runs sorted, so their order does not matter)."""
    data_name = re.sub(r"[^0-9A-Za-z_.-]", "_", Path(data_dir).resolve().name)
    runs = "+".join(sorted(field_name(Path(r).name) for r in run_dirs))
    return f"sodlab-{data_name}-{split}" + (f"-{runs}" if runs else "")


@dataclass
class Run:
    """One run directory as it enters the dataset."""

    path: Path
    field: str  # predictions field, also the suffix of every per-run field
    method: str | None  # config.json "method", if any

    @property
    def eval_key(self) -> str:
        return f"eval_{self.field}"


# ----------------------------------------------------------------------------------------
# Reading inputs (all validation happens here, before anything touches the database)


def _read_coco_split(data_dir: Path, split: str) -> tuple[dict, Path]:
    ann_path = data_dir / "annotations" / f"instances_{split}.json"
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path}: no annotations for split {split!r}")
    coco = read_json(ann_path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{ann_path}: missing list {key!r}")
    image_dir = data_dir / split
    for image in coco["images"]:
        if "id" not in image or "file_name" not in image:
            raise ValueError(f"{ann_path}: image record without id or file_name: {image}")
        if not (image_dir / image["file_name"]).is_file():
            raise FileNotFoundError(
                f"{ann_path}: image id {image['id']}: file {image_dir / image['file_name']} missing")
        if "width" not in image or "height" not in image:
            with Image.open(image_dir / image["file_name"]) as im:
                image["width"], image["height"] = im.size
    image_ids = {image["id"] for image in coco["images"]}
    category_ids = {c["id"] for c in coco["categories"]}
    for ann in coco["annotations"]:
        where = f"{ann_path}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"{where}: unknown image_id {ann.get('image_id')}")
        if ann.get("category_id") not in category_ids:
            raise ValueError(f"{where}: unknown category_id {ann.get('category_id')}")
        if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {ann.get('bbox')}")
    return coco, image_dir


def _read_method(run_dir: Path) -> str | None:
    config_path = run_dir / "config.json"
    return read_json(config_path).get("method") if config_path.is_file() else None


def _read_detections(path: Path, image_ids: set, category_ids: set) -> dict[int, list[dict]]:
    """COCO results of one run grouped by image id, keeping COCOeval's top 100 per class."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no detections (has the run been evaluated?)")
    results = read_json(path)
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a list of COCO results")
    by_image_class = defaultdict(list)
    for i, det in enumerate(results):
        where = f"{path}: record {i}"
        missing = {"image_id", "category_id", "bbox", "score"} - det.keys()
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}")
        if det["image_id"] not in image_ids:
            raise ValueError(f"{where}: image_id {det['image_id']} is not in this split")
        if det["category_id"] not in category_ids:
            raise ValueError(f"{where}: unknown category_id {det['category_id']}")
        if len(det["bbox"]) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {det['bbox']}")
        by_image_class[det["image_id"], det["category_id"]].append(det)
    by_image = defaultdict(list)
    for (image_id, _), dets in by_image_class.items():
        # Stable sort, like COCOeval's mergesort, so equal scores keep file order.
        dets = sorted(dets, key=lambda d: -d["score"])[:MAX_DETS_PER_CLASS]
        by_image[image_id].extend(dets)
    return by_image


def _read_sr_index(run: Run, anns_by_id: dict, category_names: dict) -> list[dict]:
    """Entries of runs/NAME/sr_patches/index.json with absolute paths; [] if there is none."""
    index_path = run.path / "sr_patches" / "index.json"
    if not index_path.is_file():
        return []
    entries = read_json(index_path)
    if not isinstance(entries, list):
        raise ValueError(f"{index_path}: expected a list of patch records")
    patches = []
    for i, entry in enumerate(entries):
        where = f"{index_path}: record {i}"
        missing = {"image_id", "annotation_id", "lr", "sr"} - entry.keys()
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}")
        ann = anns_by_id.get(entry["annotation_id"])
        if ann is None or ann["image_id"] != entry["image_id"]:
            raise ValueError(f"{where}: no annotation id {entry['annotation_id']} "
                             f"on image id {entry['image_id']}")
        label = category_names[ann["category_id"]]
        if entry.get("label", label) != label:
            raise ValueError(f"{where}: label {entry['label']!r} but annotation "
                             f"{entry['annotation_id']} is a {label!r}")
        paths = {}
        for slice_name in SR_PATCH_SLICES:
            if entry.get(slice_name) is None:
                continue
            path = index_path.parent / entry[slice_name]  # absolute paths stay absolute
            if not path.is_file():
                raise FileNotFoundError(f"{where}: {slice_name} patch {path} missing")
            with Image.open(path) as im:
                paths[slice_name] = (str(path.resolve()), im.size)
        extras = {k: v for k, v in entry.items() if k not in _SR_INDEX_KEYS
                  and isinstance(v, (int, float, str, bool))}
        patches.append({"image_id": entry["image_id"], "annotation_id": entry["annotation_id"],
                        "label": label, "paths": paths, "extras": extras,
                        "group": fo.Group()})
    return patches


def _resolve_runs(run_dirs) -> list[Run]:
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: run directory not found")
        name = field_name(path.resolve().name)
        if name in _RESERVED_FIELDS or name.startswith(("eval_", "small_")):
            raise ValueError(f"{path}: run name maps to field {name!r}, which sodlab uses "
                             "itself; rename the run directory")
        if name in {r.field for r in runs}:
            raise ValueError(f"{path}: two runs map to the field {name!r}")
        runs.append(Run(path=path, field=name, method=_read_method(path)))
    return runs


def _pick_role(runs: list[Run], wanted: str | None, default: str, exclude: Run | None):
    """The run playing a role: named by `wanted`, else the run called or configured `default`."""
    if wanted is not None:
        for run in runs:
            if field_name(wanted) == run.field or Path(wanted).resolve() == run.path.resolve():
                return run
        raise ValueError(f"no run {wanted!r} among {[r.field for r in runs]}")
    candidates = [r for r in runs if r is not exclude]
    for run in candidates:
        if run.field == default:
            return run
    for run in candidates:
        if run.method == default:
            return run
    return None


# ----------------------------------------------------------------------------------------
# Building


def _detection(label, bbox, width, height, area_px, **attributes) -> fo.Detection:
    x, y, w, h = bbox
    return fo.Detection(label=label, bounding_box=[x / width, y / height, w / width, h / height],
                        area_px=float(area_px), size=size_bucket(area_px), **attributes)


def _small_counts(dataset: fo.Dataset, run: Run) -> dict[str, list]:
    """Per-sample small TP/FP/FN of one evaluated run (see the module docstring)."""
    gt_size, gt_crowd, gt_eval, pred_size, pred_eval = dataset.values([
        f"{GT_FIELD}.detections.size", f"{GT_FIELD}.detections.iscrowd",
        f"{GT_FIELD}.detections.{run.eval_key}", f"{run.field}.detections.size",
        f"{run.field}.detections.{run.eval_key}"])
    counts = {"tp": [], "fp": [], "fn": []}
    for sizes, crowds, outcomes, p_sizes, p_outcomes in zip(
            gt_size, gt_crowd, gt_eval, pred_size, pred_eval):
        small_gt = [o for s, c, o in zip(sizes, crowds, outcomes) if s == "small" and not c]
        counts["tp"].append(small_gt.count("tp"))
        counts["fn"].append(small_gt.count("fn"))
        counts["fp"].append(sum(s == "small" and o == "fp" for s, o in zip(p_sizes, p_outcomes)))
    return counts


def _recall(tp: int, fn: int) -> float | None:
    return tp / (tp + fn) if tp + fn else None


def _save_views(dataset: fo.Dataset, runs: list[Run], baseline: Run | None, method: Run | None):
    small_gt = (F("size") == "small") & (F("iscrowd") == False)  # noqa: E712 (mongo expression)
    if baseline is not None and method is not None:
        b, m = baseline.eval_key, method.eval_key
        dataset.save_view(
            f"small-missed-by-{baseline.field}-found-by-{method.field}",
            dataset.filter_labels(GT_FIELD, small_gt & (F(b) == "fn") & (F(m) == "tp")),
            description=f"Small ground truth that {baseline.field} misses and {method.field} "
                        "finds (IoU 0.5)")
        dataset.save_view(
            "small-regressions",
            dataset.filter_labels(GT_FIELD, small_gt & (F(b) == "tp") & (F(m) == "fn")),
            description=f"Small ground truth that {baseline.field} finds and {method.field} "
                        "misses (IoU 0.5)")
        dataset.save_view(
            "sorted-by-small-recall-gain",
            dataset.exists("small_recall_gain").sort_by("small_recall_gain", reverse=True),
            description=f"Images with small ground truth, largest small-object recall gain "
                        f"of {method.field} over {baseline.field} first")
    dataset.save_view(
        "small-gt-patches",
        dataset.filter_labels(GT_FIELD, small_gt).to_patches(GT_FIELD),
        description="One patch per small non-crowd ground truth object; its eval_<run> "
                    "attributes hold every run's outcome")
    for run in runs:
        dataset.save_view(
            f"small-false-positives-{run.field}",
            dataset.filter_labels(run.field, (F("size") == "small") & (F(run.eval_key) == "fp")),
            description=f"Small detections of {run.field} that match no ground truth")


def _build_sr_patches(name: str, dataset: fo.Dataset, runs: list[Run], patches_by_run: dict,
                      gt_links: dict) -> fo.Dataset | None:
    """The grouped lr/sr/hr twin dataset; None when no run wrote SR patches."""
    if not any(patches_by_run.values()):
        return None
    outcomes = {}  # gt label id -> {eval_key: outcome}
    keys = [run.eval_key for run in runs]
    for gt_ids, *per_key in zip(*dataset.values(
            [f"{GT_FIELD}.detections.id"] + [f"{GT_FIELD}.detections.{k}" for k in keys])):
        for j, gt_id in enumerate(gt_ids):
            outcomes[gt_id] = {k: values[j] for k, values in zip(keys, per_key)}
    patches_ds = fo.Dataset(name)
    patches_ds.add_group_field("group", default="sr")
    samples = []
    for run_field, patches in patches_by_run.items():
        for patch in patches:
            sample_id, gt_id = gt_links[patch["image_id"], patch["annotation_id"]]
            for slice_name, (path, (width, height)) in patch["paths"].items():
                samples.append(fo.Sample(
                    filepath=path, metadata=fo.ImageMetadata(width=width, height=height),
                    group=patch["group"].element(slice_name), run=run_field,
                    image_id=patch["image_id"], annotation_id=patch["annotation_id"],
                    gt_id=gt_id, source_sample_id=sample_id,
                    ground_truth=fo.Classification(label=patch["label"]),
                    **outcomes[gt_id], **patch["extras"]))
    patches_ds.add_samples(samples)
    patches_ds.info["sodlab"] = {"source_dataset": dataset.name}
    patches_ds.save()
    return patches_ds


def _replace(building: fo.Dataset | None, name: str) -> fo.Dataset | None:
    """Delete the old sodlab dataset `name` (if any) and give `building` its name."""
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    if building is None:
        return None
    building.name = name
    building.persistent = True
    return building


def _check_replaceable(name: str) -> None:
    if fo.dataset_exists(name) and "sodlab" not in fo.load_dataset(name).info:
        raise ValueError(f"FiftyOne dataset {name!r} exists and was not built by sodlab; "
                         "refusing to replace it (pass another name)")


def build_dataset(data_dir, run_dirs, split: str = "val", name: str | None = None,
                  baseline: str | None = None, method: str | None = None,
                  sr_patches: bool = True, compute_mAP: bool = False) -> fo.Dataset:
    """Build (or rebuild) the FiftyOne dataset of a COCO split and its runs' detections.

    data_dir: COCO-format directory (annotations/instances_{split}.json, {split}/).
    run_dirs: run directories, each with detections_{split}.json; one predictions field each.
    name: dataset name, default `dataset_name(data_dir, split, run_dirs)`; an existing dataset of that
        name (and its "-sr-patches" twin) is replaced if sodlab built it, else ValueError.
    baseline, method: the two runs compared by small_recall_gain and the saved views, given
        by run directory or field name. Default: the run named or configured (config.json
        "method") "baseline", and the run named or configured "sr". Without both, the
        comparison views and small_recall_gain are left out.
    sr_patches: load runs/NAME/sr_patches/index.json into the "-sr-patches" twin dataset.
    compute_mAP: also let FiftyOne compute mAP over IoU 0.5:0.95 (slower; not needed for
        the per-object outcomes).
    """
    data_dir = Path(data_dir)
    name = name or dataset_name(data_dir, split, run_dirs)
    patches_name = name + SR_PATCHES_SUFFIX
    coco, image_dir = _read_coco_split(data_dir, split)
    runs = _resolve_runs(run_dirs)
    baseline_run = _pick_role(runs, baseline, "baseline", exclude=None)
    method_run = _pick_role(runs, method, "sr", exclude=baseline_run)
    if method is None and method_run is None and baseline_run is not None:
        method_run = next((r for r in runs if r is not baseline_run), None)
    if baseline_run is not None and baseline_run is method_run:
        raise ValueError(f"baseline and method are the same run {baseline_run.field!r}")
    _check_replaceable(name)
    _check_replaceable(patches_name)

    category_names = {c["id"]: c["name"] for c in coco["categories"]}
    image_ids = {image["id"] for image in coco["images"]}
    detections = {run.field: _read_detections(run.path / f"detections_{split}.json",
                                              image_ids, set(category_names)) for run in runs}
    anns_by_id = {ann["id"]: ann for ann in coco["annotations"]}
    patches_by_run = {run.field: _read_sr_index(run, anns_by_id, category_names)
                      for run in runs} if sr_patches else {}
    patch_groups = defaultdict(list)  # annotation id -> ids of its sr patch groups
    for patches in patches_by_run.values():
        for patch in patches:
            patch_groups[patch["annotation_id"]].append(patch["group"].id)

    anns_by_image = defaultdict(list)
    for ann in coco["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)

    samples = []
    for image in coco["images"]:
        width, height = image["width"], image["height"]
        gts = [_detection(category_names[a["category_id"]], a["bbox"], width, height,
                          a.get("area", a["bbox"][2] * a["bbox"][3]),
                          annotation_id=a["id"], iscrowd=bool(a.get("iscrowd", 0)),
                          sr_patch_ids=patch_groups.get(a["id"]))
               for a in anns_by_image[image["id"]]]
        sample = fo.Sample(filepath=str((image_dir / image["file_name"]).resolve()),
                           metadata=fo.ImageMetadata(width=width, height=height),
                           image_id=image["id"], **{GT_FIELD: fo.Detections(detections=gts)})
        for run in runs:
            sample[run.field] = fo.Detections(detections=[
                _detection(category_names[d["category_id"]], d["bbox"], width, height,
                           d["bbox"][2] * d["bbox"][3], confidence=float(d["score"]))
                for d in detections[run.field].get(image["id"], [])])
        samples.append(sample)

    # Built under a temporary non-persistent name: a failed build is cleaned up by FiftyOne
    # and leaves the previous dataset in place.
    building = fo.Dataset(f"{name}-building-{secrets.token_hex(4)}")
    building_patches = None
    try:
        small_gt = [sum(d.size == "small" and not d.iscrowd for d in s[GT_FIELD].detections)
                    for s in samples]
        building.add_samples(samples)
        # FiftyOne reloads every Sample object still alive after each bulk write; dropping
        # ours makes the writes below ~10x faster.
        del samples
        building.default_classes = [c["name"] for c in coco["categories"]]
        building.set_values("small_gt", small_gt)
        recalls = {}
        for run in runs:
            building.evaluate_detections(
                run.field, gt_field=GT_FIELD, eval_key=run.eval_key, method="coco",
                iou=IOU_THRESHOLD, classwise=True, compute_mAP=compute_mAP)
            counts = _small_counts(building, run)
            for kind, values in counts.items():
                building.set_values(f"small_{kind}_{run.field}", values)
            recalls[run.field] = [_recall(tp, fn) for tp, fn in zip(counts["tp"], counts["fn"])]
            building.set_values(f"small_recall_{run.field}", recalls[run.field])
        if baseline_run is not None and method_run is not None:
            building.set_values("small_recall_gain", [
                None if b is None else m - b
                for b, m in zip(recalls[baseline_run.field], recalls[method_run.field])])
        _save_views(building, runs, baseline_run, method_run)

        gt_ids, ann_ids, sample_ids, sample_image_ids = building.values(
            [f"{GT_FIELD}.detections.id", f"{GT_FIELD}.detections.annotation_id", "id",
             "image_id"])
        gt_links = {(image_id, ann_id): (sample_id, gt_id)
                    for sample_id, image_id, g_ids, a_ids in zip(
                        sample_ids, sample_image_ids, gt_ids, ann_ids)
                    for gt_id, ann_id in zip(g_ids, a_ids)}
        building_patches = _build_sr_patches(f"{patches_name}-building-{secrets.token_hex(4)}",
                                             building, runs, patches_by_run, gt_links)
        building.info["sodlab"] = {
            "data_dir": str(data_dir.resolve()), "split": split,
            "runs": {run.field: str(run.path.resolve()) for run in runs},
            "baseline": baseline_run.field if baseline_run else None,
            "method": method_run.field if method_run else None,
            "sr_patches_dataset": patches_name if building_patches is not None else None,
        }
        building.save()
    except BaseException:
        building.delete()
        if building_patches is not None:
            building_patches.delete()
        raise
    dataset = _replace(building, name)
    patches_ds = _replace(building_patches, patches_name)
    if patches_ds is not None:
        patches_ds.info["sodlab"]["source_dataset"] = name
        patches_ds.save()
    return dataset


# ----------------------------------------------------------------------------------------
# Using the dataset


def small_object_summary(dataset: fo.Dataset) -> dict[str, dict]:
    """Per run: total small TP, FP, FN over the dataset, with recall and precision.

    {"baseline": {"tp": 40, "fp": 7, "fn": 12, "recall": 0.769, "precision": 0.851}, ...}
    recall / precision are None when their denominator is 0.
    """
    summary = {}
    for run in dataset.info["sodlab"]["runs"]:
        tp, fp, fn = (int(dataset.sum(f"small_{k}_{run}")) for k in ("tp", "fp", "fn"))
        summary[run] = {"tp": tp, "fp": fp, "fn": fn, "recall": _recall(tp, fn),
                        "precision": tp / (tp + fp) if tp + fp else None}
    return summary


def sr_patches_for(sample_or_label, dataset: fo.Dataset | str | None = None):
    """The SR patch groups (a view of the "-sr-patches" dataset) of a sample or an object.

    sample_or_label: a sample of the main dataset (all its patches), a sample of the
        "small-gt-patches" view or a ground truth Detection (that object's patches).
    dataset: the main dataset or its name; needed for a bare Detection unless the patch
        dataset can be found by searching every sodlab "-sr-patches" dataset.
    Returns a view of the grouped patch dataset (empty when the object has no SR patch; a
    bare Detection found in no patch dataset raises LookupError). Call
    ``.select_group_slices()`` on it to get the lr, sr and hr samples themselves.
    """
    if isinstance(sample_or_label, fo.Detection):
        query, value = "gt_id", sample_or_label.id
    elif isinstance(sample_or_label[GT_FIELD], fo.Detection):  # sample of a patches view
        query, value = "gt_id", sample_or_label[GT_FIELD].id
    else:
        query, value = "source_sample_id", sample_or_label.id
    if dataset is None and not isinstance(sample_or_label, fo.Detection):
        # A sample of a view (e.g. the patches view) knows its view, whose root is the
        # main dataset; a plain sample knows its dataset.
        view = getattr(sample_or_label, "_view", None)
        dataset = view._root_dataset if view is not None else sample_or_label._dataset
    if dataset is not None:
        main_name = dataset if isinstance(dataset, str) else dataset.name
        candidates = [main_name + SR_PATCHES_SUFFIX]
        if not isinstance(dataset, str) and dataset.info.get("sodlab"):
            candidates = [dataset.info["sodlab"].get("sr_patches_dataset")]
    else:
        candidates = fo.list_datasets("sodlab-*" + SR_PATCHES_SUFFIX)
    for candidate in candidates:
        if candidate and fo.dataset_exists(candidate):
            view = fo.load_dataset(candidate).match(F(query) == value)
            if len(view) or dataset is not None:
                return view
    raise LookupError(f"no sodlab SR patch dataset holds {query}={value}")


def launch(dataset: fo.Dataset, port: int = 5151, address: str = "127.0.0.1",
           wait: bool = True):
    """Serve `dataset` in the FiftyOne App at http://ADDRESS:PORT/ and return the session.

    wait=True blocks until Ctrl-C (closing a browser tab keeps the server up); the session
    is closed before returning then. A port already in use is an error here, because
    FiftyOne would otherwise hand the dataset to whatever App server listens there.
    """
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError as e:
            raise OSError(f"cannot serve the FiftyOne App on {address}:{port} ({e.strerror}); "
                          "stop the other server or choose another port") from None
    # fo.launch_app connects its session before it starts the App server, and the session pings
    # for 10 s only: a server slower to start (a busy CPU) made FiftyOne print "Could not connect
    # session, trying again in 10 seconds" and wait 10 s more on every start. So the server is
    # started first, and the session finds it answering. FiftyOne keeps its servers by port in
    # fiftyone.core.session.session._server_services; one put there is the session's own (stopped
    # with it). A FiftyOne without that map gets the plain launch.
    import time

    import fiftyone.core.service as fos
    import fiftyone.core.session.session as fo_session
    import requests

    servers = getattr(fo_session, "_server_services", None)
    if isinstance(servers, dict) and port not in servers and not os.environ.get("FIFTYONE_DISABLE_SERVICES"):
        try:
            servers[port] = fos.ServerService(port, address=address, do_not_track=fo.config.do_not_track)
        except fos.ServiceListenTimeout as e:
            raise OSError(f"the FiftyOne App server did not start on {address}:{port} ({e})") from None
        deadline = time.monotonic() + 120
        while True:  # bound to the port is not yet answering
            try:
                requests.get(f"http://{address}:{port}/fiftyone", timeout=2).raise_for_status()
                break
            except requests.RequestException as e:
                if time.monotonic() > deadline:
                    servers.pop(port).stop()
                    raise OSError(f"the FiftyOne App server on {address}:{port} did not answer in 120 s ({e})") \
                        from None
                time.sleep(0.25)
    in_notebook = focx.is_notebook_context()
    # remote=True: never try to open a browser on this (often headless) machine. Its log
    # message is about ssh port forwarding to port 5151; the URL printed below says it all.
    session_logger = logging.getLogger("fiftyone.core.session.session")
    level = session_logger.level
    session_logger.setLevel(logging.WARNING)
    try:
        session = fo.launch_app(dataset, port=port, address=address, remote=not in_notebook,
                                auto=in_notebook)
    finally:
        session_logger.setLevel(level)
    print(f"FiftyOne App: http://{address}:{port}/", flush=True)
    if wait and not in_notebook:
        try:
            session.wait(-1)
        except KeyboardInterrupt:
            session.close()
    return session

"""Browse a COCO split and every run's detections in FiftyOne, focused on small objects.

`build_dataset` turns a COCO-format split (``DIR/annotations/instances_{split}.json`` +
``DIR/{split}/``) and run directories (``runs/NAME/detections_{split}.json``) into one FiftyOne
dataset, evaluates each run with FiftyOne's COCO matcher at IoU 0.5, counts small-object
TP/FP/FN per image, types every small-object error as TIDE does (sodlab.errors) and saves views
that answer "which small objects did SR find that the baseline missed?" and "which Loc errors
of the baseline did SR fix?". `launch` serves it in the FiftyOne App; `evaluate_size_range`
evaluates one size range with the predictions filtered too, as COCO's area ranges filter them.

Dataset layout (one sample per image; dataset name ``sodlab-{data_name}-{split}-{run+run...}-{hash}``,
the hash of the resolved data and run paths, so that two data folders of one name stay apart)
    ground_truth            Detections from the json; each carries ``annotation_id``, ``iscrowd``,
                            ``area_px``, ``size``, ``sr_patch_ids`` and, after evaluation,
                            ``eval_{run}`` in {"tp", "fn"} per run; small non-crowd ones also
                            ``error_{run}`` per run (see "Error types" below).
    {run}                   Detections from runs/{run}/detections_{split}.json (one field per run,
                            named after the run directory: lowercased, each run of
                            characters outside [a-z0-9] -> one "_"; runs whose names
                            map to one field get a hash of their path appended);
                            each carries ``area_px``, ``size`` and ``eval_{run}`` in {"tp", "fp"},
                            and the detections of COCO's small range ``error_{run}``.
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

Error types (``error_{run}``): TIDE's analysis of the run in COCO's small range
(``sodlab.evaluate.error_analysis``, bin "small": IoU 0.5 / 0.1, pycocotools' matching, so the
counts are eval.json's "errors" counts of that bin). A small ground truth object is "tp", "Miss",
or "Cls" / "Loc" when a detection with that error would recover it. A detection of the small
range is "tp" or its error: "Cls", "Loc", "Both", "Dupe", "Bkg". A detection outside the range
carries "Cls" / "Loc" only when it is the error that would recover a small object (e.g. a 40 px
box half on a 30 px car); other labels have no ``error_{run}``. `small_error_counts` sums them.

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
    small-loc-of-BASELINE-fixed-by-METHOD      small GT with a Loc error of BASELINE that METHOD finds
    false-positives-RUN, false-negatives-RUN   only the run's unmatched detections (all sizes, IoU
                                               0.5) / only the GT it misses: for export
    small-TYPE-RUN                             small-range labels of RUN with error_RUN == TYPE
                                               (TYPE lowercased: cls, loc, both, dupe, bkg, miss)
("small GT" is small and not crowd, everywhere.)

Rebuilding is idempotent: a build goes into a temporary non-persistent dataset, then replaces
only the dataset of the same name (and its -sr-patches twin), and only if sodlab built it.
"""
from __future__ import annotations

import os

# Privacy: FiftyOne reads this when it is imported and passes it on to the App server, so it
# must be set before the import below.
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"

import hashlib
import logging
import re
import secrets
import socket
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fiftyone as fo
import fiftyone.core.context as focx
import fiftyone.utils.eval.coco as fouc
from fiftyone import ViewField as F
from PIL import Image

from sodlab.data.coco import apply_box_policy, check_file_name, size_bucket
from sodlab.errors import ERROR_TYPES
from sodlab.evaluate import error_analysis
from sodlab.io import read_json

fo.config.do_not_track = True  # in case fiftyone was imported before this module

GT_FIELD = "ground_truth"
MAX_DETS_PER_CLASS = 100  # COCOeval maxDets[-1], applied per image and category
IOU_THRESHOLD = 0.5
SR_PATCH_SLICES = ("lr", "sr", "hr")
SR_PATCHES_SUFFIX = "-sr-patches"
SMALL_AREA = (0.0, 32.0**2)  # COCO's small range (closed), as COCOeval compares
_RESERVED_FIELDS = {"id", "filepath", "tags", "metadata", "image_id", "group", "small_gt",
                    "small_recall_gain", "created_at", "last_modified_at", GT_FIELD}
_SR_INDEX_KEYS = {"image_id", "annotation_id", "label", "lr", "sr", "hr"}


def field_name(run_name: str) -> str:
    """FiftyOne field name for a run directory name: "SR-x4" -> "sr_x4", "exp--2" -> "exp_2".

    Lowercase letters, digits and single underscores, starting with a letter: mongoengine reads
    "__" in a field name as a lookup operator, so quotes, spaces or non-ASCII letters next to
    each other must not leave one behind.
    """
    name = re.sub(r"[^0-9a-z]+", "_", run_name.lower()).strip("_")
    if not name[:1].isalpha():
        name = f"run_{name}" if name else "run"
    return name


def _path_hash(*paths) -> str:
    return hashlib.sha1("\0".join(str(Path(p).resolve()) for p in paths).encode()).hexdigest()[:8]


def dataset_name(data_dir: str | os.PathLike, split: str = "val", run_dirs=()) -> str:
    """Name of the sodlab dataset for a data directory, split and runs, namespaced by sodlab and
    by the resolved paths: e.g. "sodlab-synth-val-baseline+sr-1f2e3d4c" (runs sorted, so their
    order does not matter; two folders called "synth" get two datasets)."""
    data_name = re.sub(r"[^0-9A-Za-z_.-]", "_", Path(data_dir).resolve().name)
    runs = "+".join(sorted(field_name(Path(r).resolve().name) for r in run_dirs))
    digest = _path_hash(data_dir, *sorted(str(Path(r).resolve()) for r in run_dirs))
    return f"sodlab-{data_name}-{split}" + (f"-{runs}" if runs else "") + f"-{digest}"


@dataclass
class Run:
    """One run directory as it enters the dataset."""

    path: Path
    field: str  # predictions field, also the suffix of every per-run field
    method: str | None  # config.json "method", if any

    @property
    def eval_key(self) -> str:
        return f"eval_{self.field}"

    @property
    def error_key(self) -> str:
        return f"error_{self.field}"


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
        check_file_name(image["file_name"], f"{ann_path}: image id {image['id']}")
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
        if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4 and all(
                v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in ann["bbox"])):
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {ann.get('bbox')}")
    # The ground truth COCOeval and training see (see sodlab.data.coco.apply_box_policy).
    coco["annotations"] = apply_box_policy(coco, ann_path, "FiftyOne ground truth")
    return coco, image_dir


def _read_method(run_dir: Path) -> str | None:
    config_path = run_dir / "config.json"
    return read_json(config_path).get("method") if config_path.is_file() else None


def _read_detections(path: Path, image_ids: set, category_ids: set) -> tuple[list[dict], dict[int, list[dict]]]:
    """COCO results of one run, and them grouped by image id keeping COCOeval's top 100 per
    class, each as (position in the results, record)."""
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
        by_image_class[det["image_id"], det["category_id"]].append((i, det))
    by_image = defaultdict(list)
    for (image_id, _), dets in by_image_class.items():
        # Stable sort, like COCOeval's mergesort, so equal scores keep file order.
        dets = sorted(dets, key=lambda d: -d[1]["score"])[:MAX_DETS_PER_CLASS]
        by_image[image_id].extend(dets)
    return results, by_image


def _small_errors(ann_path: Path, coco: dict, results: list[dict]) -> tuple[dict, dict]:
    """error_{run} values of one run: ({annotation id: outcome}, {results position: outcome})."""
    small = error_analysis(ann_path, results)["small"]
    # load_coco_gt numbers the annotations 1..N in file order when one has id 0 (COCOeval reads
    # 0 as "unmatched"); the dataset keeps the file's ids.
    file_ids = [ann["id"] for ann in coco["annotations"]]
    to_file = (lambda i: file_ids[i - 1]) if 0 in file_ids else (lambda i: i)
    return ({to_file(i): outcome for i, outcome in small.ground_truth.items()},
            {i - 1: outcome for i, outcome in small.detections.items()})


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
    paths = [Path(run_dir) for run_dir in run_dirs]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: run directory not found")
    names = [field_name(path.resolve().name) for path in paths]
    shared = Counter(names)
    runs = []
    for path, name in zip(paths, names):
        if shared[name] > 1:  # "exp-2" and "exp_2", or two folders called "baseline"
            name = f"{name}_{_path_hash(path)}"
        if name in _RESERVED_FIELDS or name.startswith(("eval_", "small_")):
            raise ValueError(f"{path}: run name maps to field {name!r}, which sodlab uses "
                             "itself; rename the run directory")
        if name in {r.field for r in runs}:
            raise ValueError(f"{path}: given twice (field {name!r})")
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


def _evaluate_before_writing(dataset: fo.Dataset, samples: list[fo.Sample], run: Run,
                             compute_mAP: bool) -> Callable[[], None]:
    """FiftyOne's COCO evaluation of one run at IoU 0.5 (``evaluate_detections(run.field,
    method="coco", eval_key=run.eval_key)``, step for step and with FiftyOne's own matcher), done
    on the samples before they are written. Returns the step that saves the evaluation's results,
    to be called once the samples are in ``dataset``.

    Why not ``evaluate_detections`` itself: its loop saves every sample it evaluates, and with
    ~100 detections per image those saves are mostly mongoengine's change tracking (README: the
    demo's FiftyOne dataset). Evaluated here, the outcomes (``eval_RUN``, ``eval_RUN_id``,
    ``eval_RUN_iou`` per label, ``eval_RUN_tp/fp/fn`` per sample) go in with the samples' one bulk
    write, and the run is registered as FiftyOne registers it (``load_evaluation_view``,
    ``load_evaluation_results`` and the App see it).
    """
    key = run.eval_key
    for field in (GT_FIELD, run.field):  # register_samples declares attributes under them
        if field not in dataset.get_field_schema():
            dataset.add_sample_field(field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    method = fouc.COCOEvaluationConfig(run.field, GT_FIELD, iou=IOU_THRESHOLD, classwise=True,
                                       compute_mAP=compute_mAP).build()
    method.ensure_requirements()
    method.register_run(dataset, key)
    method.register_samples(dataset, key)
    matches = []
    for sample in samples:
        sample_matches = method.evaluate(sample, eval_key=key)
        matches.extend(sample_matches)
        # a match is (gt label, pred label, ...), None for the unmatched side; matching is
        # classwise, so a matched pair always has one label
        sample[f"{key}_tp"] = sum(m[0] is not None and m[1] is not None for m in sample_matches)
        sample[f"{key}_fp"] = sum(m[0] is None for m in sample_matches)
        sample[f"{key}_fn"] = sum(m[1] is None for m in sample_matches)

    def save_results():
        results = method.generate_results(dataset, matches, eval_key=key)
        method.compute_custom_metrics(dataset, key, results)
        method.save_run_results(dataset, key, results)
        method.add_fields_to_sidebar_group(dataset, key, omit_fields=(run.field, GT_FIELD))

    return save_results


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
    if baseline is not None and method is not None:
        dataset.save_view(
            f"small-loc-of-{baseline.field}-fixed-by-{method.field}",
            dataset.filter_labels(GT_FIELD, (F(baseline.error_key) == "Loc") & (F(method.error_key) == "tp")),
            description=f"Small ground truth that {baseline.field} boxes badly (TIDE Loc error) "
                        f"and {method.field} finds")
    for run in runs:
        dataset.save_view(
            f"false-positives-{run.field}",
            dataset.select_fields([run.field, "image_id"]).filter_labels(run.field, F(run.eval_key) == "fp"),
            description=f"Only the detections of {run.field} that match no ground truth (IoU 0.5)")
        dataset.save_view(
            f"false-negatives-{run.field}",
            dataset.select_fields([GT_FIELD, "image_id"]).filter_labels(
                GT_FIELD, (F(run.eval_key) == "fn") & (F("iscrowd") == False)),  # noqa: E712
            description=f"Only the ground truth that {run.field} misses (IoU 0.5)")
        for kind in ERROR_TYPES:
            is_kind = F(run.error_key) == kind
            dataset.save_view(
                f"small-{kind.lower()}-{run.field}",
                dataset.select_fields([GT_FIELD, run.field, "image_id"])
                .filter_labels(GT_FIELD, is_kind, only_matches=False)
                .filter_labels(run.field, is_kind, only_matches=False)
                .match((F(f"{GT_FIELD}.detections").length() > 0) | (F(f"{run.field}.detections").length() > 0)),
                description=f"Small-range labels of {run.field} with TIDE error type {kind}")


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
    detections, gt_errors, det_errors = {}, {}, {}
    for run in runs:
        results, detections[run.field] = _read_detections(
            run.path / f"detections_{split}.json", image_ids, set(category_names))
        gt_errors[run.field], det_errors[run.field] = _small_errors(
            data_dir / "annotations" / f"instances_{split}.json", coco, results)
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
        gts = [_detection(category_names[a["category_id"]], a["bbox"], width, height, a["area"],
                          annotation_id=a["id"], iscrowd=bool(a.get("iscrowd", 0)),
                          sr_patch_ids=patch_groups.get(a["id"]),
                          **{r.error_key: gt_errors[r.field].get(a["id"]) for r in runs})
               for a in anns_by_image[image["id"]]]
        sample = fo.Sample(filepath=str((image_dir / image["file_name"]).resolve()),
                           metadata=fo.ImageMetadata(width=width, height=height),
                           image_id=image["id"], **{GT_FIELD: fo.Detections(detections=gts)})
        for run in runs:
            sample[run.field] = fo.Detections(detections=[
                _detection(category_names[d["category_id"]], d["bbox"], width, height,
                           d["bbox"][2] * d["bbox"][3], confidence=float(d["score"]),
                           **{run.error_key: det_errors[run.field].get(i)})
                for i, d in detections[run.field].get(image["id"], [])])
        samples.append(sample)

    # Built under a temporary non-persistent name: a failed build is cleaned up by FiftyOne
    # and leaves the previous dataset in place.
    building = fo.Dataset(f"{name}-building-{secrets.token_hex(4)}")
    building_patches = None
    try:
        small_gt = [sum(d.size == "small" and not d.iscrowd for d in s[GT_FIELD].detections)
                    for s in samples]
        save_evaluations = [_evaluate_before_writing(building, samples, run, compute_mAP) for run in runs]
        building.add_samples(samples)
        # FiftyOne reloads every Sample object still alive after each bulk write; dropping
        # ours makes the writes below ~10x faster.
        del samples
        # Declares the label attributes (area_px, size, error_<run>, ...): the App offers
        # filters only for declared fields.
        building.add_dynamic_sample_fields()
        building.default_classes = [c["name"] for c in coco["categories"]]
        building.set_values("small_gt", small_gt)
        recalls = {}
        for run, save_evaluation in zip(runs, save_evaluations):
            save_evaluation()
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


def small_error_counts(dataset: fo.Dataset) -> dict[str, dict[str, int]]:
    """Per run: {TIDE error type: count} from the ``error_{run}`` attributes, counted as
    eval.json's "errors" counts of the small bin: Cls..Bkg on detections, Miss on ground truth."""
    counts = {}
    for run in dataset.info["sodlab"]["runs"]:
        on_detections = dataset.count_values(f"{run}.detections.error_{run}")
        counts[run] = {kind: on_detections.get(kind, 0) for kind in ERROR_TYPES[:-1]}
        counts[run]["Miss"] = dataset.count_values(f"{GT_FIELD}.detections.error_{run}").get("Miss", 0)
    return counts


def evaluate_size_range(dataset: fo.Dataset, run: str, area_range=SMALL_AREA, eval_key: str | None = None,
                        compute_mAP: bool = False):
    """FiftyOne's COCO evaluation (IoU 0.5) of one run on one size range, predictions filtered too.

    area_range: [lo, hi] of ``area_px``, closed as COCOeval's ranges (default COCO's small).
    The evaluated view keeps what COCOeval's area range keeps: the ground truth in the range and
    every crowd region (detections on them stay ignored); a detection the run's evaluation matched
    to ground truth in the range, whatever its own size; and an unmatched detection (or one on a
    crowd region) whose own box area is in the range. Filtering detections by their own area
    alone would make a 33 px box on a 31 px object a miss; not filtering them would make every
    box on a larger object a false positive of the range.
    eval_key: default "eval_RUN_small" for COCO's small range, else "eval_RUN_LO_HI".
    Returns FiftyOne's DetectionResults; the view is ``dataset.load_evaluation_view(eval_key)``.
    """
    field = field_name(run)
    if field not in dataset.info["sodlab"]["runs"]:
        raise ValueError(f"no run {run!r} in {dataset.name} (runs: {sorted(dataset.info['sodlab']['runs'])})")
    lo, hi = (float(v) for v in area_range)
    if eval_key is None:
        suffix = "small" if (lo, hi) == SMALL_AREA else f"{round(lo)}_{round(hi)}"
        eval_key = f"eval_{field}_{suffix}"
    key = f"eval_{field}"
    gt_id, gt_area, gt_crowd, dt_id, dt_area, dt_match = (dataset.values(path, unwind=True) for path in (
        f"{GT_FIELD}.detections.id", f"{GT_FIELD}.detections.area_px", f"{GT_FIELD}.detections.iscrowd",
        f"{field}.detections.id", f"{field}.detections.area_px", f"{field}.detections.{key}_id"))
    crowd = {i for i, c in zip(gt_id, gt_crowd) if c}
    in_range = {i for i, a, c in zip(gt_id, gt_area, gt_crowd) if not c and lo <= a <= hi}
    keep = sorted(in_range | crowd)
    keep += [i for i, a, match in zip(dt_id, dt_area, dt_match)
             if match in in_range or ((not match or match in crowd) and lo <= a <= hi)]
    view = dataset.select_labels(ids=keep, fields=[GT_FIELD, field])
    return view.evaluate_detections(field, gt_field=GT_FIELD, eval_key=eval_key, method="coco",
                                    iou=IOU_THRESHOLD, classwise=True, compute_mAP=compute_mAP)


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

"""COCO evaluation: model -> COCO results -> pycocotools COCOeval -> eval.json, plus tables.

The 12 standard COCO numbers come straight from ``COCOeval.summarize`` (AP, AP50, AP75, APs,
APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) as fractions. Small object detection needs a finer
view than COCO's "small" (everything under 32x32), so ``coco_eval`` also asks the same COCOeval
run for AP over finer bins of object side sqrt(area): <8, 8-16, 16-32, 32-64, 64-128, >128 px.
Matching is pycocotools' own; nothing here re-implements it. Beside COCO's numbers, eval.json
holds TIDE's error decomposition by size ("errors", sodlab.errors) and the tiny-object metrics
("tiny": AP at IoU 0.25, AI-TOD's bins, NWD-based AP; sodlab.tiny_metrics).

Conventions (those of COCO): a number is -1 when there is no ground truth for it (no object in
that size range); a category or size range with ground truth but no detections scores 0. An
empty results list is evaluated as "no detections" (pycocotools' ``loadRes`` cannot take it).
Crowd ground truth is ignored by COCOeval: detections on it are neither TP nor FP.
Areas are COCO ``area`` (segment / visible pixels), not box w*h, for ground truth; pycocotools
uses box w*h for detections.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from sodlab.data.coco import CocoDetection, apply_box_policy, collate_fn, load_coco_json
from sodlab.errors import ERROR_TYPES, BinErrors, analyze, error_summary
from sodlab.io import atomic_write_json
from sodlab.tiny_metrics import AITOD_BINS, tiny_object_metrics

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Finer size bins by object side sqrt(area), in pixels. Half-open [lo, hi): pycocotools compares
# area ranges inclusively at both ends, so each upper bound is nudged just below hi**2; otherwise an
# 8x8 object (area exactly 64) would count in two bins.
FINE_BIN_EDGES = (0, 8, 16, 32, 64, 128, math.inf)
FINE_BIN_LABELS = ("<8", "8-16", "16-32", "32-64", "64-128", ">128")
_MAX_AREA = 1e5**2  # COCO's own upper bound for "all" and "large"
# Bins of the error analysis: all objects, COCO's small, and the fine bins under 32 px.
ERROR_BIN_LABELS = ("all", "small") + FINE_BIN_LABELS[:3]

# The paper's column order and headers.
PAPER_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COLUMN_HEADERS = {"AP": "AP 0.5:0.95", "AP50": "0.5", "AP75": "0.75", "APs": "S", "APm": "M", "APl": "L"}


def _fine_area_ranges() -> list[list[float]]:
    ranges = []
    for lo, hi in zip(FINE_BIN_EDGES[:-1], FINE_BIN_EDGES[1:]):
        upper = _MAX_AREA if math.isinf(hi) else float(np.nextafter(float(hi) ** 2, 0.0))
        ranges.append([float(lo) ** 2, upper])
    return ranges


def error_area_ranges() -> dict[str, list[float]]:
    """{label of ERROR_BIN_LABELS: COCOeval area range}; "small" is COCO's [0, 32**2]."""
    fine = dict(zip(FINE_BIN_LABELS, _fine_area_ranges()))
    return {"all": [0.0, _MAX_AREA], "small": [0.0, 32.0**2], **{b: fine[b] for b in ERROR_BIN_LABELS[2:]}}


def load_coco_gt(ann_file: str | os.PathLike) -> COCO:
    """A pycocotools COCO built from a validated json (``load_coco_json``), without the prints.

    The ground truth is what training sees: ``apply_box_policy`` drops the boxes training
    skips (null, NaN, zero size, outside the image) and clips those partly outside, with a
    counted warning, so a detector that finds exactly the training targets scores 1.0.
    Fills what COCOeval needs but COCO does not require: ``iscrowd`` (0) and ``area`` (the
    policy's: the json's, else the clipped box's w*h).
    Renumbers annotation ids when one is 0, because COCOeval stores the matched ground-truth id
    in its match table and reads 0 as "unmatched", which would turn that true positive into a
    false positive.
    """
    data = load_coco_json(ann_file)
    data["annotations"] = annotations = apply_box_policy(data, ann_file, "evaluation ground truth")
    for ann in annotations:
        ann.setdefault("iscrowd", 0)
    if any(ann["id"] == 0 for ann in annotations):
        for new_id, ann in enumerate(annotations, start=1):
            ann["id"] = new_id
    return _coco_from_dict(data)


def _coco_from_dict(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def predictions_to_coco_results(
    outputs: Mapping[int, Mapping[str, torch.Tensor]], label_to_cat_id: Mapping[int, int], decimals: int = 2
) -> list[dict]:
    """{image_id: {"boxes" xyxy, "labels" 1..C, "scores"}} -> COCO results [{image_id, category_id, bbox xywh, score}].

    ``category_id`` is the dataset's own id. Boxes are rounded to ``decimals`` pixels; scores keep
    5 decimals, so rounding does not create ties that would reorder detections.
    """
    results = []
    for image_id, output in outputs.items():
        boxes = torch.as_tensor(output["boxes"]).detach().cpu().double().reshape(-1, 4)
        labels = torch.as_tensor(output["labels"]).detach().cpu().tolist()
        scores = torch.as_tensor(output["scores"]).detach().cpu().tolist()
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(
                f"image id {image_id}: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, label, score in zip(xywh, labels, scores):
            if label not in label_to_cat_id:
                raise ValueError(
                    f"image id {image_id}: predicted label {label} has no category "
                    f"(known labels: {min(label_to_cat_id)}..{max(label_to_cat_id)})"
                )
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat_id[label]),
                    "bbox": [round(v, decimals) for v in box],
                    "score": round(float(score), 5),
                }
            )
    return results


def _check_results(coco_gt: COCO, results: list[dict]) -> None:
    """Clear errors for results that pycocotools would reject with a bare assert or silently drop."""
    image_ids, cat_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, result in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(result, Mapping) or not {"image_id", "category_id", "bbox", "score"} <= result.keys():
            raise ValueError(f"{where}: needs image_id, category_id, bbox, score; got {result!r}")
        if result["image_id"] not in image_ids:
            raise ValueError(f"{where}: image id {result['image_id']!r} is not in the ground truth")
        if result["category_id"] not in cat_ids:
            raise ValueError(f"{where} (image id {result['image_id']}): category_id {result['category_id']!r} "
                             "is not in the ground truth categories")
        bbox, score = result["bbox"], result["score"]
        numbers = list(bbox) + [score] if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else []
        if not numbers or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError(f"{where} (image id {result['image_id']}): bbox {bbox!r} / score {result['score']!r} "
                             "must be finite numbers")


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    if not results:
        # loadRes indexes results[0]; an empty detection set is a valid (if poor) answer.
        return _coco_from_dict(
            {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]),
             "annotations": []}
        )
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes writes id/area/segmentation into the dicts it gets: give it copies.
        return coco_gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])


def _mean_valid(values: np.ndarray) -> float:
    """COCO's summary: mean over entries that are not -1 (absent), or -1 when all are."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def coco_eval(
    coco_gt: COCO | str | os.PathLike,
    results: list[dict],
    image_ids: Iterable[int] | None = None,
    fine_bins: bool = True,
    verbose: bool = False,
    errors: bool = True,
    tiny: bool = True,
) -> dict[str, Any]:
    """COCOeval (bbox) of ``results`` against ``coco_gt``: the 12 COCO stats as fractions + "fine_bins"
    (+ "errors", TIDE's dAPs per ERROR_BIN_LABELS bin, and "tiny", the tiny-object metrics).

    ``image_ids`` restricts evaluation to those images (e.g. a quick eval on part of val); by
    default all ground-truth images count, and an image without results counts as missed.
    ``fine_bins`` maps each label of ``FINE_BIN_LABELS`` to {"AP", "AP50", "AR100", "num_gt"}:
    ``num_gt`` counts the non-crowd ground truth in the bin, and the bins partition it.
    """
    if not isinstance(coco_gt, COCO):
        coco_gt = load_coco_gt(coco_gt)
    _check_results(coco_gt, results)
    coco_dt = _load_results(coco_gt, results)

    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    params = evaluator.params
    if image_ids is not None:
        params.imgIds = sorted(set(image_ids))
    num_standard = len(params.areaRng)
    if fine_bins:
        # Extra area ranges go into the same run; summarize() looks its four ranges up by label.
        params.areaRng = list(params.areaRng) + _fine_area_ranges()
        params.areaRngLbl = list(params.areaRngLbl) + list(FINE_BIN_LABELS)

    output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with output:
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats: dict[str, Any] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    # AP at IoU 0.75 on COCO's small objects: the paper argues SR should serve box regression, and
    # this is where tighter small boxes show (COCOeval's summary has AP75 only over all sizes).
    iou75 = int(np.argmin(np.abs(params.iouThrs - 0.75)))
    stats["AP75s"] = _mean_valid(evaluator.eval["precision"][iou75, :, :, params.areaRngLbl.index("small"),
                                                             params.maxDets.index(100)])

    if fine_bins:
        precision = evaluator.eval["precision"]  # [IoU thresholds, recall thresholds, classes, areas, maxDets]
        recall = evaluator.eval["recall"]  # [IoU thresholds, classes, areas, maxDets]
        max_dets = params.maxDets.index(100)
        iou50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
        evaluated_images, evaluated_cats = set(params.imgIds), set(params.catIds)
        areas = np.array(
            [ann["area"] for ann in coco_gt.dataset["annotations"]
             if not ann.get("iscrowd", 0) and ann["image_id"] in evaluated_images
             and ann["category_id"] in evaluated_cats],
            dtype=np.float64,
        )
        stats["fine_bins"] = {}
        for offset, (label, (lo, hi)) in enumerate(zip(FINE_BIN_LABELS, _fine_area_ranges())):
            a = num_standard + offset
            stats["fine_bins"][label] = {
                "AP": _mean_valid(precision[:, :, :, a, max_dets]),
                "AP50": _mean_valid(precision[iou50, :, :, a, max_dets]),
                "AR100": _mean_valid(recall[:, :, a, max_dets]),
                "num_gt": int(np.count_nonzero((areas >= lo) & (areas <= hi))),
            }
        if verbose:
            print(format_fine_bins_table([("fine bins", stats)]))
    if errors:
        stats["errors"] = error_summary(coco_gt, coco_dt, error_area_ranges(), params.imgIds)
    if tiny:
        stats["tiny"] = tiny_object_metrics(coco_gt, coco_dt, params.imgIds)
    return stats


def error_analysis(
    coco_gt: COCO | str | os.PathLike, results: list[dict], image_ids: Iterable[int] | None = None
) -> dict[str, BinErrors]:
    """TIDE's analysis (sodlab.errors.analyze) of ``results`` per ERROR_BIN_LABELS bin, object by object:
    what eval.json's "errors" summarizes, plus each detection's outcome (results[i] has id i + 1)
    and each ground truth's (by annotation id, as ``load_coco_gt`` numbers them)."""
    if not isinstance(coco_gt, COCO):
        coco_gt = load_coco_gt(coco_gt)
    _check_results(coco_gt, results)
    return analyze(coco_gt, _load_results(coco_gt, results), error_area_ranges(), image_ids)


def _to_original_coordinates(
    boxes: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """Boxes predicted on the (possibly resized) input -> pixels of the image as annotated.

    The factor comes from the actual sizes, not from the nominal scale: a resize rounds the
    output size to whole pixels, so 255 px at x1.5 is 382 px, not 382.5.
    """
    sy, sx = original_hw[0] / input_hw[0], original_hw[1] / input_hw[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def evaluate_model(
    model: torch.nn.Module,
    dataset: CocoDetection | Subset,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]]]:
    """Run a torchvision-style detector over ``dataset``: (COCO results list, outputs per image id).

    Outputs are on the CPU, with boxes in original image coordinates (a dataset resize, e.g. the
    x2 upscale baseline, is undone). The model's train/eval mode is restored afterwards.
    ``dataset`` may be a ``Subset`` of a ``CocoDetection``.
    """
    (results, outputs, _), = evaluate_models([model], dataset, device, batch_size, num_workers, progress)
    return results, outputs


def _proposal_settings(detector: torch.nn.Module) -> tuple:
    """What ``SRDetector.detect``'s answer depends on besides the weights: the input transform's and
    the RPN's inference settings (the RoI pooling has none a config changes)."""
    t, rpn = detector.transform, detector.rpn
    return (t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size,
            rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh, rpn.score_thresh)


def same_detector(models: list[torch.nn.Module]) -> bool:
    """True when every model is an SR detector whose detector has the same weights (and buffers)
    and proposal settings as the first's, so that one ``detect`` serves them all."""
    if not all(hasattr(m, "detect") for m in models):
        return False
    first, settings = models[0].detector.state_dict(), _proposal_settings(models[0].detector)
    return all(_proposal_settings(m.detector) == settings and m.detector.state_dict().keys() == first.keys()
               and all(torch.equal(v, first[k]) for k, v in m.detector.state_dict().items()) for m in models[1:])


@torch.no_grad()
def evaluate_models(
    models: list[torch.nn.Module],
    dataset: CocoDetection | Subset,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
) -> list[tuple[list[dict], dict[int, dict[str, torch.Tensor]], float]]:
    """``evaluate_model`` for several models over the same batches: per model (results, outputs,
    seconds of inference).

    SR detectors on the same detector weights (``same_detector``: a bench seed's SR variants, or
    one run with D on other patches) share each batch's detector pass (``SRDetector.detect``), so
    the backbone, RPN and box head run once for all of them; each model's seconds count that shared
    pass whole, as it would run alone. Their outputs equal separate evaluations'.
    """
    base = _base_dataset(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)
    shared = len(models) > 1 and same_detector(models)
    modes = [model.training for model in models]
    outputs: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in models]
    seconds = [0.0] * len(models)
    try:
        for model in models:
            model.eval()
        for images, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            images = [image.to(device) for image in images]
            tic = time.perf_counter()
            detected = models[0].detect(images) if shared else None
            shared_seconds = time.perf_counter() - tic
            for i, model in enumerate(models):
                tic = time.perf_counter()
                # An SR model whose D judges the exact twins' patches (an oracle G) takes them beside the images.
                extra = {"detected": detected} if shared else {}
                if getattr(model, "patches", None) == "twin" and "hr_image" in targets[0]:
                    extra["hr_images"] = [t["hr_image"].to(device) for t in targets]
                predictions = model(images, **extra)
                seconds[i] += shared_seconds + time.perf_counter() - tic
                for image, target, prediction in zip(images, targets, predictions):
                    image_id = int(target["image_id"])
                    boxes = prediction["boxes"].detach().float().cpu()
                    outputs[i][image_id] = {
                        "boxes": _to_original_coordinates(boxes, tuple(image.shape[-2:]),
                                                          base.original_size(image_id)),
                        "labels": prediction["labels"].detach().cpu(),
                        "scores": prediction["scores"].detach().float().cpu(),
                    }
    finally:
        for model, was_training in zip(models, modes):
            model.train(was_training)
    return [(predictions_to_coco_results(out, base.label_to_cat_id), out, sec) for out, sec in zip(outputs, seconds)]


def evaluate_run(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    dataset: CocoDetection | Subset,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    tile: int = 0,
    tile_overlap: float = 0.2,
    ground_truth: str | os.PathLike | None = None,
    box_scale: float = 1.0,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``dataset``; write run_dir/detections_val.json and run_dir/eval.json; return the stats.

    The detections are scored against ``ground_truth`` (default: the dataset's json) after
    multiplying their boxes by ``box_scale`` (the HR oracle's twin frame -> the LR frame: 1/k).
    ``record`` goes into eval.json beside the stats (e.g. inference settings overridden for
    this evaluation).

    Distributed (``world_size`` > 1, a process group initialised): every rank scores every
    world_size-th image, the results are gathered on all ranks, and rank 0 alone scores them and
    writes the files (other ranks return None). The gathered results are put back in dataset
    order, so the files equal a one-process evaluation's. With ``tile``, each image is scored by
    sliced inference (overlapping tiles plus a full-image pass, class-wise NMS) at native
    resolution (sodlab.data.tiles), against the same native-resolution ground truth.
    """
    run_dir = Path(run_dir)
    base = _base_dataset(dataset)
    shard = dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))
    if tile:
        from sodlab.data.tiles import sliced_outputs

        outputs = sliced_outputs(model, shard, tile, tile_overlap, device, progress)
        results = predictions_to_coco_results(outputs, base.label_to_cat_id)
        inference = {"mode": "sliced", "tile": tile, "overlap": tile_overlap, "full_image_pass": True,
                     "merge": "class-wise NMS at IoU 0.5"}
    else:
        results, outputs = evaluate_model(model, shard, device, batch_size, num_workers, progress)
        inference = {"mode": "whole image"}
    image_ids = list(outputs)
    if world_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (results, image_ids))
        position = {image_id: i for i, image_id in enumerate(base.ids)}
        results = sorted((r for part, _ in gathered for r in part), key=lambda r: position[r["image_id"]])
        image_ids = sorted((i for _, ids in gathered for i in ids), key=position.__getitem__)
    if rank != 0:
        return None
    if box_scale != 1.0:
        results = [{**r, "bbox": [round(v * box_scale, 2) for v in r["bbox"]]} for r in results]
    stats = {**coco_eval(ground_truth or base.ann_file, results, image_ids=image_ids), "inference": inference,
             **(record or {})}
    atomic_write_json(run_dir / "detections_val.json", results, indent=None)
    atomic_write_json(run_dir / "eval.json", stats)
    return stats


def _base_dataset(dataset) -> CocoDetection:
    """The CocoDetection under any number of Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


# --- tables -------------------------------------------------------------------------------------

def _rows(rows: Mapping[str, Mapping] | Iterable[tuple]) -> list[tuple[str, str | None, Mapping]]:
    """Accept {name: stats}, [(name, stats)] or [(name, backbone, stats)] (names may then repeat)."""
    items = rows.items() if isinstance(rows, Mapping) else rows
    normalized = []
    for row in items:
        if len(row) == 2:
            normalized.append((str(row[0]), None, row[1]))
        elif len(row) == 3:
            normalized.append((str(row[0]), row[1], row[2]))
        else:
            raise ValueError(f"table row must be (name, stats) or (name, backbone, stats), got {row!r}")
    return normalized


def _percent(value: Any) -> str:
    """Fraction -> percent with one decimal; "-" for COCO's -1 (no ground truth), "" when missing."""
    if value is None:
        return ""
    value = float(value)
    return "-" if value < 0 else f"{100 * value:.1f}"


def _markdown(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def format_table(
    rows: Mapping[str, Mapping] | Iterable[tuple],
    columns: Iterable[str] = PAPER_COLUMNS,
    name_header: str = "Methods",
) -> str:
    """Markdown table in the paper's layout: Methods | [Backbone] | AP 0.5:0.95 | 0.5 | 0.75 | S | M | L.

    Values are percent with one decimal; "-" where COCO reports -1. The Backbone column appears
    when some row is given as (name, backbone, stats).
    """
    rows, columns = _rows(rows), list(columns)
    with_backbone = any(backbone is not None for _, backbone, _ in rows)
    headers = [name_header] + (["Backbone"] if with_backbone else []) + [COLUMN_HEADERS.get(c, c) for c in columns]
    body = [
        [name] + ([backbone or ""] if with_backbone else []) + [_percent(stats.get(c)) for c in columns]
        for name, backbone, stats in rows
    ]
    return _markdown(headers, body)


def format_fine_bins_table(
    rows: Mapping[str, Mapping] | Iterable[tuple], metric: str = "AP", name_header: str = "Methods"
) -> str:
    """Markdown table of ``metric`` ("AP", "AP50" or "AR100") per fine size bin (object side in px)."""
    rows = _rows(rows)
    with_backbone = any(backbone is not None for _, backbone, _ in rows)
    headers = [name_header] + (["Backbone"] if with_backbone else []) + [f"{metric} {b} px" for b in FINE_BIN_LABELS]
    body = []
    for name, backbone, stats in rows:
        bins = stats.get("fine_bins", {})
        body.append(
            [name] + ([backbone or ""] if with_backbone else [])
            + [_percent(bins.get(b, {}).get(metric)) for b in FINE_BIN_LABELS]
        )
    return _markdown(headers, body)


# The tiny-object metrics' columns (eval.json "tiny") and their headers.
TINY_COLUMNS = ("AP", "AP50", "AP25", "AP_nwd", "AP50_nwd") + tuple(f"AP {b}" for b in AITOD_BINS)
TINY_HEADERS = {"AP": "AP 0.5:0.95", "AP50": "0.5", "AP25": "0.25", "AP_nwd": "NWD 0.5:0.95",
                "AP50_nwd": "NWD 0.5", **{f"AP {b}": f"{b} {lo}-{hi}" for b, (lo, hi) in AITOD_BINS.items()}}


def format_tiny_table(rows: Mapping[str, Mapping] | Iterable[tuple], name_header: str = "Methods") -> str:
    """Markdown table of eval.json's "tiny": AP (IoU 0.5:0.95, 0.5, 0.25), NWD-based AP (0.5:0.95,
    0.5) and AP (IoU 0.5:0.95) in AI-TOD's bins, percent with one decimal, in the paper's layout."""
    rows = _rows(rows)
    with_backbone = any(backbone is not None for _, backbone, _ in rows)
    headers = [name_header] + (["Backbone"] if with_backbone else []) + [TINY_HEADERS[c] for c in TINY_COLUMNS]
    body = []
    for name, backbone, stats in rows:
        ranges = stats.get("tiny", {}).get("ranges", {})
        cells = [ranges.get("all", {}).get(c) for c in TINY_COLUMNS[:5]]
        cells += [ranges.get(b, {}).get("AP") for b in AITOD_BINS]
        body.append([name] + ([backbone or ""] if with_backbone else []) + [_percent(v) for v in cells])
    return _markdown(headers, body)


def _count(value: float) -> str:
    """An error count: an integer for one run, one decimal for a mean over seeds."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def format_errors_table(rows: Mapping[str, Mapping] | Iterable[tuple], size_bin: str = "small",
                        name_header: str = "Methods") -> str:
    """Markdown table of TIDE's dAP per error type (percent points, one decimal) in one bin of
    eval.json's "errors" (ERROR_BIN_LABELS), with the bin's AP50 and each type's count."""
    rows = _rows(rows)
    with_backbone = any(backbone is not None for _, backbone, _ in rows)
    headers = ([name_header] + (["Backbone"] if with_backbone else []) + [f"AP50 {size_bin}"]
               + [f"d{t}" for t in ERROR_TYPES] + [f"#{t}" for t in ERROR_TYPES])
    body = []
    for name, backbone, stats in rows:
        result = stats.get("errors", {}).get("bins", {}).get(size_bin, {})
        counts = result.get("counts", {})
        body.append([name] + ([backbone or ""] if with_backbone else []) + [_percent(result.get("AP50"))]
                    + [_percent(result.get("dAP", {}).get(t)) for t in ERROR_TYPES]
                    + [_count(counts[t]) if t in counts else "" for t in ERROR_TYPES])
    return _markdown(headers, body)

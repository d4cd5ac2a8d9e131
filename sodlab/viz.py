"""Figures and widgets for the notebooks and the bench report.

The notebooks (notebooks/01..05) stay thin: each cell calls one function of sodlab and displays
what it returns. Budgets and runs come from sodlab.recipes and sodlab.runs; this module draws.
Every figure is reproducible from files alone: it is drawn from a data directory or run
directories, never from notebook state.

What is here, in the order the notebooks use it:

* Data statistics (01): object size histogram with COCO's small/medium/large bounds, class
  counts by size bucket, a grid of images with boxes coloured by size bucket, an LR image next
  to its exact HR twin.
* Training curves (02): the detector's losses and the GAN's terms from metrics.jsonl.
* Evaluation (03): AP by fine size bin per method.
* SR inspection (04): ``inspect_roi`` (z_LR, bicubic, G(z_LR), the HR twin's z_HR with PSNR and
  SSIM as sodlab.sr_quality defines them; D's class probabilities and regressed box for one
  RoI), ``decision_changes`` and its gallery (small objects whose class decision the SR branch
  changed relative to the box head), and ``SRInspector``, the ipywidgets front end.
* FiftyOne (05): saved view counts and the App launch flag.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: no global figure state,
so a widget callback or a test never leaks figures, and a notebook shows a returned figure once
(with ``%matplotlib inline``, which registers the PNG formatter for Figure objects).
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou

from sodlab.data.coco import BACKGROUND, coco_paths, load_coco_json, read_rgb_image, size_bucket
from sodlab.errors import ERROR_TYPES
from sodlab.evaluate import FINE_BIN_LABELS
from sodlab.io import read_json, read_metrics_log

# --------------------------------------------------------------------------------------------
# Data statistics (notebook 01)
# --------------------------------------------------------------------------------------------

# COCO's size buckets by area (pixels^2); the bounds are inclusive as in COCOeval's areaRng,
# which is also what sodlab.explore uses.
SIZE_BOUNDS = (32, 96)
BUCKETS = ("small", "medium", "large")
BUCKET_COLOURS = {"small": "#e6194b", "medium": "#f58231", "large": "#4363d8"}


def _annotation_area(ann: dict) -> float:
    area = ann.get("area")
    return float(area) if area is not None else float(ann["bbox"][2]) * float(ann["bbox"][3])


def split_statistics(data_dir: str | os.PathLike, split: str) -> dict[str, Any]:
    """Counts of one COCO-format split: images, objects, objects per class and size bucket.

    Returns {"images", "objects", "class_names", "per_class": {name: {bucket: count}},
    "per_bucket": {bucket: count}, "sides": sqrt(area) of every non-crowd object (np.ndarray),
    "objects_per_image": np.ndarray}.
    """
    _, ann_file = coco_paths(data_dir, split)
    coco = load_coco_json(ann_file)
    names = {c["id"]: c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])}
    per_class = {name: {b: 0 for b in BUCKETS} for name in names.values()}
    per_image = Counter()
    sides = []
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        area = _annotation_area(ann)
        per_class[names[ann["category_id"]]][size_bucket(area)] += 1
        per_image[ann["image_id"]] += 1
        sides.append(math.sqrt(max(area, 0.0)))
    per_bucket = {b: sum(counts[b] for counts in per_class.values()) for b in BUCKETS}
    return {"images": len(coco["images"]), "objects": len(sides), "class_names": list(names.values()),
            "per_class": per_class, "per_bucket": per_bucket, "sides": np.asarray(sides, dtype=np.float64),
            "objects_per_image": np.asarray([per_image[image["id"]] for image in coco["images"]])}


def format_statistics(stats: Mapping[str, Any]) -> str:
    """Markdown table of objects per class and size bucket, with a total row."""
    lines = ["| class | small | medium | large | total |", "|---|---|---|---|---|"]
    for name in stats["class_names"]:
        counts = stats["per_class"][name]
        lines.append(f"| {name} | " + " | ".join(str(counts[b]) for b in BUCKETS) + f" | {sum(counts.values())} |")
    total = stats["per_bucket"]
    fractions = " | ".join(f"{total[b]} ({100 * total[b] / max(1, stats['objects']):.0f}%)" for b in BUCKETS)
    lines.append(f"| **all** | {fractions} | {stats['objects']} |")
    return "\n".join(lines)


def plot_size_histogram(sides: Sequence[float] | np.ndarray, bins: int = 40, title: str | None = None) -> Figure:
    """Histogram of object side sqrt(area) on a log x axis, with COCO's bounds (32, 96) marked
    and each bucket's share written in its band."""
    sides = np.asarray(sides, dtype=np.float64)
    sides = sides[sides > 0]
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    if len(sides) == 0:
        ax.text(0.5, 0.5, "no objects", ha="center", va="center", transform=ax.transAxes)
        return fig
    low, high = min(sides.min(), 2.0), max(sides.max(), 128.0)
    edges = np.geomspace(low * 0.95, high * 1.05, bins + 1)
    ax.hist(sides, bins=edges, color="#808080", edgecolor="white")
    ax.set_xscale("log")
    ax.set_xlabel("object side sqrt(area) [px]")
    ax.set_ylabel("objects")
    bands = ((edges[0], SIZE_BOUNDS[0]), SIZE_BOUNDS, (SIZE_BOUNDS[1], edges[-1]))
    for bucket, (lo, hi) in zip(BUCKETS, bands):
        ax.axvspan(lo, hi, color=BUCKET_COLOURS[bucket], alpha=0.12, lw=0)
        share = np.mean([size_bucket(s * s) == bucket for s in sides])
        ax.text(math.sqrt(lo * hi), 0.95, f"{bucket}\n{100 * share:.0f}%", transform=ax.get_xaxis_transform(),
                ha="center", va="top", color=BUCKET_COLOURS[bucket], fontweight="bold")
    for bound in SIZE_BOUNDS:
        ax.axvline(bound, color="black", ls="--", lw=1)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(title or f"object sizes ({len(sides)} objects); COCO bounds 32 and 96 px")
    return fig


def plot_class_counts(stats: Mapping[str, Any]) -> Figure:
    """Horizontal stacked bars: objects per class, split by size bucket."""
    names = stats["class_names"]
    fig = Figure(figsize=(7, 0.35 * len(names) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(names))
    for bucket in BUCKETS:
        counts = np.array([stats["per_class"][n][bucket] for n in names])
        ax.barh(names, counts, left=left, color=BUCKET_COLOURS[bucket], label=bucket)
        left += counts
    ax.invert_yaxis()
    ax.set_xlabel("objects")
    ax.legend(loc="lower right")
    return fig


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an RGB uint8 array [H, W, 3] (decoding bounded as training's is)."""
    return np.asarray(read_rgb_image(path))


def _split_records(data_dir, split) -> tuple[dict, dict, dict, Path]:
    """(images by id, annotations by image id, category names by id, image dir)."""
    image_dir, ann_file = coco_paths(data_dir, split)
    coco = load_coco_json(ann_file)
    anns = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        anns[ann["image_id"]].append(ann)
    return ({image["id"]: image for image in coco["images"]}, anns,
            {c["id"]: c["name"] for c in coco["categories"]}, image_dir)


def draw_box(ax, box_xyxy: Sequence[float], colour: str, label: str | None = None, ls: str = "-", lw: float = 1.2,
             label_at: str = "top"):
    """A COCO-convention box (xyxy, pixel i covers [i, i + 1)) over an ``imshow``ed image, with its
    label above ("top") or below ("bottom") it."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    # imshow centres pixel i at i, so a pixel-edge coordinate x sits at x - 0.5.
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour, ls=ls, lw=lw))
    if label:
        y, va = (y1 - 0.7, "bottom") if label_at == "top" else (y2 - 0.3, "top")
        ax.text(x1 - 0.5, y, label, color=colour, fontsize=8, va=va, fontweight="bold",
                bbox=dict(facecolor="black", alpha=0.35, pad=0.5, lw=0))


def plot_image_grid(data_dir: str | os.PathLike, split: str, image_ids: Sequence[int] | None = None, n: int = 6,
                    ncols: int = 3) -> Figure:
    """Images of a split with their ground truth boxes (crowd regions left out) coloured by size bucket."""
    images, anns, _, image_dir = _split_records(data_dir, split)
    image_ids = list(image_ids) if image_ids is not None else sorted(images)[:n]
    nrows = max(1, math.ceil(len(image_ids) / ncols))
    fig = Figure(figsize=(3.6 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, image_id in zip(axes, image_ids):
        record = images[image_id]
        ax.imshow(read_image(image_dir / record["file_name"]), interpolation="nearest")
        counts = Counter()
        for ann in anns[image_id]:
            if ann.get("iscrowd", 0):
                continue
            bucket = size_bucket(_annotation_area(ann))
            counts[bucket] += 1
            x, y, w, h = ann["bbox"]
            draw_box(ax, (x, y, x + w, y + h), BUCKET_COLOURS[bucket], lw=1.0)
        ax.set_title(f"{record['file_name']}: " + ", ".join(f"{counts[b]} {b}" for b in BUCKETS if counts[b]),
                     fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=BUCKET_COLOURS[b], label=b) for b in BUCKETS]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return fig


def pick_small_object(data_dir: str | os.PathLike, split: str, image_id: int, side: float = 12.0) -> dict:
    """The object of the image to zoom on: the one whose side sqrt(area) is nearest ``side``
    (12 px: small enough that the LR view loses the detail that decides its class, large
    enough to see it in the HR twin)."""
    _, anns, _, _ = _split_records(data_dir, split)
    candidates = [a for a in anns[image_id] if not a.get("iscrowd", 0)]
    if not candidates:
        raise ValueError(f"{data_dir}: image id {image_id} of split {split!r} has no objects to zoom on")
    return min(candidates, key=lambda a: abs(math.sqrt(_annotation_area(a)) - side))


def _crop_window(box_xyxy, side: float, width: int, height: int) -> tuple[int, int, int, int]:
    """An integer square window of ``side`` px centred on the box, shifted to stay inside the image."""
    side = int(min(side, width, height))
    cx, cy = (box_xyxy[0] + box_xyxy[2]) / 2, (box_xyxy[1] + box_xyxy[3]) / 2
    x0 = int(min(max(round(cx - side / 2), 0), width - side))
    y0 = int(min(max(round(cy - side / 2), 0), height - side))
    return x0, y0, x0 + side, y0 + side


def plot_lr_hr_twin(data_dir: str | os.PathLike, split: str, image_id: int, annotation: dict | None = None,
                    k: int = 4, crop_side: int = 32) -> Figure:
    """The LR image with a crop marked, the crop zoomed (nearest neighbour) and the same crop of
    the exact xk HR twin: the detail the LR pixels have lost."""
    from sodlab.data.synth import render_twin

    images, _, names, image_dir = _split_records(data_dir, split)
    record = images[image_id]
    lr = read_image(image_dir / record["file_name"])
    hr = render_twin(data_dir, split, image_id, k)
    annotation = annotation or pick_small_object(data_dir, split, image_id)
    x, y, w, h = annotation["bbox"]
    box = (x, y, x + w, y + h)
    x0, y0, x1, y1 = _crop_window(box, crop_side, lr.shape[1], lr.shape[0])

    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(lr, interpolation="nearest")
    axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.5))
    axes[0].set_title(f"LR image {record['file_name']} ({lr.shape[1]}x{lr.shape[0]})")
    axes[1].imshow(lr[y0:y1, x0:x1], interpolation="nearest")
    draw_box(axes[1], (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0), "yellow")
    side = math.sqrt(_annotation_area(annotation))
    axes[1].set_title(f"LR crop {x1 - x0}x{y1 - y0}: a {names[annotation['category_id']]} of side {side:.1f} px")
    axes[2].imshow(hr[y0 * k:y1 * k, x0 * k:x1 * k], interpolation="nearest")
    axes[2].set_title(f"HR twin x{k}, same crop ({(x1 - x0) * k}x{(y1 - y0) * k})")
    for ax in axes:
        ax.set_axis_off()
    return fig


# --------------------------------------------------------------------------------------------
# Training curves (notebook 02)
# --------------------------------------------------------------------------------------------

DETECTOR_LOSSES = ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
D_TERMS = ("d_adv", "d_cls", "d_reg")
G_TERMS = ("g_adv", "g_cls", "g_reg", "g_mse", "g_tv")
ADVERSARIAL_BALANCE = ("d_real_prob", "d_fake_prob")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """runs/NAME/metrics.jsonl as a list of records; errors name the file and the line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (has the run started?)")
    return read_metrics_log(path)


def metric_series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of ``key`` over the records that logged it."""
    pairs = [(r["iter"], r[key]) for r in records if key in r and r[key] is not None]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    its, values = zip(*pairs)
    return np.asarray(its), np.asarray(values, dtype=np.float64)


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start); same length as ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values.copy()
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def _plot_series(ax, records, key, label, smooth, colour=None, log=False):
    its, values = metric_series(records, key)
    if len(its) == 0:
        return False
    line, = ax.plot(its, moving_average(values, smooth), label=label, color=colour, lw=1.5)
    if smooth > 1:  # the raw values faintly behind the smoothed line
        ax.plot(its, values, color=line.get_color(), alpha=0.25, lw=0.8)
    if log and (values > 0).all():
        ax.set_yscale("log")
    return True


def plot_detector_losses(runs: Mapping[str, str | os.PathLike], keys: Sequence[str] = DETECTOR_LOSSES,
                         smooth: int = 5) -> Figure:
    """One panel per detector loss (total, box head, RPN), one line per run."""
    logs = {name: read_metrics(path) for name, path in runs.items()}
    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for name, records in logs.items():
            _plot_series(ax, records, key, name, smooth)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    return fig


def plot_gan_losses(run_dir: str | os.PathLike, smooth: int = 5) -> Figure:
    """The SR branch's training: D's terms, G's terms (log scale: they differ by decades) and the
    adversarial balance D(z_HR) vs D(G(z_LR)), which stay near 0.5 when neither side wins."""
    records = read_metrics(run_dir)
    fig = Figure(figsize=(14, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = ((axes[0], D_TERMS, "D's losses (adv, cls, reg)", False),
              (axes[1], G_TERMS, "G's loss terms (unweighted)", True),
              (axes[2], ADVERSARIAL_BALANCE, "adversarial balance", False))
    for ax, keys, title, log in panels:
        drawn = [key for key in keys if _plot_series(ax, records, key, key, smooth, log=log)]
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
    axes[2].axhline(0.5, color="grey", ls=":", lw=1)
    axes[2].set_ylim(0, 1)
    axes[2].set_ylabel("mean D probability of 'real'")
    return fig


# --------------------------------------------------------------------------------------------
# Evaluation (notebook 03)
# --------------------------------------------------------------------------------------------

def read_evals(runs: Mapping[str, str | os.PathLike]) -> list[tuple[str, dict]]:
    """[(name, eval.json stats)] for the runs that have been evaluated, in the order given; rows
    for sodlab.evaluate.format_table / format_fine_bins_table."""
    return [(name, read_json(Path(path) / "eval.json")) for name, path in runs.items()
            if (Path(path) / "eval.json").is_file()]


def format_sr_quality(runs: Mapping[str, str | os.PathLike]) -> str:
    """Markdown table of runs/NAME/sr_quality.json (written by SR runs): PSNR and SSIM of the
    SR branch's patches against z_HR, next to bicubic's, on held-out RoIs. Runs without the file
    are left out."""
    lines = ["| run | RoIs | SR branch | PSNR SR | PSNR bicubic | SSIM SR | SSIM bicubic |",
             "|---|---|---|---|---|---|---|"]
    for name, path in runs.items():
        path = Path(path) / "sr_quality.json"
        if not path.is_file():
            continue
        q = read_json(path)
        if not q.get("rois"):
            lines.append(f"| {name} | 0 | {q.get('note', '')} | | | | |")
            continue
        lines.append(f"| {name} | {q['rois']} | {q.get('method', '')} | {q['sr']['psnr']:.2f} | "
                     f"{q['bicubic']['psnr']:.2f} | {q['sr']['ssim']:.3f} | {q['bicubic']['ssim']:.3f} |")
    return "\n".join(lines)


def plot_ap_by_size(rows: Sequence[tuple[str, Mapping]], metric: str = "AP",
                    errors: Mapping[str, Mapping] | None = None) -> Figure:
    """``metric`` per fine size bin (object side in px), one line per method; bins without
    ground truth are left out, and each bin's object count is written under its label.
    ``errors`` ({name: std stats}, as the bench's rows over seeds) draws error bars."""
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(FINE_BIN_LABELS))
    counts = {}
    for name, stats in rows:
        bins = stats.get("fine_bins", {})
        values = np.array([bins.get(b, {}).get(metric, -1.0) for b in FINE_BIN_LABELS], dtype=np.float64)
        for b in FINE_BIN_LABELS:
            counts.setdefault(b, bins.get(b, {}).get("num_gt"))
        values[values < 0] = np.nan  # COCO's -1: no ground truth in the bin
        err = None
        if errors and errors.get(name):
            err = [100 * (errors[name]["fine_bins"][b].get(metric) or 0) for b in FINE_BIN_LABELS]
        ax.errorbar(x, 100 * values, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xticks(x, [f"{b}\n(n={counts.get(b) if counts.get(b) is not None else '?'})" for b in FINE_BIN_LABELS])
    ax.set_xlim(-0.5, len(FINE_BIN_LABELS) - 0.5)
    ax.set_xlabel("object side sqrt(area) [px]")
    ax.set_ylabel(f"{metric} [%]")
    ax.axvspan(-0.5, 2.5, color=BUCKET_COLOURS["small"], alpha=0.08, lw=0)  # the three bins under 32 px
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    ax.set_title(f"{metric} by object size")
    return fig


def plot_speed_accuracy(points: Sequence[tuple[str, float, float, float | None]]) -> Figure:
    """APs against inference ms/image (log scale): one (name, ms, APs, APs std or None) per method."""
    import matplotlib.ticker

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    for name, ms, aps, std in points:
        ax.errorbar(ms, 100 * aps if aps >= 0 else np.nan, yerr=None if std is None else 100 * std, marker="o",
                    capsize=3)
        ax.annotate(name, (ms, 100 * aps), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("inference ms/image (batch 1, log scale)")
    ax.set_ylabel("APs (%)")
    ax.set_title("Speed / accuracy on small objects")
    ax.grid(alpha=0.3, which="both")
    return fig


def bench_reports(root: str | os.PathLike | None = None) -> list[Path]:
    """runs/bench-*/bench.md under the project root, newest first."""
    from sodlab.recipes import project_root

    root = Path(root) if root is not None else project_root()
    return sorted((root / "runs").glob("bench-*/bench.md"), key=lambda p: p.stat().st_mtime, reverse=True)


# --------------------------------------------------------------------------------------------
# SR inspection (notebook 04)
# --------------------------------------------------------------------------------------------


def twin_tensor(data_dir: str | os.PathLike, split: str, image_id: int, k: int) -> Tensor | None:
    """The exact xk twin of an embedded-benchmark image as a float [3, kH, kW] tensor in [0, 1];
    None for a dataset without twins or scenes (e.g. COCO)."""
    from sodlab.data.synth import render_twin

    try:
        twin = render_twin(data_dir, split, image_id, k)
    except (FileNotFoundError, KeyError):
        return None
    return torch.from_numpy(np.array(twin)).permute(2, 0, 1).float() / 255.0


def _sr_branch(model):
    """Check that ``model`` is an SR detector (it has G, D and score_proposals)."""
    if not all(hasattr(model, name) for name in ("score_proposals", "reconstruct", "box_coder")):
        raise TypeError(f"{type(model).__name__} is not an SR detector: train an SR method "
                        "(method 'sr' or a variant) to inspect G and D")
    return model


def _class_box(box_coder, deltas: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """Decode per-class deltas [N, 4C] against ``boxes`` [N, 4] and keep each row's ``labels`` box."""
    decoded = box_coder.decode_single(deltas, boxes).reshape(len(boxes), -1, 4)
    return decoded[torch.arange(len(boxes)), labels]


@torch.no_grad()
def score_image(model, image: Tensor) -> dict[str, Tensor]:
    """Every proposal of one image as the SR detector sees it (``SRDetector.score_proposals``).

    Returns, in original-image pixels: "rois" [N, 4], "sr_mask" [N] (went through G and D),
    "answered_by" [N] (the row whose patch D judged for each: itself when sent, the sent one it
    overlaps when it took that one's answers, ``SRConfig.gate_share_iou``; -1 for none),
    "head_probs" / "final_probs" [N, C] (the box head's; after the SR branch replaced or fused
    the small ones) and "head_boxes" [N, 4] (the box head's box at each row's best foreground
    class; the SR branch's box is ``inspect_roi``'s "d_boxes").
    """
    model = _sr_branch(model)
    scored = model.score_proposals([image])
    rois = scored["rois"][0]
    head_probs = scored["head_logits"].softmax(-1)
    final_probs = scored["class_logits"].softmax(-1)
    head_fg = head_probs[:, 1:].argmax(-1) + 1
    return {"rois": rois, "sr_mask": scored["sr_mask"], "answered_by": scored["answered_by"],
            "head_probs": head_probs, "final_probs": final_probs,
            "head_boxes": _class_box(model.box_coder, scored["head_deltas"], rois, head_fg)}


def match_gt(rois: Tensor, candidates: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """For each ground truth box, the candidate roi (``candidates`` bool mask over rois) with the
    highest IoU: (indices into rois [G], IoUs [G]); index -1 and IoU 0 where no candidate overlaps."""
    index = torch.full((len(gt_boxes),), -1, dtype=torch.int64)
    best = torch.zeros(len(gt_boxes))
    chosen = torch.where(candidates)[0]
    if len(gt_boxes) == 0 or len(chosen) == 0:
        return index, best
    iou = box_iou(gt_boxes.float(), rois[chosen].float())  # [G, K]
    best, position = iou.max(dim=1)
    index = torch.where(best > 0, chosen[position], index)
    return index, torch.where(best > 0, best, torch.zeros_like(best))


@torch.no_grad()
def inspect_rois(model, image: Tensor, rois: Tensor, hr_image: Tensor | None = None) -> dict[str, Any]:
    """RoIs of one image through the reconstruction module, as at inference.

    ``rois`` is [N, 4] xyxy in the pixels of ``image`` ([3, H, W] in [0, 1]); ``hr_image`` the
    image's exact xk twin (k = the SR scale), if any. Returns, batched over the RoIs:
    "lr" (z_LR, the patch G gets), "bicubic" (z_LR upsampled bicubically), "sr" (G(z_LR),
    clamped for viewing; for a RoI G does not serve, its native cut, see ``SRConfig.large_rois``),
    "generated" [N] (which RoIs G serves), "hr" (z_HR cut from the twin, or None), "hr_valid" [N]
    (the twin has >= hr_size pixels across the RoI, so z_HR holds real detail, not interpolation);
    "psnr" / "ssim": {"bicubic": [N], "sr": [N]} against z_HR (empty without a twin); D's
    "d_probs" [N, C], "d_real_prob" [N] and "d_boxes" [N, C, 4]: each RoI moved by D's deltas
    t_SR for every class, decoded with the detector's BoxCoder.
    """
    from sodlab.patches import lr_hr_pairs
    from sodlab.sr_quality import psnr, ssim  # the definitions sr_quality.json uses too

    model = _sr_branch(model)
    rois = rois.reshape(-1, 4).float()
    d = model.reconstruct([image], [rois])  # the path inference takes: patches -> G -> D
    lr = d["lr_patch"]
    bicubic = F.interpolate(lr, scale_factor=model.scale, mode="bicubic", align_corners=False).clamp(0, 1)
    sr = d["sr_patch"].clamp(0, 1)
    hr, hr_valid = None, torch.zeros(len(rois), dtype=torch.bool)
    quality = {"psnr": {}, "ssim": {}}
    if hr_image is not None:
        _, hr, hr_valid = lr_hr_pairs([image], [rois], model.lr_size, model.scale, model.context,
                                      hr_images=[hr_image])
        hr = hr.clamp(0, 1)
        for name, patches in (("bicubic", bicubic), ("sr", sr)):
            quality["psnr"][name] = psnr(patches, hr).tolist()
            quality["ssim"][name] = ssim(patches, hr).tolist()
    return {"rois": rois, "lr": lr, "bicubic": bicubic, "sr": sr, "generated": d["generated"], "hr": hr,
            "hr_valid": hr_valid, **quality,
            "d_probs": d["cls"].softmax(-1), "d_real_prob": torch.sigmoid(d["adv"]),
            "d_boxes": model.box_coder.decode_single(d["box"], rois).reshape(len(rois), -1, 4)}


def inspect_roi(model, image: Tensor, roi: Tensor, hr_image: Tensor | None = None) -> dict[str, Any]:
    """``inspect_rois`` for one RoI [4]: the same keys, one RoI each ("roi" [4], "lr" [3, h, w],
    "psnr" {"sr": float, ...}, "d_probs" [C], "d_boxes" [C, 4], "hr_valid" bool, ...)."""
    views = inspect_rois(model, image, roi.reshape(1, 4), hr_image)
    return {"roi": views["rois"][0], "lr": views["lr"][0], "bicubic": views["bicubic"][0], "sr": views["sr"][0],
            "generated": bool(views["generated"][0]),
            "hr": None if views["hr"] is None else views["hr"][0], "hr_valid": bool(views["hr_valid"][0]),
            "psnr": {k: v[0] for k, v in views["psnr"].items()}, "ssim": {k: v[0] for k, v in views["ssim"].items()},
            "d_probs": views["d_probs"][0], "d_real_prob": float(views["d_real_prob"][0]),
            "d_boxes": views["d_boxes"][0]}


def _load_sample(dataset, image_id: int) -> tuple[Tensor, dict]:
    index = dataset.ids.index(image_id)
    image, target = dataset[index]
    return image.as_subclass(Tensor), {k: v.as_subclass(Tensor) if torch.is_tensor(v) else v
                                       for k, v in target.items()}


def small_gt(target: Mapping[str, Tensor], area_threshold: float = SIZE_BOUNDS[0] ** 2) -> Tensor:
    """Indices of the target's small objects (annotated area <= area_threshold)."""
    return torch.where(target["area"] <= area_threshold)[0]


@torch.no_grad()
def decision_changes(model, dataset, image_ids: Sequence[int] | None = None, iou_threshold: float = 0.5) -> list[dict]:
    """Small ground truth objects whose class decision the SR branch changed.

    For every small ground truth object the proposal with D's answers (one that went through G
    and D, or took the answers of a sent one it overlaps: ``SRConfig.gate_share_iou``) with the
    highest IoU stands for it, if that IoU is >= ``iou_threshold``. Its decision is the argmax
    class (background included) of the box head ("head") and of the final scores, where D's
    class scores replaced or were fused with the head's ("sr"). Returns one record per object
    where the two differ: {"image_id", "gt_index", "gt_label", "roi", "iou", "head_label",
    "head_score", "sr_label", "sr_score", "kind", "shared", "sent_roi", "lr", "sr_patch"}, with
    kind "fixed" (head wrong, SR right: a miss fixed), "broken" (head right, SR wrong: a new
    error) or "changed" (both wrong). "sent_roi" is the proposal whose patch D judged ("roi"
    itself unless "shared"), and "lr" and "sr_patch" are that patch's z_LR and G(z_LR).
    """
    model = _sr_branch(model)
    changes = []
    for image_id in (image_ids if image_ids is not None else dataset.ids):
        image, target = _load_sample(dataset, image_id)
        small = small_gt(target, model.area_threshold)
        if len(small) == 0:
            continue
        scored = score_image(model, image)
        answered_by = scored["answered_by"]
        index, iou = match_gt(scored["rois"], answered_by >= 0, target["boxes"][small])
        found = []
        for gt_index, roi_index, overlap in zip(small.tolist(), index.tolist(), iou.tolist()):
            if roi_index < 0 or overlap < iou_threshold:
                continue
            gt_label = int(target["labels"][gt_index])
            head_score, head_label = scored["head_probs"][roi_index].max(-1)
            sr_score, sr_label = scored["final_probs"][roi_index].max(-1)
            head_label, sr_label = int(head_label), int(sr_label)
            if head_label == sr_label:
                continue
            kind = "fixed" if sr_label == gt_label else "broken" if head_label == gt_label else "changed"
            sent = int(answered_by[roi_index])
            found.append({"image_id": int(image_id), "gt_index": gt_index, "gt_label": gt_label,
                          "roi": scored["rois"][roi_index], "iou": overlap, "head_label": head_label,
                          "head_score": float(head_score), "sr_label": sr_label, "sr_score": float(sr_score),
                          "kind": kind, "shared": sent != roi_index, "sent_roi": scored["rois"][sent]})
        if found:
            views = inspect_rois(model, image, torch.stack([c["sent_roi"] for c in found]))
            for c, lr, sr in zip(found, views["lr"], views["sr"]):
                changes.append({**c, "lr": lr, "sr_patch": sr})
    return changes


def _to_hwc(patch: Tensor) -> np.ndarray:
    return patch.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def plot_decision_gallery(changes: Sequence[Mapping], class_names: Sequence[str], kind: str = "fixed",
                          max_items: int = 8) -> Figure:
    """The RoIs of one ``kind`` ("fixed", "broken" or "changed"): z_LR above G(z_LR), titled with
    the ground truth and both decisions (most confident SR decision first). "(shared)" marks a
    proposal that took a sent one's answers; its patches are the sent one's, which D judged."""
    items = sorted((c for c in changes if c["kind"] == kind), key=lambda c: -c["sr_score"])[:max_items]
    titles = {"fixed": "misses fixed by SR (box head wrong, SR right)",
              "broken": "new errors (box head right, SR wrong)", "changed": "changed, both wrong"}
    ncols = max(1, len(items))
    fig = Figure(figsize=(max(2.0 * ncols, 6.0), 4.6), layout="constrained")
    fig.suptitle(f"{titles.get(kind, kind)}: {sum(c['kind'] == kind for c in changes)} RoIs")
    if not items:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"no small object in this set had its decision {kind} by SR", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(2, ncols, squeeze=False)
    for col, change in enumerate(items):
        axes[0, col].imshow(_to_hwc(change["lr"]), interpolation="nearest")
        axes[0, col].set_title(f"img {change['image_id']}\ngt {class_names[change['gt_label']]}", fontsize=8)
        axes[1, col].imshow(_to_hwc(change["sr_patch"]), interpolation="nearest")
        shared = " (shared)" if change["shared"] else ""
        axes[1, col].set_title(f"head {class_name(class_names, change['head_label'])} {change['head_score']:.2f}\n"
                               f"SR {class_name(class_names, change['sr_label'])} {change['sr_score']:.2f}{shared}",
                               fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("z_LR")
    axes[1, 0].set_ylabel("G(z_LR)")
    return fig


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _patch_panel(ax, patch: Tensor | None, title: str) -> None:
    if patch is None:
        ax.text(0.5, 0.5, "no HR twin\n(not an embedded-benchmark image)", ha="center", va="center", fontsize=9)
    else:
        ax.imshow(_to_hwc(patch), interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_roi_view(view: Mapping[str, Any], image: Tensor, class_names: Sequence[str], gt_box: Tensor | None = None,
                  gt_label: int | None = None, head_probs: Tensor | None = None, head_box: Tensor | None = None,
                  title: str = "") -> Figure:
    """The figure of one RoI (``inspect_roi``'s view): the four patches with PSNR/SSIM against
    z_HR; the RoI in its image with the ground truth, the proposal, D's box and the head's box;
    D's class probabilities next to the box head's."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    grid = fig.add_gridspec(2, 4, height_ratios=(1, 1.15))
    lr_side = view["lr"].shape[-1]
    hr_side = view["sr"].shape[-1]

    def quality(name):
        if name not in view["psnr"]:
            return ""
        return f"\nPSNR {view['psnr'][name]:.1f} dB, SSIM {view['ssim'][name]:.3f}"

    hr_note = "" if view["hr"] is None or view["hr_valid"] else "\n(interpolated: RoI < hr_size/k px)"
    _patch_panel(fig.add_subplot(grid[0, 0]), view["lr"], f"z_LR ({lr_side}x{lr_side})")
    _patch_panel(fig.add_subplot(grid[0, 1]), view["bicubic"], f"bicubic x{hr_side // lr_side}" + quality("bicubic"))
    judged = "G(z_LR)" if view["generated"] else "native cut (G skipped)"
    _patch_panel(fig.add_subplot(grid[0, 2]), view["sr"], judged + quality("sr"))
    _patch_panel(fig.add_subplot(grid[0, 3]), view["hr"], f"z_HR, the exact twin ({hr_side}x{hr_side})" + hr_note)

    # The RoI in context: a window 3x the RoI (at least 24 px) around it, in image pixels.
    ax = fig.add_subplot(grid[1, :2])
    height, width = image.shape[-2:]
    roi = view["roi"].tolist()
    side = max(24.0, 3 * max(roi[2] - roi[0], roi[3] - roi[1]))
    x0, y0, x1, y1 = _crop_window(roi, side, width, height)
    ax.imshow(_to_hwc(image[:, y0:y1, x0:x1]), interpolation="nearest", extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5))
    d_probs = view["d_probs"]
    d_label = int(d_probs[1:].argmax()) + 1
    # Only the ground truth (below its box) and D's box (above) are labelled: four labels on a
    # small object would cover it; the title names the colours.
    if gt_box is not None:
        draw_box(ax, gt_box.tolist(), "#3cb44b", f"GT {class_names[gt_label]}" if gt_label is not None else "GT",
                 lw=2, label_at="bottom")
    draw_box(ax, roi, "yellow", None, ls="--")
    draw_box(ax, view["d_boxes"][d_label].tolist(), "#e6194b", f"D: {class_names[d_label]}", lw=2)
    if head_box is not None:
        draw_box(ax, head_box.tolist(), "#42d4f4", None, ls=":", lw=2)
    ax.set_xlim(x0 - 0.5, x1 - 0.5)
    ax.set_ylim(y1 - 0.5, y0 - 0.5)
    ax.set_title("ground truth (green), proposal (yellow, dashed), D's box from t_SR (red),\n"
                 "box head's box (cyan, dotted), each at its best object class", fontsize=9)

    ax = fig.add_subplot(grid[1, 2:])
    x = np.arange(len(class_names))
    width_bar = 0.4 if head_probs is not None else 0.8
    ax.bar(x - (width_bar / 2 if head_probs is not None else 0), d_probs.numpy(), width_bar, color="#e6194b",
           label=f"D_cls({judged}); D real prob {view['d_real_prob']:.2f}")
    if head_probs is not None:
        ax.bar(x + width_bar / 2, head_probs.numpy(), width_bar, color="#42d4f4", label="box head")
    ax.set_xticks(x, [("bg" if n == BACKGROUND else n) for n in class_names], rotation=35, ha="right", fontsize=8)
    if gt_label is not None:
        ax.get_xticklabels()[gt_label].set_fontweight("bold")
        ax.get_xticklabels()[gt_label].set_color("#3cb44b")
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("class probabilities (ground truth class in green)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def class_name(class_names: Sequence[str], label: int) -> str:
    """A label's name for display, "background" for label 0."""
    return "background" if class_names[label] == BACKGROUND else class_names[label]


class SRInspector:
    """ipywidgets front end of ``inspect_roi``: pick an image and one of its small objects.

    Widgets: ``image_dropdown`` (images with small ground truth), ``roi_slider`` (the image's
    small objects, best covered by a small proposal first), ``info`` (HTML: the proposal
    standing for the object, its IoU, both decisions, PSNR/SSIM) and ``output`` (the figure as
    PNG). Changing either widget calls ``update()``, which recomputes ``state`` and ``figure``
    and re-renders ``output``; tests drive the widgets by setting their values. Display the
    inspector (or ``.widget``).

    The RoI shown for an object is the small proposal (one that went through G and D) with the
    highest IoU with it; when no small proposal overlaps it, the ground truth box itself is used.
    """

    def __init__(self, model, dataset, data_dir: str | os.PathLike | None = None, split: str = "val",
                 image_ids: Sequence[int] | None = None, max_images: int = 50, dpi: int = 80):
        import ipywidgets as widgets

        self.model = _sr_branch(model)
        self.dataset = dataset
        self.data_dir = Path(data_dir) if data_dir is not None else Path(dataset.image_dir).parent
        self.split = split
        self.class_names = list(dataset.class_names)
        self.dpi = dpi
        self._samples: dict[int, dict] = {}
        self.figure: Figure | None = None
        self.state: dict[str, Any] = {}
        _, anns, _, _ = _split_records(self.data_dir, split)
        options = []
        for image_id in (image_ids if image_ids is not None else dataset.ids):
            n_small = sum(_annotation_area(a) <= model.area_threshold for a in anns[image_id]
                          if not a.get("iscrowd", 0))
            if n_small:
                options.append((f"{dataset.images[image_id]['file_name']} ({n_small} small)", int(image_id)))
            if len(options) >= max_images:
                break
        if not options:
            raise ValueError(f"{dataset.ann_file}: no image with small objects to inspect")
        self.image_dropdown = widgets.Dropdown(options=options, value=options[0][1], description="image")
        self.roi_slider = widgets.IntSlider(value=0, min=0, max=0, description="small object",
                                            continuous_update=False)
        self.info = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.image_dropdown, self.roi_slider]), self.info, self.output])
        self._set_slider_range()
        self.image_dropdown.observe(self._on_image, names="value")
        self.roi_slider.observe(self._on_roi, names="value")
        self.update()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def sample(self, image_id: int) -> dict[str, Any]:
        """Everything about one image the views need, computed once: "image", "target", the
        proposals' scores ("scored", see ``score_image``), the twin "hr" and its small objects
        in slider order: "order" (indices into the target), "roi_index" (the small proposal
        standing for each, -1 for none) and "iou"."""
        if image_id not in self._samples:
            image, target = _load_sample(self.dataset, image_id)
            scored = score_image(self.model, image)
            small = small_gt(target, self.model.area_threshold)
            roi_index, iou = match_gt(scored["rois"], scored["sr_mask"], target["boxes"][small])
            # Best covered first (then largest): the first view is an object the SR branch really
            # served, not one no small proposal reached.
            keys = sorted(range(len(small)), key=lambda i: (-float(iou[i]), -float(target["area"][small[i]])))
            self._samples[image_id] = {
                "image": image, "target": target, "scored": scored,
                "hr": twin_tensor(self.data_dir, self.split, image_id, self.model.scale),
                "order": small[keys], "roi_index": roi_index[keys], "iou": iou[keys]}
        return self._samples[image_id]

    # -- callbacks ---------------------------------------------------------------------------
    def _set_slider_range(self) -> None:
        count = len(self.sample(self.image_dropdown.value)["order"])
        self.roi_slider.value = 0  # first, so the new max never clamps a stale value
        self.roi_slider.max = max(0, count - 1)

    def _on_image(self, change) -> None:
        # Resetting the slider must not redraw the new image once per trait: update() runs once, after.
        self.roi_slider.unobserve(self._on_roi, names="value")
        try:
            self._set_slider_range()
        finally:
            self.roi_slider.observe(self._on_roi, names="value")
        self.update()

    def _on_roi(self, change) -> None:
        self.update()

    def update(self) -> None:
        """Recompute the view of the selected image and small object; redraw ``output``."""
        image_id, position = int(self.image_dropdown.value), int(self.roi_slider.value)
        sample = self.sample(image_id)
        target, scored = sample["target"], sample["scored"]
        gt_index, roi_index = int(sample["order"][position]), int(sample["roi_index"][position])
        gt_box, gt_label = target["boxes"][gt_index], int(target["labels"][gt_index])
        roi = scored["rois"][roi_index] if roi_index >= 0 else gt_box
        view = inspect_roi(self.model, sample["image"], roi, sample["hr"])
        head_probs = scored["head_probs"][roi_index] if roi_index >= 0 else None
        head_box = scored["head_boxes"][roi_index] if roi_index >= 0 else None
        d_label = int(view["d_probs"].argmax())
        self.state = {"image_id": image_id, "gt_index": gt_index, "gt_label": gt_label,
                      "gt_area": float(target["area"][gt_index]), "roi_index": roi_index, "roi": roi,
                      "iou": float(sample["iou"][position]), "d_label": d_label,
                      "d_score": float(view["d_probs"][d_label]),
                      "head_label": int(head_probs.argmax()) if head_probs is not None else None,
                      "psnr": dict(view["psnr"]), "ssim": dict(view["ssim"]), "view": view}
        name = functools.partial(class_name, self.class_names)
        self.figure = plot_roi_view(
            view, sample["image"], self.class_names, gt_box, gt_label, head_probs, head_box,
            title=f"{self.dataset.images[image_id]['file_name']}: small object {position + 1} of "
                  f"{len(sample['order'])}, a {name(gt_label)} of {self.state['gt_area']:.0f} px^2")
        source = (f"small proposal #{roi_index} (IoU {self.state['iou']:.2f} with the object)" if roi_index >= 0
                  else "no small proposal overlaps it: the ground truth box itself")
        head = f"box head says <b>{name(self.state['head_label'])}</b>, " if head_probs is not None else ""
        quality = "".join(f"; {kind}: PSNR {view['psnr'][kind]:.1f} dB, SSIM {view['ssim'][kind]:.3f}"
                          for kind in view["psnr"])
        self.info.value = (f"RoI: {source}. {head}D says <b>{name(d_label)}</b> ({self.state['d_score']:.2f})"
                           f"{quality}")
        png = base64.b64encode(figure_png(self.figure, self.dpi)).decode()
        # Setting the outputs directly (rather than display() inside `with output`) works the same
        # from a kernel, a frontend callback or a test without a kernel.
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png, "text/plain": f"<SRInspector figure: image {image_id}>"}},)


# --------------------------------------------------------------------------------------------
# FiftyOne (notebook 05)
# --------------------------------------------------------------------------------------------


def saved_view_counts(dataset) -> dict[str, int]:
    """{saved view name: number of samples} of a FiftyOne dataset (e.g. sodlab.explore's)."""
    return {name: len(dataset.load_saved_view(name)) for name in dataset.list_saved_views()}


def launch_requested() -> bool:
    """Launch the FiftyOne App only when asked (SODLAB_LAUNCH_APP=1) and never under CI."""
    return os.environ.get("SODLAB_LAUNCH_APP") == "1" and not os.environ.get("CI")


# --------------------------------------------------------------------------------------------
# Error analysis (notebook 03 and the bench report): TIDE's dAP per error type, by size
# --------------------------------------------------------------------------------------------

# The same colour for an error type in every figure.
ERROR_COLOURS = {"Cls": "#e6194b", "Loc": "#f58231", "Both": "#911eb4", "Dupe": "#42d4f4", "Bkg": "#4363d8",
                 "Miss": "#808080"}
ERROR_PLOT_BINS = ("small", "<8", "8-16", "16-32")


def plot_error_bars(rows: Sequence[tuple[str, Mapping]], bins: Sequence[str] = ERROR_PLOT_BINS) -> Figure:
    """TIDE's dAP (AP50 points gained by fixing every error of a type) stacked per method, one
    panel per size bin of eval.json's "errors" (COCO's small, then the fine bins under 32 px).
    dAPs do not add up to 100 - AP50 (each is measured alone), so a stack is a profile, not a sum.
    A method without ground truth in a bin (dAP -1) or without "errors" gets no bar there."""
    fig = Figure(figsize=(3.2 * len(bins) + 1.2, 3.8), layout="constrained")
    axes = fig.subplots(1, len(bins), sharey=True, squeeze=False)[0]
    x = np.arange(len(rows))
    for ax, size_bin in zip(axes, bins):
        bottom = np.zeros(len(rows))
        results = [stats.get("errors", {}).get("bins", {}).get(size_bin, {}) for _, stats in rows]
        for kind in ERROR_TYPES:
            values = np.array([r.get("dAP", {}).get(kind, -1.0) for r in results], dtype=np.float64)
            values = np.where(values < 0, 0.0, 100 * values)
            ax.bar(x, values, bottom=bottom, color=ERROR_COLOURS[kind], label=kind, width=0.7)
            bottom += values
        num_gt = next((r["num_gt"] for r in results if "num_gt" in r), "?")
        ax.set_title(f"{'small, <32' if size_bin == 'small' else size_bin} px (n={num_gt})")
        ax.set_xticks(x, [name for name, _ in rows], rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("dAP [AP50 points]")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="error")
    fig.suptitle("TIDE errors by object size (IoU 0.5 / 0.1)")
    return fig


def loc_comparison(rows: Sequence[tuple[str, Mapping]], methods: Sequence[str] = ("sr", "sr-cls-only", "baseline"),
                   size_bin: str = "small") -> str:
    """The paper's claim in one line: Loc dAP (AP50 points lost to box errors) of ``methods`` on
    small objects, e.g. "Loc dAP, small objects: sr 2.1 | sr-cls-only 4.0 | baseline 4.2"."""
    found = dict(rows)
    cells = [f"{m} {100 * found[m]['errors']['bins'][size_bin]['dAP']['Loc']:.1f}" for m in methods
             if "errors" in found.get(m, {})]
    return f"Loc dAP, {size_bin} objects: " + (" | ".join(cells) if cells else "no evaluated run")

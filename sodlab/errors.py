"""TIDE's error decomposition (Bolya et al., ECCV 2020) by object size: which mistakes cost AP.

COCO's AP says how much a detector loses, not why. TIDE sorts every false positive and every
missed object into one of six kinds and reports, per kind, dAP = AP after fixing every error of
that kind minus AP. At TIDE's thresholds, foreground IoU t_f = 0.5 and background IoU t_b = 0.1,
a detection that matches no ground truth is, checked in this order:

    Loc   its highest IoU with ground truth of its class lies in [t_b, t_f]: right class, box off;
    Cls   IoU >= t_f with ground truth of another class: right box, wrong class;
    Dupe  IoU >= t_f with ground truth of its class that a higher-scoring detection matched;
    Bkg   IoU <= t_b with every ground truth: it fired on background;
    Both  anything else (wrong class and box off);

and ground truth that no detection matched and no Cls or Loc error would recover is Miss.
Fixing (the paper's oracles): a Cls or Loc error becomes a true positive (in the class of its
ground truth) when that ground truth is unmatched and the error is the highest-scoring Cls or
Loc error on it; otherwise, and for Dupe, Bkg and Both, the detection is removed. A fixed Miss
leaves the ground-truth count, recall's denominator. Each kind is fixed alone, from the
original detections (TIDE's main errors, not its progressive mode).

Why not the ``tidecv`` package (1.0.1, the authors' code). It runs on numpy 2.4 and types the
six hand-built cases of tests/test_errors.py as this module does, but:
  * it cannot evaluate a size bin. ``TIDE.add_qualifiers`` raises NotImplementedError, and
    ``fix_main_errors(qual=...)`` fixes only the errors of small objects while AP stays the AP of
    all objects. Emulating COCO's area range (ground truth outside the bin as ignore regions,
    detections filtered to the bin by their own area) differs from pycocotools: a 30 px car
    boxed at 33 px (IoU 0.83) is a small-range TP for COCOeval and a miss for the emulation
    (AP50 1.0 against 0.505); a 30 px box inside a 60 px car (IoU 0.25) is a small FP for
    COCOeval and ignored by the emulation (0.5 against 1.0);
  * its AP counts a class without ground truth (only false positives) as AP 0, where COCO
    leaves it out, so its AP is not eval.json's AP50 (the Cls case: 25.3 against 50.5), and
    fixing Miss where every object was missed divides by zero;
  * it needs opencv, seaborn and pandas.
So this module implements TIDE's definitions on pycocotools' matching, with these choices:
  * Matching is COCOeval's (one run at IoU t_f, the bins as area ranges, maxDets 100), so a
    bin's AP50 is eval.json's for that range and the bin treats objects as COCO's area ranges
    do: ground truth outside the bin is ignored (a detection matched to it is no error), and a
    detection outside the bin that matches nothing is ignored, except that it may still be the
    Cls or Loc error that recovers an unmatched object of the bin (tidecv 1.0.1 lets ignored
    detections fix errors; for tiny objects this matters: a 9 px box on a 6 px object, IoU
    0.44, lies outside the <8 px bin, and without it that object would count as Miss). Crowd
    regions are COCO's: a detection on one is matched and ignored.
  * A detection's kind is decided against every non-crowd ground truth of its image, in the bin
    or not: a small box half on a medium car is a Loc error of the small bin, not background;
    fixing it removes it (the car is not the bin's to recover).
  * AP is COCO's: 101-point interpolated, per class, averaged over classes with ground truth in
    the bin; -1 (and dAP -1) for a bin without ground truth. dAP is not clipped at 0 (tidecv
    clips); no fix can lower AP, so a negative value would be a bug. When fixing Miss removes
    every ground truth of the bin, AP after fixing is taken as 1: nothing is left to find.

Detections are identified by their annotation id in the COCO results object: ``COCO.loadRes``
numbers the results 1, 2, ... in list order, so results[i] has id i + 1.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
FG_IOU = 0.5  # TIDE's foreground threshold: a match
BG_IOU = 0.1  # TIDE's background threshold: at most this overlap with everything is background
_RECOVERING = ("Cls", "Loc")  # the kinds whose fix turns the detection into a true positive
_REMOVED_BY_FIX = ("Both", "Dupe", "Bkg")


@dataclass(frozen=True)
class BinErrors:
    """TIDE's analysis of one size bin.

    ap: AP at IoU t_f (fraction; -1 without ground truth). dap: {kind: AP after fixing that kind
    - ap}. counts: {kind: errors} (detections for Cls..Bkg, ground truth for Miss). detections:
    {detection id: "tp" or its kind} for every detection the bin counts. ground_truth:
    {annotation id: "tp", "Miss", or the kind ("Cls"/"Loc") of the error that would recover it}
    for every non-crowd ground truth in the bin.
    """

    ap: float
    num_gt: int
    dap: dict[str, float]
    counts: dict[str, int]
    detections: dict[int, str]
    ground_truth: dict[int, str]

    def summary(self) -> dict:
        """The json-ready part: AP50, num_gt, tp, dAP and counts per kind."""
        tp = sum(outcome == "tp" for outcome in self.ground_truth.values())
        return {"AP50": self.ap, "num_gt": self.num_gt, "tp": tp, "dAP": dict(self.dap),
                "counts": dict(self.counts)}


def analyze(coco_gt: COCO, coco_dt: COCO, area_ranges: Mapping[str, Iterable[float]],
            image_ids: Iterable[int] | None = None, fg_iou: float = FG_IOU, bg_iou: float = BG_IOU,
            max_dets: int = 100) -> dict[str, BinErrors]:
    """TIDE's errors of ``coco_dt`` against ``coco_gt`` per area range {label: [lo, hi]} (COCOeval's
    closed ranges of ``area``); ``image_ids`` restricts to those images, as in evaluate.coco_eval."""
    if not 0 <= bg_iou < fg_iou <= 1:
        raise ValueError(f"need 0 <= background IoU < foreground IoU <= 1, got {bg_iou} and {fg_iou}")
    labels = list(area_ranges)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    params = evaluator.params
    if image_ids is not None:
        params.imgIds = sorted(set(image_ids))
    params.areaRng = [[float(v) for v in area_ranges[label]] for label in labels]
    params.areaRngLbl = labels
    params.iouThrs = np.array([fg_iou])
    params.maxDets = [max_dets]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()

    # evalImgs is ordered category x area range x image; keep each image's entries per range.
    num_areas, num_images = len(labels), len(params.imgIds)
    entries = [[[] for _ in range(num_images)] for _ in range(num_areas)]
    for k, entry in enumerate(evaluator.evalImgs):
        if entry is not None:
            entries[(k // num_images) % num_areas][k % num_images].append(entry)
    scenes = [_Scene(coco_gt, coco_dt, image_id, entries[0][i], params.catIds)
              for i, image_id in enumerate(params.imgIds)]
    return {label: _analyze_bin([_BinState(scene, entries[a][i]) for i, scene in enumerate(scenes)],
                                fg_iou, bg_iou, params.recThrs)
            for a, label in enumerate(labels)}


def error_summary(coco_gt: COCO, coco_dt: COCO, area_ranges: Mapping[str, Iterable[float]],
                  image_ids: Iterable[int] | None = None, fg_iou: float = FG_IOU,
                  bg_iou: float = BG_IOU) -> dict:
    """eval.json's "errors": {"fg_iou", "bg_iou", "bins": {label: BinErrors.summary()}}."""
    bins = analyze(coco_gt, coco_dt, area_ranges, image_ids, fg_iou, bg_iou)
    return {"fg_iou": fg_iou, "bg_iou": bg_iou,
            "bins": {label: result.summary() for label, result in bins.items()}}


# --- one image ----------------------------------------------------------------------------------

class _Scene:
    """An image's non-crowd ground truth and evaluated detections, and their IoUs (all classes)."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, image_id: int, entries: list[dict], cat_ids):
        cats = set(cat_ids)
        self.gt = [a for a in coco_gt.imgToAnns.get(image_id, [])
                   if not a.get("iscrowd", 0) and a["category_id"] in cats]
        # The detections COCOeval evaluated (top max_dets per class), by descending score. Any
        # range's entries list them all: truncation does not depend on the range.
        det_ids = [d for entry in entries for d in entry["dtIds"]]
        self.dt = sorted((coco_dt.anns[d] for d in det_ids), key=lambda d: (-d["score"], d["id"]))
        self.gt_class = np.array([a["category_id"] for a in self.gt], dtype=np.int64)
        self.dt_class = np.array([d["category_id"] for d in self.dt], dtype=np.int64)
        if self.gt and self.dt:
            self.iou = np.asarray(mask_utils.iou([d["bbox"] for d in self.dt], [a["bbox"] for a in self.gt],
                                                 [0] * len(self.gt)), dtype=np.float64)
        else:
            self.iou = np.zeros((len(self.dt), len(self.gt)))


class _BinState:
    """COCOeval's outcome for one image in one area range, aligned with the scene's lists."""

    def __init__(self, scene: _Scene, entries: list[dict]):
        self.scene = scene
        gt_ignore, gt_used, dt_matched, dt_ignore, rank = {}, {}, {}, {}, {}
        for entry in entries:
            for g, ignore, match in zip(entry["gtIds"], entry["gtIgnore"], entry["gtMatches"][0]):
                gt_ignore[g], gt_used[g] = bool(ignore), match > 0
            for r, (d, match, ignore) in enumerate(zip(entry["dtIds"], entry["dtMatches"][0],
                                                       entry["dtIgnore"][0])):
                dt_matched[d], dt_ignore[d], rank[d] = match > 0, bool(ignore), r
        self.gt_in_bin = np.array([not gt_ignore[a["id"]] for a in scene.gt], dtype=bool)
        self.gt_used = np.array([gt_used[a["id"]] for a in scene.gt], dtype=bool)
        self.dt_matched = [dt_matched[d["id"]] for d in scene.dt]
        self.dt_ignored = [dt_ignore[d["id"]] for d in scene.dt]
        self.dt_rank = [rank[d["id"]] for d in scene.dt]  # position in COCOeval's per-class order


def _kind(state: _BinState, k: int, fg_iou: float, bg_iou: float) -> tuple[str, int]:
    """TIDE's kind of unmatched detection k and the index of the ground truth it concerns (-1)."""
    scene = state.scene
    if not scene.gt:
        return "Bkg", -1
    iou = scene.iou[k]
    same = scene.gt_class == scene.dt_class[k]
    same_iou = np.where(same, iou, 0.0)
    j = int(same_iou.argmax())
    if bg_iou <= same_iou[j] <= fg_iou:
        return "Loc", j
    other_iou = np.where(same, 0.0, iou)
    j = int(other_iou.argmax())
    if other_iou[j] >= fg_iou:
        return "Cls", j
    if np.where(same & state.gt_used, iou, 0.0).max() >= fg_iou:
        return "Dupe", -1
    if iou.max() <= bg_iou:
        return "Bkg", -1
    return "Both", -1


# --- one bin ------------------------------------------------------------------------------------

def _analyze_bin(states: list[_BinState], fg_iou: float, bg_iou: float, rec_thrs: np.ndarray) -> BinErrors:
    # AP records, one per detection the bin's AP sees: class, score, tie-break key, TP, error index.
    records: list[tuple] = []
    errors: list[tuple[str, int, int, int, bool]] = []  # kind, image, detection, target gt, ignored
    detections: dict[int, str] = {}
    ground_truth: dict[int, str] = {}
    num_gt: dict[int, int] = {}
    miss_per_class: dict[int, int] = {}
    recovered_by: dict[tuple[int, int], int] = {}  # (image, gt index) -> error index of its best fix

    for i, state in enumerate(states):
        scene = state.scene
        for k, det in enumerate(scene.dt):  # descending score: the first fix of an object is its best
            key = (i, state.dt_rank[k])
            if state.dt_matched[k]:
                if not state.dt_ignored[k]:  # matched out of the bin or to a crowd region: not the bin's
                    records.append((det["category_id"], det["score"], key, True, -1))
                    detections[det["id"]] = "tp"
                continue
            kind, j = _kind(state, k, fg_iou, bg_iou)
            recovers = kind in _RECOVERING and state.gt_in_bin[j] and not state.gt_used[j]
            if state.dt_ignored[k] and not recovers:
                continue
            e = len(errors)
            errors.append((kind, i, k, j, state.dt_ignored[k]))
            detections[det["id"]] = kind
            if not state.dt_ignored[k]:
                records.append((det["category_id"], det["score"], key, False, e))
            if recovers:
                recovered_by.setdefault((i, j), e)
        for j, ann in enumerate(scene.gt):
            if not state.gt_in_bin[j]:
                continue
            num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
            if state.gt_used[j]:
                ground_truth[ann["id"]] = "tp"
            elif (i, j) in recovered_by:
                ground_truth[ann["id"]] = errors[recovered_by[(i, j)]][0]
            else:
                ground_truth[ann["id"]] = "Miss"
                miss_per_class[ann["category_id"]] = miss_per_class.get(ann["category_id"], 0) + 1

    counts = {kind: sum(e[0] == kind for e in errors) for kind in ERROR_TYPES}
    counts["Miss"] = sum(miss_per_class.values())
    ap = _mean_ap(records, num_gt, rec_thrs)
    dap = {}
    for kind in ERROR_TYPES:
        if ap < 0:
            dap[kind] = -1.0
            continue
        if kind == "Miss":
            fixed_ap = _mean_ap(records, {c: n - miss_per_class.get(c, 0) for c, n in num_gt.items()}, rec_thrs)
            dap[kind] = (1.0 if fixed_ap < 0 else fixed_ap) - ap
            continue
        fixed = [r for r in records if r[4] < 0 or errors[r[4]][0] != kind]
        for (i, j), e in recovered_by.items():
            if errors[e][0] == kind:
                scene = states[i].scene
                k = errors[e][2]
                fixed.append((scene.gt[j]["category_id"], scene.dt[k]["score"], (i, states[i].dt_rank[k]), True, -1))
        dap[kind] = _mean_ap(fixed, num_gt, rec_thrs) - ap
    return BinErrors(ap=ap, num_gt=sum(num_gt.values()), dap=dap, counts=counts, detections=detections,
                     ground_truth=ground_truth)


def _mean_ap(records: list[tuple], num_gt: Mapping[int, int], rec_thrs: np.ndarray) -> float:
    """COCOeval.accumulate's AP at one IoU threshold, averaged over classes with ground truth."""
    by_class: dict[int, list[tuple]] = {}
    for record in records:
        by_class.setdefault(record[0], []).append(record)
    aps = []
    for cat, n in num_gt.items():
        if n <= 0:
            continue
        # COCOeval's order: descending score; ties keep image order, then its per-image order.
        recs = sorted(by_class.get(cat, []), key=lambda r: (-r[1], r[2]))
        tp = np.cumsum([r[3] for r in recs], dtype=np.float64)
        fp = np.cumsum([not r[3] for r in recs], dtype=np.float64)
        recall = tp / n
        precision = tp / (tp + fp + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        q = np.zeros(len(rec_thrs))
        inds = np.searchsorted(recall, rec_thrs, side="left")
        valid = inds < len(precision)
        q[valid] = precision[inds[valid]]
        aps.append(float(q.mean()))
    return float(np.mean(aps)) if aps else -1.0

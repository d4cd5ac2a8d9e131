"""Tiny-object metrics beside COCO's: AP at IoU 0.25, AI-TOD's size bins, and NWD-based AP.

IoU punishes a tiny object's box harshly: a 6 px box two pixels off its object has IoU 0.5,
COCO's loosest threshold. The tiny-object benchmarks therefore report more than COCO's numbers:

* AP at IoU 0.25 (TinyPerson, AI-TOD): matching as COCO's, at a looser threshold.
* AI-TOD's bins by object side sqrt(area): very tiny 2-8, tiny 8-16, small 16-32 px. AI-TOD's
  cocoapi closes both ends of each range; here they are half-open like evaluate.py's fine bins
  (an object of exactly 8 px side counts once), and objects under 2 px are in none.
* NWD-based AP: the normalized Wasserstein distance replaces IoU in COCOeval's matching (Wang
  et al., "A Normalized Gaussian Wasserstein Distance for Tiny Object Detection"). A box
  (cx, cy, w, h) is the 2-D Gaussian N([cx, cy], diag(w^2/4, h^2/4)); between two such
  Gaussians the 2-Wasserstein distance is
      W2 = sqrt((cx1 - cx2)^2 + (cy1 - cy2)^2 + ((w1 - w2)^2 + (h1 - h2)^2) / 4)
  and NWD = exp(-W2 / C) with C = 12.8, the constant of AI-TOD's code (mmdet-aitod's
  bbox_overlaps), configurable. NWD is 1 for equal boxes and, unlike IoU, still ranks boxes
  that do not overlap. Thresholds are COCO's (0.5:0.95) plus 0.25. Crowd regions keep COCO's
  IoU-based test, so detections on them are ignored as in COCO's AP.

Everything runs in pycocotools' COCOeval; only the similarity differs (``NWDeval``). Numbers are
fractions, -1 where a range has no ground truth (COCO's convention). maxDets is COCO's 100 per
image (AI-TOD uses 1500 for its crowded aerial images).
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

NWD_CONSTANT = 12.8
# AI-TOD's bins by object side in px, [lo, hi).
AITOD_BINS = {"very tiny": (2, 8), "tiny": (8, 16), "small": (16, 32)}
# IoU (or NWD) thresholds of one run: 0.25, then COCO's ten (0.5:0.95).
THRESHOLDS = np.concatenate([[0.25], np.linspace(0.5, 0.95, 10)])
_MAX_AREA = 1e5**2  # COCO's upper bound for "all"


def side_range(lo: float, hi: float) -> list[float]:
    """COCOeval's closed area range for sides in [lo, hi) px: [lo^2, the float just below hi^2]."""
    upper = _MAX_AREA if math.isinf(hi) else float(np.nextafter(float(hi) ** 2, 0.0))
    return [float(lo) ** 2, upper]


def nwd(boxes1: np.ndarray, boxes2: np.ndarray, constant: float = NWD_CONSTANT) -> np.ndarray:
    """Normalized Wasserstein distance between xywh boxes: [len(boxes1), len(boxes2)] in (0, 1]."""
    if constant <= 0:
        raise ValueError(f"NWD constant must be positive, got {constant}")
    b1 = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b2 = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)[None, :, :]
    centre = (b1[..., :2] + b1[..., 2:] / 2) - (b2[..., :2] + b2[..., 2:] / 2)
    size = b1[..., 2:] - b2[..., 2:]
    w2 = np.sqrt((centre**2).sum(-1) + (size**2).sum(-1) / 4)
    return np.exp(-w2 / constant)


class NWDeval(COCOeval):
    """COCOeval (bbox) whose match score is NWD instead of IoU; everything else is COCOeval's."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, constant: float = NWD_CONSTANT):
        super().__init__(coco_gt, coco_dt, iouType="bbox")
        self.constant = constant

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        scores = super().computeIoU(imgId, catId)
        if len(scores) == 0:  # no ground truth or no detection: pycocotools returns []
            return scores
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        # The rows and columns of COCOeval.computeIoU: detections by descending score (stable),
        # cut at maxDets; ground truth in stored order.
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")[: p.maxDets[-1]]
        crowd = np.array([bool(g["iscrowd"]) for g in gt])
        scores = np.array(scores, dtype=np.float64)
        scores[:, ~crowd] = nwd([dt[i]["bbox"] for i in order], [g["bbox"] for g, c in zip(gt, crowd) if not c],
                                self.constant)
        return scores


def tiny_object_metrics(coco_gt: COCO, coco_dt: COCO, image_ids: Iterable[int] | None = None,
                        nwd_constant: float = NWD_CONSTANT) -> dict:
    """eval.json's "tiny": {"nwd_constant", "ranges": {"all" and each AITOD_BINS label: metrics}}.

    Per range: AP (IoU 0.5:0.95), AP50, AP25, AP_nwd (NWD 0.5:0.95), AP50_nwd, AP25_nwd and
    num_gt (non-crowd ground truth in the range). "all" AP and AP50 equal COCO's AP and AP50.
    """
    ranges = {"all": [0.0, _MAX_AREA], **{label: side_range(*sides) for label, sides in AITOD_BINS.items()}}
    out: dict = {"nwd_constant": nwd_constant, "ranges": {label: {} for label in ranges}}
    for suffix, evaluator in (("", COCOeval(coco_gt, coco_dt, iouType="bbox")),
                              ("_nwd", NWDeval(coco_gt, coco_dt, nwd_constant))):
        params = evaluator.params
        if image_ids is not None:
            params.imgIds = sorted(set(image_ids))
        params.iouThrs = THRESHOLDS.copy()
        params.areaRng = list(ranges.values())
        params.areaRngLbl = list(ranges)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        precision = evaluator.eval["precision"][..., params.maxDets.index(100)]  # [T, R, K, A]
        for a, label in enumerate(ranges):
            metrics = out["ranges"][label]
            metrics["AP" + suffix] = _mean_valid(precision[1:, :, :, a])
            metrics["AP50" + suffix] = _mean_valid(precision[1, :, :, a])
            metrics["AP25" + suffix] = _mean_valid(precision[0, :, :, a])
    images, cats = set(params.imgIds), set(params.catIds)
    areas = np.array([a["area"] for a in coco_gt.dataset["annotations"]
                      if not a.get("iscrowd", 0) and a["image_id"] in images and a["category_id"] in cats])
    for label, (lo, hi) in ranges.items():
        out["ranges"][label]["num_gt"] = int(np.count_nonzero((areas >= lo) & (areas <= hi)))
    return out


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0

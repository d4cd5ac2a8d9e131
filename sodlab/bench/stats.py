"""Paired bootstrap intervals of COCO AP differences over the val images.

The question a bench answers is "does method M beat the baseline on this data?". Both were
evaluated on the same images, so the uncertainty that matters is the image sample's: resample
the val images with replacement (the same resample for both methods of a seed, so the
comparison stays paired), recompute COCO AP and APs for each on every resample, and read the
2.5 and 97.5 percentiles of the difference (Efron's percentile interval).

Recomputing AP does not rerun COCOeval. ``COCOeval.evaluate()`` runs once per method and
yields, per image and category, every detection's score and its match at each IoU threshold;
a resample then only re-weights those: a detection of an image drawn twice counts twice (its
weight is the image's draw count), and so does that image's ground truth. Precision and recall
are the weighted cumulative counts, made monotone and sampled at COCO's 101 recall points, as
``COCOeval.accumulate`` does. With every weight 1 this is COCOeval's own AP (tested). A detection
ignored at every IoU threshold (in APs: an unmatched detection outside the small range) moves
neither count, so it is dropped once; at each threshold only the true positives' precision and
recall are formed (``_weighted_ap`` says why that is exact); and the resamples are scored a few
rows at a time, so that each row's cumulative counts stay in the CPU's cache between the steps
that read them.

COCO's APs rewards a lower score scale for small detections by itself: unmatched detections
outside the small range are ignored there, so when every small detection drops in rank against
the larger ones, APs rises and AP falls, whatever the ranking among small detections (README:
the baseline's own small scores x0.8 give +0.9 APs and -1.0 AP). A method that rescores only
small proposals, as the SR branch does, is therefore also compared with the *score-matched
baseline*: the baseline with its small detections' scores moved onto the method's scale
(``match_small_scores``), which keeps their order and so credits the method only with its ranking.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from sodlab.config import SR_METHODS
from sodlab.evaluate import _load_results, load_coco_gt

AREAS = {"all": 0, "small": 1}  # COCOeval's default areaRng order: all, small, medium, large
IOU_75 = 5  # the index of IoU 0.75 in COCOeval's iouThrs (0.5:0.05:0.95): AP75
SMALL_AREA = 32.0 ** 2  # COCO's small range: box area below 32^2 px


def match_small_scores(results: list[dict], like: list[dict], area_threshold: float = SMALL_AREA) -> list[dict]:
    """``results`` with its small detections' scores (box area < area_threshold) put on the scale of
    ``like``'s small detections; every other detection is unchanged.

    The map is affine in logit space, fitted so that the small logits get ``like``'s mean and
    standard deviation. It is strictly increasing, so the order among small detections stays and
    only their rank against larger detections moves: what COCO's APs rewards by itself.
    """
    def small(d):
        return d["bbox"][2] * d["bbox"][3] < area_threshold

    def logits(dets):
        p = np.clip([d["score"] for d in dets if small(d)], 1e-6, 1 - 1e-6)
        return np.log(p) - np.log1p(-p)

    mine, target = logits(results), logits(like)
    if mine.size == 0 or target.size == 0:
        return [dict(d) for d in results]
    slope = target.std() / mine.std() if mine.std() > 0 else 1.0
    moved = iter(1.0 / (1.0 + np.exp(-(slope * (mine - mine.mean()) + target.mean()))))
    return [{**d, "score": float(next(moved))} if small(d) else dict(d) for d in results]


@dataclass
class Matches:
    """One method's matched detections, per (category, area range): what AP needs, per image."""

    image_ids: list[int]
    # per area label -> per category: (det image index, det score, tp [T, D], fp [T, D], gt count per image)
    blocks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]
    num_thresholds: int
    # weighted_ap's results by (area, threshold, weights): a bench scores the same baseline, HR
    # oracle and sr against every method, each on the same resamples
    scores: dict = field(default_factory=dict, repr=False, compare=False)


def match_detections(ann_file, results: list[dict], image_ids) -> Matches:
    """COCOeval.evaluate() once, kept per image so any image resample can be scored."""
    coco_gt = load_coco_gt(ann_file)
    image_ids = sorted(set(image_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, _load_results(coco_gt, results), iouType="bbox")
        evaluator.params.imgIds = image_ids
        # only the ranges a resample is scored on (AREAS, COCOeval's first two): half the matching
        evaluator.params.areaRng = evaluator.params.areaRng[:len(AREAS)]
        evaluator.params.areaRngLbl = evaluator.params.areaRngLbl[:len(AREAS)]
        evaluator.evaluate()
    p = evaluator.params
    max_det, position = p.maxDets[-1], {image_id: i for i, image_id in enumerate(image_ids)}
    num_t, n_images, n_areas = len(p.iouThrs), len(image_ids), len(p.areaRng)
    blocks: dict[str, list] = {label: [] for label in AREAS}
    for label, a in AREAS.items():
        for k in range(len(p.catIds)):
            images, scores, tps, fps = [], [], [], []
            gt_count = np.zeros(n_images)
            for i in range(n_images):
                e = evaluator.evalImgs[k * n_areas * n_images + a * n_images + i]
                if e is None:
                    continue
                gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
                d_scores = np.asarray(e["dtScores"])[:max_det]
                if d_scores.size == 0:
                    continue
                matched = np.asarray(e["dtMatches"])[:, :max_det] > 0
                ignored = np.asarray(e["dtIgnore"])[:, :max_det].astype(bool)
                images.append(np.full(len(d_scores), position[e["image_id"]]))
                scores.append(d_scores)
                tps.append(matched & ~ignored)
                fps.append(~matched & ~ignored)
            if not images:
                blocks[label].append((np.zeros(0, int), np.zeros(0), np.zeros((num_t, 0), bool),
                                      np.zeros((num_t, 0), bool), gt_count))
                continue
            scores_all = np.concatenate(scores)
            order = np.argsort(-scores_all, kind="mergesort")  # COCOeval's order
            tp, fp = np.concatenate(tps, axis=1)[:, order], np.concatenate(fps, axis=1)[:, order]
            # a detection ignored at every threshold only repeats its predecessor's precision and
            # recall, which changes no precision envelope or recall point: dropped, AP is the same
            counted = (tp | fp).any(axis=0)
            blocks[label].append((np.concatenate(images)[order][counted], scores_all[order][counted],
                                  tp[:, counted], fp[:, counted], gt_count))
    return Matches(image_ids, blocks, num_t)


def weighted_ap(matches: Matches, weights: np.ndarray, area: str = "all", iou_index: int | None = None) -> np.ndarray:
    """AP@[.5:.95] for each row of ``weights`` [B, images] (an image's draw count): [B].

    COCO's definition: per category and IoU threshold, precision made monotone from the right,
    sampled at the 101 recall points (0 past the last recall reached); the mean over thresholds
    and over the categories that have ground truth in the resample. ``iou_index`` scores that
    one threshold instead (``IOU_75``: AP75). Computed once per (area, threshold, weights) and
    kept on ``matches``.
    """
    thresholds = range(matches.num_thresholds) if iou_index is None else (iou_index,)
    weights = np.atleast_2d(weights).astype(np.float64)
    key = (area, iou_index, weights.shape, hashlib.blake2b(weights.tobytes(), digest_size=16).digest())
    if key not in matches.scores:
        matches.scores[key] = _weighted_ap(matches, weights, area, thresholds)
    return matches.scores[key].copy()


def _weighted_ap(matches: Matches, weights: np.ndarray, area: str, thresholds, rows: int = 32) -> np.ndarray:
    rec_thrs = np.linspace(0, 1, 101)
    total, count = np.zeros(len(weights)), np.zeros(len(weights))
    for det_image, _, tp, fp, gt_count in matches.blocks[area]:
        npig = weights @ gt_count  # [B]
        has_gt = npig > 0
        if not has_gt.any():
            continue
        ap = np.zeros(len(weights))
        counted = tp | fp  # [T, D]: not ignored at that threshold
        # ``rows`` resamples at a time, so that their [rows, D] counts stay in cache between steps
        for lo in range(0, len(weights) if det_image.size else 0, rows):
            w = np.ascontiguousarray(weights[lo:lo + rows, det_image])  # [rows, D], row after row
            gts = np.maximum(npig[lo:lo + rows], 1e-12)[:, None]
            queries = torch.from_numpy(np.tile(rec_thrs, (len(w), 1)))
            seen_mask = None
            for t in thresholds:
                if seen_mask is None or not np.array_equal(counted[t], seen_mask):
                    seen_mask, seen = counted[t], np.cumsum(w * counted[t], axis=1)  # tp + fp so far
                # Only the true positives are read: recall rises only at one, so the first
                # detection to reach a recall point is one, and a false positive's precision is
                # below that of the true positive before it, so the envelope's maxima are at true
                # positives too. The sums are of whole numbers, hence COCOeval's to the bit.
                hits = np.flatnonzero(tp[t])
                if hits.size == 0:
                    continue  # precision 0 at every recall point
                tp_sum = np.cumsum(w.take(hits, axis=1), axis=1)  # take: row-major, as indexing is not
                recall = tp_sum / gts
                padded = np.zeros((len(w), hits.size + 1))  # precision, then 0 for a recall never reached
                precision = padded[:, :-1]
                np.divide(tp_sum, seen.take(hits, axis=1) + np.spacing(1), out=precision)  # COCOeval's own guard
                np.maximum.accumulate(precision[:, ::-1], axis=1, out=precision[:, ::-1])
                # COCOeval's np.searchsorted per resample, batched (torch's takes a row per query):
                # the first detection reaching each recall point, or none (precision 0).
                idx = torch.searchsorted(torch.from_numpy(recall), queries, side="left").numpy()
                ap[lo:lo + rows] += np.take_along_axis(padded, idx, axis=1).mean(axis=1) / len(thresholds)
        total += np.where(has_gt, ap, 0.0)
        count += has_gt
    return np.where(count > 0, total / np.maximum(count, 1), -1.0)


def resample_weights(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, images]: how often each image is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(resamples, num_images))
    return np.stack([np.bincount(row, minlength=num_images) for row in draws]).astype(np.float64)


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_differences(method: Matches, baseline: Matches, weights: np.ndarray,
                       oracle: Matches | None = None, score_matched: Matches | None = None) -> dict:
    """Per resample: AP and APs of method minus baseline, the gap closed to the oracle, and AP and
    APs of method minus the score-matched baseline (``match_small_scores``)."""
    if method.image_ids != baseline.image_ids:
        raise ValueError("a paired bootstrap needs both methods evaluated on the same images")
    out = {}
    for name, area in (("AP", "all"), ("APs", "small")):
        mine = weighted_ap(method, weights, area)
        out[name] = mine - weighted_ap(baseline, weights, area)
        if score_matched is not None:
            out[f"{name}_vs_score_matched"] = mine - weighted_ap(score_matched, weights, area)
    if oracle is not None:
        base_s, oracle_s = weighted_ap(baseline, weights, "small"), weighted_ap(oracle, weights, "small")
        denominator = oracle_s - base_s
        with np.errstate(divide="ignore", invalid="ignore"):
            out["gap_closed"] = np.where(denominator > 0, out["APs"] / denominator, np.nan)
    return out


def ablation_differences(full: Matches, variant: Matches, weights: np.ndarray) -> dict:
    """Per resample: the full SR method minus one of its ablated variants, on AP, APs and AP75 of
    small objects (AP75s: where the paper says SR serves box regression, the ``sr-cls-only`` row)."""
    if full.image_ids != variant.image_ids:
        raise ValueError("a paired bootstrap needs both methods evaluated on the same images")
    return {"AP": weighted_ap(full, weights, "all") - weighted_ap(variant, weights, "all"),
            "APs": weighted_ap(full, weights, "small") - weighted_ap(variant, weights, "small"),
            "AP75s": weighted_ap(full, weights, "small", IOU_75) - weighted_ap(variant, weights, "small", IOU_75)}


def summarize_differences(per_seed: list[dict], level: float = 0.95) -> dict:
    """The interval of the mean over seeds of each resample's difference (the resamples are shared
    across seeds), and whether it excludes 0."""
    summary = {}
    for key in per_seed[0]:
        stacked = np.stack([d[key] for d in per_seed])
        # a resample where no seed has a gap to close (oracle not above the baseline) stays NaN
        values = np.full(stacked.shape[1], np.nan)
        some = np.isfinite(stacked).any(axis=0)
        values[some] = np.nanmean(stacked[:, some], axis=0)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        lo, hi = interval(values, level)
        summary[key] = {"low": lo, "high": hi, "significant": bool(lo > 0 or hi < 0), "resamples": int(values.size)}
    return summary


def bench_intervals(records: list[dict], ann_file, image_ids, resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[tuple[str, str], dict]:
    """For every (preset, method) but the baseline: the paired bootstrap interval of its AP and APs
    difference to the baseline of the same seed (averaged over seeds), of the gap it closes to the
    HR oracle, and, for the SR methods, of their AP and APs difference to the score-matched baseline
    (``*_vs_score_matched``, with the seeds' mean ``point``). An ablated SR variant also gets
    ``ablation``: ``sr`` minus the variant on AP, APs and AP75s (``ablation_differences``), each with
    its interval and the seeds' mean ``point``, from the seeds that trained both. Detections are
    read from each record's run directory."""
    import json
    from pathlib import Path

    image_ids = sorted(set(image_ids))
    weights, ones = resample_weights(len(image_ids), resamples, seed), np.ones((1, len(image_ids)))
    results = {(r["preset"], r["method"], r["seed"]): json.loads((Path(r["run_dir"]) / "detections_val.json").read_text())
               for r in records}
    matches = {key: match_detections(ann_file, dets, image_ids) for key, dets in results.items()}
    out = {}
    for preset, method in dict.fromkeys((r["preset"], r["method"]) for r in records):
        if method == "baseline":
            continue
        per_seed, points, ablation, ablation_points = [], [], [], []
        for (p, m, s), match in matches.items():
            if (p, m) != (preset, method):
                continue
            if m in SR_METHODS and m != "sr" and (p, "sr", s) in matches:
                ablation.append(ablation_differences(matches[(p, "sr", s)], match, weights))
                ablation_points.append(ablation_differences(matches[(p, "sr", s)], match, ones))
            if (p, "baseline", s) not in matches:
                continue
            base, matched = matches[(p, "baseline", s)], None
            if m in SR_METHODS:  # they rescore small proposals only: the score-scale control is theirs
                matched = match_detections(ann_file, match_small_scores(results[(p, "baseline", s)],
                                                                        results[(p, m, s)]), image_ids)
                points.append(paired_differences(match, base, ones, score_matched=matched))
            per_seed.append(paired_differences(match, base, weights, matches.get((p, "hr-oracle", s)), matched))
        if per_seed:
            out[(preset, method)] = summary = summarize_differences(per_seed, level)
            for key in ("AP_vs_score_matched", "APs_vs_score_matched"):
                if key in summary:
                    summary[key]["point"] = float(np.mean([point[key][0] for point in points]))
        if ablation:
            out.setdefault((preset, method), {})["ablation"] = summarize_with_points(ablation, ablation_points, level)
    for preset in dict.fromkeys(r["preset"] for r in records):
        sr_records = [r for r in records if (r["preset"], r["method"]) == (preset, "sr")
                      and "bilinear" in (r.get("patch_sources") or {})]
        if sr_records:
            out.setdefault((preset, "sr"), {})["patch_sources"] = patch_source_intervals(
                sr_records, matches, ann_file, image_ids, weights, level)
    return out


def summarize_with_points(per_seed: list[dict], points: list[dict], level: float = 0.95) -> dict:
    """``summarize_differences``, each key with the seeds' mean ``point`` and the number of ``seeds``."""
    summary = summarize_differences(per_seed, level)
    for key, value in summary.items():
        value["point"] = float(np.mean([point[key][0] for point in points]))
        value["seeds"] = len(per_seed)
    return summary


def patch_source_intervals(sr_records: list[dict], matches: dict, ann_file, image_ids, weights: np.ndarray,
                           level: float = 0.95) -> dict:
    """With each seed's `sr` D held fixed (``bench.measure.measure_sr_evaluation``): G's patches minus
    bilinear ones ("generator": what this G adds) and, where the data has twins, the exact twins'
    patches minus bilinear ones ("twin": what a perfect G would add), on AP, APs and AP75s, each
    with its interval over seeds and the seeds' mean point."""
    import json
    from pathlib import Path

    ones = np.ones((1, len(image_ids)))
    per_seed, points = {}, {}
    for record in sr_records:
        sources = {name: match_detections(ann_file, json.loads((Path(entry["dir"]) / "detections_val.json").read_text()),
                                          image_ids)
                   for name, entry in record["patch_sources"].items()}
        compared = {"generator": matches[(record["preset"], "sr", record["seed"])]}
        if "twin" in sources:
            compared["twin"] = sources["twin"]
        for name, match in compared.items():
            per_seed.setdefault(name, []).append(ablation_differences(match, sources["bilinear"], weights))
            points.setdefault(name, []).append(ablation_differences(match, sources["bilinear"], ones))
    return {name: summarize_with_points(per_seed[name], points[name], level) for name in per_seed}

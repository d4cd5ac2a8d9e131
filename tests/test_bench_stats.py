"""The bench's paired bootstrap and its verdict, on hand-built detections."""
import json

import numpy as np
import pytest

from sodlab.bench.report import verdict
from sodlab.bench.stats import (IOU_75, ablation_differences, match_detections, match_small_scores,
                                paired_differences, resample_weights, summarize_differences, weighted_ap)
from sodlab.evaluate import coco_eval


def _write_gt(path, objects: list[tuple[int, list[float]]]):
    """20 images of 100 px, each holding the same objects (category id, xywh box)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(1, 21)]
    anns = [{"id": len(objects) * i + j, "image_id": i, "category_id": category, "bbox": box,
             "area": box[2] * box[3], "iscrowd": 0}
            for i in range(1, 21) for j, (category, box) in enumerate(objects)]
    categories = [{"id": c, "name": "ab"[c - 1]} for c in sorted({c for c, _ in objects})]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


@pytest.fixture
def gt_file(tmp_path):
    """20 images of 100 px, each with one small (10 px) and one medium (50 px) object."""
    return _write_gt(tmp_path / "gt.json", [(1, [5, 5, 10, 10]), (2, [40, 40, 50, 50])])


def _detections(finds_small_in: set[int], shift: float = 0.0) -> list[dict]:
    dets = []
    for i in range(1, 21):
        dets.append({"image_id": i, "category_id": 2, "bbox": [40, 40, 50, 50], "score": 0.9})
        if i in finds_small_in:
            dets.append({"image_id": i, "category_id": 1, "bbox": [5 + shift, 5, 10, 10], "score": 0.5 + i / 100})
        dets.append({"image_id": i, "category_id": 1, "bbox": [70, 5, 10, 10], "score": 0.55})  # a false positive
    return dets


def test_unit_weights_give_cocoevals_own_ap(gt_file):
    dets = _detections(set(range(1, 15)), shift=1.0)
    matches = match_detections(gt_file, dets, range(1, 21))
    stats = coco_eval(gt_file, dets, fine_bins=False)
    ones = np.ones((1, 20))
    assert weighted_ap(matches, ones, "all")[0] == pytest.approx(stats["AP"], abs=1e-9)
    assert weighted_ap(matches, ones, "small")[0] == pytest.approx(stats["APs"], abs=1e-9)


def test_weighted_ap_is_computed_once_per_resample_set_and_never_stale(gt_file):
    """A bench scores its baseline against every method: the same weights hit the kept result;
    other weights, another area or threshold get their own, equal to a fresh computation."""
    dets = _detections(set(range(1, 15)), shift=1.0)
    kept, fresh = (match_detections(gt_file, dets, range(1, 21)) for _ in range(2))
    first, second = resample_weights(20, 50, seed=1), resample_weights(20, 50, seed=2)
    scored = weighted_ap(kept, first, "small")
    scored[:] = -5.0  # a caller's change to its copy does not reach the kept result
    assert np.array_equal(weighted_ap(kept, first, "small"), weighted_ap(fresh, first, "small"))
    assert len(kept.scores) == 1
    for weights, area, iou in ((second, "small", None), (first, "all", None), (first, "small", IOU_75)):
        assert np.array_equal(weighted_ap(kept, weights, area, iou), weighted_ap(fresh, weights, area, iou))
    assert len(kept.scores) == 4 and not np.array_equal(weighted_ap(kept, first, "small"),
                                                        weighted_ap(kept, second, "small"))


def test_ap75_of_small_objects_is_cocoevals(gt_file):
    """One IoU threshold: COCOeval's precision at IoU 0.75, small area, averaged as AP75 is."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = _detections(set(range(1, 15)), shift=1.0) + _detections(set(range(5, 20)), shift=3.0)
    matches = match_detections(gt_file, dets, range(1, 21))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluator.evaluate(), evaluator.accumulate()
    precision = evaluator.eval["precision"][IOU_75, :, :, 1, -1]  # [recall, category] at IoU 0.75, small
    expected = np.mean(precision[precision > -1])
    assert 0 < expected < 1
    assert weighted_ap(matches, np.ones((1, 20)), "small", IOU_75)[0] == pytest.approx(expected, abs=1e-9)


def test_the_ablation_is_the_full_method_minus_the_variant(gt_file):
    """sr - variant: positive where the full method finds more small objects; AP75s drops for a
    variant whose boxes are off by 3 px (IoU about 0.5 on a 10 px object) and not at AP50."""
    full = match_detections(gt_file, _detections(set(range(1, 19))), range(1, 21))
    fewer = match_detections(gt_file, _detections(set(range(1, 5))), range(1, 21))
    loose = match_detections(gt_file, _detections(set(range(1, 19)), shift=2.0), range(1, 21))
    weights = resample_weights(20, 200, seed=5)
    found_more = summarize_differences([ablation_differences(full, fewer, weights)])
    assert found_more["APs"]["low"] > 0 and found_more["APs"]["significant"]
    tighter = ablation_differences(full, loose, np.ones((1, 20)))
    assert tighter["AP75s"][0] > 0.5 and tighter["APs"][0] > 0
    same = ablation_differences(full, full, weights)
    assert all(np.all(v == 0) for v in same.values())


def _scrambled_detections() -> list[dict]:
    """``_detections`` with random scores, plus a medium-sized false positive of the small objects'
    class per image, ranked among them: APs ignores it, AP counts it."""
    rng = np.random.default_rng(3)
    medium = [{"image_id": i, "category_id": 1, "bbox": [30, 30, 40, 40]} for i in range(1, 21)]
    return [{**d, "score": float(rng.uniform(0.05, 0.95))} for d in _detections(set(range(1, 13)), shift=1.5) + medium]


def test_a_resamples_weighted_ap_is_cocoevals_ap_on_the_resampled_images(tmp_path, gt_file):
    """Weights are draw counts: AP with them equals COCOeval on a dataset holding each image as often
    as it was drawn (scores without ties, so COCOeval's order among copies cannot matter)."""
    dets = _scrambled_detections()
    matches = match_detections(gt_file, dets, range(1, 21))
    gt = json.loads(gt_file.read_text())
    for draws in resample_weights(20, 3, seed=4):
        copies = [(image_id, copy) for image_id in range(1, 21) for copy in range(int(draws[image_id - 1]))]
        new_id = {pair: n for n, pair in enumerate(copies, start=1)}
        annotations = [{**a, "image_id": new_id[pair]} for pair in copies
                       for a in gt["annotations"] if a["image_id"] == pair[0]]
        resampled = {**gt, "images": [{**gt["images"][i - 1], "id": new_id[(i, c)]} for i, c in copies],
                     "annotations": [{**a, "id": n} for n, a in enumerate(annotations, start=1)]}  # ids from 1
        (tmp_path / "resampled.json").write_text(json.dumps(resampled))
        resampled_dets = [{**d, "image_id": new_id[(d["image_id"], c)]} for d in dets
                          for c in range(int(draws[d["image_id"] - 1]))]
        stats = coco_eval(tmp_path / "resampled.json", resampled_dets, fine_bins=False)
        assert weighted_ap(matches, draws[None], "all")[0] == pytest.approx(stats["AP"], abs=1e-9)
        assert weighted_ap(matches, draws[None], "small")[0] == pytest.approx(stats["APs"], abs=1e-9)


def test_identical_detections_give_a_zero_width_interval_at_zero(gt_file):
    dets = _detections(set(range(1, 11)))
    a, b = match_detections(gt_file, dets, range(1, 21)), match_detections(gt_file, dets, range(1, 21))
    weights = resample_weights(20, 200, seed=1)
    summary = summarize_differences([paired_differences(a, b, weights)])
    assert summary["APs"]["low"] == summary["APs"]["high"] == 0.0 and not summary["APs"]["significant"]


def test_a_known_improvement_gives_a_positive_significant_interval(gt_file):
    better = match_detections(gt_file, _detections(set(range(1, 19))), range(1, 21))
    worse = match_detections(gt_file, _detections(set(range(1, 5))), range(1, 21))
    weights = resample_weights(20, 300, seed=2)
    up = summarize_differences([paired_differences(better, worse, weights)])
    down = summarize_differences([paired_differences(worse, better, weights)])
    assert 0 < up["APs"]["low"] <= up["APs"]["high"] and up["APs"]["significant"]
    assert down["APs"]["high"] < 0 and down["APs"]["significant"]
    # medium objects are found alike by both: their share of AP moves with APs alone
    assert up["AP"]["low"] > 0


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_score_matching_moves_only_small_scores_and_keeps_their_order():
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, w, w], "score": p}
            for w, p in [(10, 0.9), (20, 0.2), (31, 0.6), (40, 0.7), (5, 0.05)]]
    like = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "score": p} for p in (0.1, 0.3, 0.2, 0.15)]
    moved = match_small_scores(dets, like)
    assert [d["score"] for d in moved][3] == 0.7 and dets[0]["score"] == 0.9  # a 40 px box, and the input, untouched
    small_before = [d["score"] for d in dets if d["bbox"][2] < 32]
    small_after = [d["score"] for d in moved if d["bbox"][2] < 32]
    assert np.argsort(small_before).tolist() == np.argsort(small_after).tolist()
    target = _logit(np.array([d["score"] for d in like]))
    assert _logit(np.array(small_after)).mean() == pytest.approx(target.mean())
    assert _logit(np.array(small_after)).std() == pytest.approx(target.std())


@pytest.fixture
def boundary_gt_file(tmp_path):
    """20 images, each with a small object just under 32 px and a medium one."""
    return _write_gt(tmp_path / "gt.json", [(1, [10, 10, 30, 30]), (1, [50, 50, 40, 40])])


def _boundary_detections(small_logit_shift: float = 0.0) -> list[dict]:
    """A medium hit, a 33 px box on the 30 px object, a small box on it, and a small false positive."""
    def small(p):
        return float(1 / (1 + np.exp(-(_logit(p) + small_logit_shift))))

    dets = []
    for i in range(1, 21):
        dets += [{"image_id": i, "category_id": 1, "bbox": [50, 50, 40, 40], "score": 0.9},
                 {"image_id": i, "category_id": 1, "bbox": [10, 10, 33, 33], "score": 0.6},
                 {"image_id": i, "category_id": 1, "bbox": [12, 12, 30, 30], "score": small(0.7 if i % 2 else 0.3)},
                 {"image_id": i, "category_id": 1, "bbox": [60, 5, 20, 20], "score": small(0.4 + i / 100)}]
    return dets


def test_a_lower_small_score_scale_alone_raises_aps_but_not_against_the_score_matched_baseline(boundary_gt_file):
    baseline, rescaled = _boundary_detections(), _boundary_detections(small_logit_shift=-2.0)
    ids, ones = range(1, 21), np.ones((1, 20))
    base, method = match_detections(boundary_gt_file, baseline, ids), match_detections(boundary_gt_file, rescaled, ids)
    # the artefact: nothing but the small detections' score scale changed, and APs rose
    raw = paired_differences(method, base, ones)
    assert raw["APs"][0] > 0.02
    # against the baseline on the method's small-score scale, the rescale earns nothing
    matched = match_detections(boundary_gt_file, match_small_scores(baseline, rescaled), ids)
    control = paired_differences(method, base, resample_weights(20, 200, seed=3), score_matched=matched)
    assert np.abs(control["APs_vs_score_matched"]).max() < 1e-9
    assert np.abs(control["AP_vs_score_matched"]).max() < 1e-9


def _row(method, aps, ci=None, cost=1.0):
    return {"method": method, "preset": "cpu", "backbone": "ResNet-18-FPN", "eval": {"AP": aps, "APs": aps},
            "vs_baseline": {"infer_ms_per_image": cost},
            "intervals": None if ci is None else {"APs": {"low": ci[0], "high": ci[1],
                                                          "significant": ci[0] > 0 or ci[1] < 0}}}


def test_the_verdict_follows_the_numbers():
    rows = [_row("baseline", 0.20), _row("sr", 0.26, (0.02, 0.09), 1.25), _row("sr-no-adv", 0.21, (-0.01, 0.03)),
            _row("upscale", 0.15, (-0.08, -0.02), 4.0)]
    text = verdict(rows)
    assert "significantly better: `sr` (+6.0 [+2.0, +9.0], 1.25x the latency)" in text
    assert "Within the noise: `sr-no-adv` (+1.0 [-1.0, +3.0]" in text
    assert "Significantly worse: `upscale` (-5.0 [-8.0, -2.0], 4.00x the latency)" in text
    assert "score-matched" not in text and "losing" not in text  # no such interval, no such sentence
    # a method better on APs but worse on larger objects pays for it: more than a point is said
    rows[0]["eval"] |= {"APm": 0.361, "APl": 0.287}
    rows[1]["eval"] |= {"APm": 0.298, "APl": 0.280}
    assert "`sr` (+6.0 [+2.0, +9.0], 1.25x the latency, losing 6.3 APm)" in verdict(rows)
    rows[1]["eval"] |= {"APm": 0.355, "APl": 0.022}
    assert "`sr` (+6.0 [+2.0, +9.0], 1.25x the latency, losing 26.5 APl)" in verdict(rows)
    rows[1]["eval"]["APm"] = 0.350
    assert "1.25x the latency, losing 1.1 APm and 26.5 APl)" in verdict(rows)
    rows[1]["intervals"]["APs_vs_score_matched"] = {"point": 0.004, "low": -0.01, "high": 0.02, "significant": False}
    rows[2]["intervals"]["APs_vs_score_matched"] = {"point": 0.03, "low": 0.01, "high": 0.05, "significant": True}
    text = verdict(rows)
    assert ("APs is significantly higher for `sr-no-adv` (+3.0 [+1.0, +5.0]); within the noise for `sr` "
            "(+0.4 [-1.0, +2.0]).") in text
    rows[1] = _row("sr", 0.26, (-0.01, 0.09))
    assert "no method is significantly better" in verdict(rows)
    assert "HR oracle" not in verdict(rows)
    # an HR oracle at or below the baseline says the detectors have not learned: the verdict says so
    rows.append(_row("hr-oracle", 0.18, (-0.05, 0.01)))
    assert "**The HR oracle is not above the baseline on APs (18.0 against 20.0)**" in verdict(rows)
    rows[-1] = _row("hr-oracle", 0.30, (0.05, 0.15))
    assert "HR oracle is not above" not in verdict(rows)
    # a baseline under the budget's learned AP is called out first; at it, or with no claim, it is not
    rows[0]["eval"]["AP"] = 0.127
    learned = verdict(rows, learned_ap=20.0, budget_name="default")
    assert learned.startswith("**Verdict.** **The baseline reached AP 12.7, under the 20 at which the default budget")
    assert "--iters trains longer.** On APs (points against the baseline's 20.0" in learned
    assert "The baseline reached" not in verdict(rows)
    rows[0]["eval"]["AP"] = 0.20
    assert "The baseline reached" not in verdict(rows, learned_ap=20.0, budget_name="default")
    # what G adds: sr against sr-no-recon, from the ablation's interval
    assert "What G adds" not in verdict(rows)
    rows.append(_row("sr-no-recon", 0.25, (0.01, 0.08)))
    rows[-1]["intervals"]["ablation"] = {"APs": {"point": 0.003, "low": -0.002, "high": 0.008, "significant": False}}
    assert ("**What G adds:** `sr` against `sr-no-recon` (the same branch without G), APs +0.3 [-0.2, +0.8]: "
            "no significant difference.") in verdict(rows)
    rows[-1]["intervals"]["ablation"]["APs"] = {"point": 0.012, "low": 0.01, "high": 0.015, "significant": True}
    assert "APs +1.2 [+1.0, +1.5]: significantly more." in verdict(rows)


def test_errors_and_tiny_metrics_are_averaged_over_seeds():
    from sodlab.bench.report import mean_over_seeds
    from sodlab.evaluate import format_errors_table

    def seed(ap50, loc, count, tiny_ap):
        return {"errors": {"fg_iou": 0.5, "bins": {"small": {"AP50": ap50, "num_gt": 40, "dAP": {"Loc": loc},
                                                             "counts": {"Loc": count}}}},
                "tiny": {"nwd_constant": 12.8, "ranges": {"very tiny": {"AP": tiny_ap}}}}

    seeds = [seed(0.2, 0.04, 3, 0.1), seed(0.4, 0.02, 4, -1.0)]
    errors = mean_over_seeds([s["errors"] for s in seeds])
    small = errors["bins"]["small"]
    assert small["AP50"] == pytest.approx(0.3) and small["dAP"]["Loc"] == pytest.approx(0.03)
    assert small["counts"]["Loc"] == 3.5 and small["num_gt"] == 40 and errors["fg_iou"] == 0.5
    # a bin without ground truth in one seed has no mean
    assert mean_over_seeds([s["tiny"] for s in seeds])["ranges"]["very tiny"]["AP"] == -1.0
    # a key one seed lacks is left out rather than averaged over fewer seeds
    assert "extra" not in mean_over_seeds([{"extra": 1.0, "a": 1}, {"a": 3}])
    table = format_errors_table({"sr": {"errors": errors}})
    assert "| 3.5 |" in table and "| 30.0 |" in table


def test_sharing_saved_is_one_detector_per_sr_variant():
    from sodlab.bench.report import sharing_saved

    def row(method, seconds, shares=False, reused=None):
        return {"method": method, "preset": "cpu", "shares_detector": shares, "cost": {"train_seconds": seconds},
                "budget": {"reused_from": reused}}

    rows = [row("baseline", 600.0), row("upscale", 1800.0), row("sahi", 600.0, reused="baseline"),
            row("sr", 300.0, shares=True), row("sr-no-recon", 120.0, shares=True)]
    (line,) = sharing_saved(rows)
    # two SR variants x the 10-minute detector; SAHI's reused training is not training the bench did
    assert "the 2 SR variants" in line and "(10.0 min of training)" in line
    assert "would cost 20.0 min more per seed" in line
    assert "training, 47.0 min per seed, would be 67.0 min" in line
    assert sharing_saved([r for r in rows if not r["shares_detector"]]) == []


def _quality(bins: dict[str, tuple[float, float, float, float]], method="G") -> dict:
    """An sr_quality.json: per bin (SR PSNR, bicubic PSNR, SR SSIM, bicubic SSIM), 100 RoIs each."""
    return {"method": method, "bins": {label: {"rois": 100, "sr": {"psnr": p, "ssim": s},
                                               "bicubic": {"psnr": pb, "ssim": sb}}
                                       for label, (p, pb, s, sb) in bins.items()}}


def test_reconstruction_is_the_gain_over_bicubic_per_bin_over_seeds():
    from sodlab.bench.report import reconstruction_over_seeds, reconstruction_table

    seeds = [_quality({"<8": (31.0, 29.0, 0.90, 0.88), "8-16": (30.0, 29.5, 0.85, 0.86)}),
             _quality({"<8": (32.0, 29.0, 0.91, 0.88), "8-16": (29.0, 29.5, 0.84, 0.86)})]
    quality = reconstruction_over_seeds(seeds)
    assert quality["bins"]["<8"]["psnr"]["gain"] == pytest.approx(2.5)
    assert quality["bins"]["<8"]["psnr"]["std"] == pytest.approx(np.std([2.0, 3.0], ddof=1))
    assert quality["bins"]["8-16"]["psnr"]["gain"] == pytest.approx(0.0)  # +0.5 and -0.5: a loss is kept
    assert quality["bins"]["8-16"]["ssim"]["gain"] == pytest.approx(-0.015)
    # one seed without it (a bench written before it was measured), or a detector method: no row
    assert reconstruction_over_seeds([seeds[0], None]) is None and reconstruction_over_seeds([None]) is None
    one = reconstruction_over_seeds([seeds[0]])
    assert one["bins"]["<8"]["psnr"] == {"gain": pytest.approx(2.0), "std": None}

    rows = [{"method": "baseline", "backbone": "R18", "sr_quality": None},
            {"method": "sr", "backbone": "R18", "sr_quality": quality},
            {"method": "sr-no-recon", "backbone": "R18",
             "sr_quality": reconstruction_over_seeds([_quality({"<8": (28.0, 29.0, 0.8, 0.88)}, "bilinear")])}]
    table = reconstruction_table(rows).splitlines()
    assert table[0] == ("| Variant | Backbone | patch | PSNR <8 px (dB) | PSNR 8-16 px (dB) | SSIM <8 px | "
                        "SSIM 8-16 px | RoIs per bin |")
    assert table[2] == "| sr | R18 | G | +2.50 ± 0.71 | +0.00 ± 0.71 | +0.025 ± 0.007 | -0.015 ± 0.007 | 100 / 100 |"
    assert table[3] == "| sr-no-recon | R18 | bilinear | -1.00 |  | -0.080 |  | 100 / 0 |"
    assert len(table) == 4 and reconstruction_table(rows[:1]) == ""


def test_the_verdict_gives_gs_gain_over_bicubic_beside_what_g_adds():
    from sodlab.bench.report import reconstruction_over_seeds

    rows = [_row("baseline", 0.20), _row("sr", 0.26, (0.02, 0.09))]
    assert "G against bicubic" not in verdict(rows)  # not measured: nothing claimed
    rows[1]["sr_quality"] = reconstruction_over_seeds([_quality({"<8": (31.0, 29.0, 0.9, 0.88),
                                                                 "8-16": (29.2, 29.5, 0.85, 0.86)})])
    assert ("`sr`'s G against bicubic on held-out small RoIs: +2.00 / -0.30 dB PSNR (<8 / 8-16 px)."
            in verdict(rows))


def test_patch_sources_are_g_and_a_perfect_g_over_bilinear_patches_with_d_held_fixed(gt_file, tmp_path):
    """With `sr`'s D fixed, G's patches and the twins' are each compared with bilinear ones on the
    same images: the point is COCOeval's APs difference, the twins above G give G's share, and
    twins no better than bilinear patches give a zero-width interval and no share."""
    from sodlab.bench.report import patch_sources_table
    from sodlab.bench.stats import bench_intervals

    def run(name, finds_small_in):
        folder = tmp_path / name
        folder.mkdir()
        dets = _detections(finds_small_in)
        (folder / "detections_val.json").write_text(json.dumps(dets))
        return folder, coco_eval(gt_file, dets)

    sr_dir, sr_eval = run("sr", set(range(1, 11)))
    bilinear_dir, bilinear_eval = run("bilinear", set(range(1, 5)))
    twin_dir, twin_eval = run("twin", set(range(1, 19)))
    record = {"preset": "cpu", "method": "sr", "seed": 0, "run_dir": str(sr_dir), "eval": sr_eval,
              "patch_sources": {"bilinear": {"dir": str(bilinear_dir), "eval": bilinear_eval},
                                "twin": {"dir": str(twin_dir), "eval": twin_eval}}}
    summary = bench_intervals([record], gt_file, range(1, 21), resamples=200)[("cpu", "sr")]["patch_sources"]
    g, twin = summary["generator"]["APs"], summary["twin"]["APs"]
    assert g["point"] == pytest.approx(sr_eval["APs"] - bilinear_eval["APs"])
    assert twin["point"] == pytest.approx(twin_eval["APs"] - bilinear_eval["APs"])
    assert 0 < g["low"] and g["significant"] and twin["point"] > g["point"] and twin["seeds"] == 1
    rows = [_row("baseline", 0.2), _row("sr", sr_eval["APs"], (0.01, 0.05))]
    rows[1]["intervals"]["patch_sources"] = summary
    share = f"{g['point'] / twin['point']:.0%}"
    table = patch_sources_table(rows, [record])
    assert f"| seed 0 | ResNet-18-FPN | {100 * bilinear_eval['APs']:.2f} | {100 * sr_eval['APs']:.2f} |" in table
    assert table.splitlines()[-1].endswith(f"| {share} |")
    assert f"G holds {share} of that ceiling" in verdict(rows)

    record["patch_sources"]["twin"]["dir"] = str(bilinear_dir)  # a perfect G no better than bilinear patches
    summary = bench_intervals([record], gt_file, range(1, 21), resamples=200)[("cpu", "sr")]["patch_sources"]
    assert summary["twin"]["APs"]["low"] == summary["twin"]["APs"]["high"] == 0.0
    rows[1]["intervals"]["patch_sources"] = summary
    assert "a perfect G adds nothing significant here, so no G could" in verdict(rows)
    assert patch_sources_table([_row("sr", 0.3, (0.0, 0.1))], [record]) == ""  # not measured: no table


def test_bench_md_says_how_the_sr_runs_trained_as_their_records_say():
    from sodlab.bench.report import sr_passes

    def record(**training):
        return {"training": training}

    shared = {"shared_detector": "runs/baseline-seed0"}
    in_pass = record(**shared, one_pass={"runs": ["a", "b"], "seconds": 10.0})
    alone = record(**shared)
    assert "they train in one pass" in sr_passes([record(), in_pass, in_pass])
    assert sr_passes([record(), alone]) == "; each in a pass of its own"
    # a resumed bench whose earlier runs trained alone
    assert sr_passes([in_pass, alone]).startswith("; some in one pass")
    assert sr_passes([record()]) == ""  # no SR variant in the bench


def test_resamples_scored_together_equal_each_scored_alone(gt_file):
    """Resamples are scored a few rows at a time: 70 together give each one's AP alone."""
    matches = match_detections(gt_file, _scrambled_detections(), range(1, 21))
    weights = resample_weights(20, 70, seed=6)
    for area in ("all", "small"):
        together = weighted_ap(matches, weights, area)
        alone = [weighted_ap(matches, row[None], area)[0] for row in weights]
        assert np.array_equal(together, alone) and len(set(together.round(6))) > 10

"""TIDE's error decomposition and the tiny-object metrics: one hand-built case per error type,
COCO's area-range semantics in the size bins, AP equal to pycocotools', NWD worked out by hand."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from sodlab.errors import ERROR_TYPES, analyze
from sodlab.evaluate import (ERROR_BIN_LABELS, FINE_BIN_LABELS, coco_eval, error_area_ranges, format_errors_table,
                             format_tiny_table, load_coco_gt)
from sodlab.tiny_metrics import NWD_CONSTANT, NWDeval, nwd, tiny_object_metrics

CAR, PERSON = 3, 7
CATEGORIES = [{"id": CAR, "name": "car"}, {"id": PERSON, "name": "person"}]


def write_split(path, gts, image_ids=(1,)):
    """gts: [(image_id, category_id, [x, y, w, h]) or (..., iscrowd)] -> annotations json."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 400, "height": 400} for i in image_ids]
    annotations = [{"id": n + 1, "image_id": image_id, "category_id": cat, "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]), "iscrowd": crowd[0] if crowd else 0}
                   for n, (image_id, cat, box, *crowd) in enumerate(gts)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def results_of(dets):
    """dets: [(image_id, category_id, score, [x, y, w, h])] -> COCO results."""
    return [{"image_id": i, "category_id": c, "score": s, "bbox": [float(v) for v in b]} for i, c, s, b in dets]


def analysis(ann_file, dets, ranges=None):
    coco_gt = load_coco_gt(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results_of(dets))
    return analyze(coco_gt, coco_dt, ranges or error_area_ranges())


# --- one case per error type, IoU thresholds 0.5 / 0.1 ---------------------------------------------

A, B = [0, 0, 20, 20], [40, 0, 20, 20]
AP_HALF_RECALL = 51 / 101  # precision 1 up to recall 0.5: 51 of COCO's 101 recall points
AP_TWO_TP_AROUND_FP = (51 + 50 * 2 / 3) / 101  # TP, FP, TP: precision 1 to recall 0.5, then 2/3

# name: (ground truth, detections, AP50 before, AP50 after fixing that type, the objects' outcomes)
CASES = {
    # two cars: one found; the other's exact box at a higher score, but called a person
    "Cls": ([(1, CAR, A), (1, CAR, B)], [(1, CAR, .8, A), (1, PERSON, .9, B)],
            AP_HALF_RECALL, 1.0, {1: "tp", 2: "Cls"}),
    # two cars: one found; the other's box off by half its width (IoU 1/3), at a higher score
    "Loc": ([(1, CAR, A), (1, CAR, B)], [(1, CAR, .8, A), (1, CAR, .9, [50, 0, 20, 20])],
            51 * 0.5 / 101, 1.0, {1: "tp", 2: "Loc"}),
    # a car and a person, both found; a person box half off the car (IoU 1/3) outscores the person:
    # person AP 0.5, car AP 1
    "Both": ([(1, CAR, A), (1, PERSON, [0, 50, 20, 20])],
             [(1, CAR, .7, A), (1, PERSON, .8, [0, 50, 20, 20]), (1, PERSON, .9, [10, 0, 20, 20])],
             0.75, 1.0, {1: "tp", 2: "tp"}),
    # two cars found; a second box on the first (IoU 0.905) scores between them
    "Dupe": ([(1, CAR, A), (1, CAR, B)], [(1, CAR, .9, A), (1, CAR, .8, [1, 0, 20, 20]), (1, CAR, .7, B)],
             AP_TWO_TP_AROUND_FP, 1.0, {1: "tp", 2: "tp"}),
    # two cars found; a car box on empty background (IoU 0) scores between them
    "Bkg": ([(1, CAR, A), (1, CAR, B)], [(1, CAR, .9, A), (1, CAR, .8, [0, 60, 20, 20]), (1, CAR, .7, B)],
            AP_TWO_TP_AROUND_FP, 1.0, {1: "tp", 2: "tp"}),
    # two cars, one found
    "Miss": ([(1, CAR, A), (1, CAR, B)], [(1, CAR, .9, A)], AP_HALF_RECALL, 1.0, {1: "tp", 2: "Miss"}),
}


@pytest.mark.parametrize("kind", ERROR_TYPES)
def test_one_case_per_error_type(kind, tmp_path):
    gts, dets, ap, fixed_ap, outcomes = CASES[kind]
    ann_file = write_split(tmp_path / "gt.json", gts)
    stats = coco_eval(ann_file, results_of(dets))
    result = stats["errors"]["bins"]["all"]
    assert result["AP50"] == pytest.approx(ap) == pytest.approx(stats["AP50"])
    assert result["counts"] == {t: int(t == kind) for t in ERROR_TYPES}
    assert result["dAP"][kind] == pytest.approx(fixed_ap - ap) and result["dAP"][kind] > 0
    assert all(result["dAP"][t] == 0 for t in ERROR_TYPES if t != kind)
    assert stats["errors"]["fg_iou"] == 0.5 and stats["errors"]["bg_iou"] == 0.1
    # the objects' outcomes, and the one erroneous detection's type (detection ids are 1..N)
    bins = analysis(ann_file, dets)
    assert bins["all"].ground_truth == outcomes
    detections = bins["all"].detections
    assert sorted(detections) == list(range(1, len(dets) + 1))
    assert [o for o in detections.values() if o != "tp"] == ([] if kind == "Miss" else [kind])
    # every object here is 20 px: the small bin sees the same; the <8 and 8-16 bins see nothing
    assert stats["errors"]["bins"]["small"] == stats["errors"]["bins"]["16-32"] == result
    assert stats["errors"]["bins"]["<8"]["AP50"] == -1 and stats["errors"]["bins"]["<8"]["dAP"][kind] == -1


def test_two_fixes_of_one_object_the_higher_score_wins(tmp_path):
    """A car with a Loc error (0.9) and a Cls error (0.8) on it: either fix recovers it only
    through its best (highest-scoring) error; fixing Cls then just removes the person box."""
    ann_file = write_split(tmp_path / "gt.json", [(1, CAR, A), (1, CAR, B), (1, PERSON, [0, 100, 20, 20])])
    dets = [(1, CAR, .95, A), (1, CAR, .9, [50, 0, 20, 20]), (1, PERSON, .8, B), (1, PERSON, .7, [0, 100, 20, 20])]
    result = analysis(ann_file, dets)["all"]
    assert result.counts == {"Cls": 1, "Loc": 1, "Both": 0, "Dupe": 0, "Bkg": 0, "Miss": 0}
    assert result.ground_truth == {1: "tp", 2: "Loc", 3: "tp"}
    # car: TP, FP -> 0.5 recall at precision 1 -> 51/101; person: FP, TP -> 0.5
    ap = (51 / 101 + 0.5) / 2
    assert result.ap == pytest.approx(ap)
    assert result.dap["Loc"] == pytest.approx((1.0 + 0.5) / 2 - ap)  # car recovered
    assert result.dap["Cls"] == pytest.approx((51 / 101 + 1.0) / 2 - ap)  # person FP removed only


# --- size bins: COCO's area ranges ------------------------------------------------------------------

def test_an_off_box_outside_the_bin_still_explains_a_tiny_miss(tmp_path):
    """A 9 px box centred on a 6 px car (IoU 36/81 = 0.44) is outside the <8 px bin, so COCO ignores
    it there; it is still the Loc error that would recover the car, not a Miss."""
    ann_file = write_split(tmp_path / "gt.json", [(1, CAR, [100, 100, 6, 6])])
    dets = [(1, CAR, .9, [98.5, 98.5, 9, 9])]
    bins = analysis(ann_file, dets)
    tiny = bins["<8"]
    assert (tiny.ap, tiny.num_gt, tiny.ground_truth, tiny.detections) == (0.0, 1, {1: "Loc"}, {1: "Loc"})
    assert tiny.counts["Loc"] == 1 and tiny.counts["Miss"] == 0
    assert tiny.dap["Loc"] == pytest.approx(1.0) and tiny.dap["Miss"] == 0
    # In 8-16 the box is in the bin and the car is not: a Loc error whose fix removes it; no AP.
    assert bins["8-16"].detections == {1: "Loc"} and bins["8-16"].ap == -1 and bins["8-16"].num_gt == 0


def test_small_bin_ignores_medium_objects_but_not_small_boxes_on_them(tmp_path):
    ann_file = write_split(tmp_path / "gt.json", [(1, CAR, [0, 0, 20, 20]), (1, CAR, [100, 0, 60, 60]),
                                                  (1, CAR, [200, 0, 20, 20])])
    dets = [(1, CAR, .95, [110, 10, 30, 30]),  # small box inside the 60 px car, IoU 0.25: small Loc error
            (1, CAR, .9, [0, 0, 20, 20]),  # small TP
            (1, CAR, .85, [100, 0, 60, 60]),  # the 60 px car, found: ignored in the small bin
            (1, CAR, .8, [203, 0, 20, 20])]  # small TP (IoU 0.74)
    stats = coco_eval(ann_file, results_of(dets))
    small = analysis(ann_file, dets)["small"]
    assert small.detections == {1: "Loc", 2: "tp", 4: "tp"}
    assert small.ground_truth == {1: "tp", 3: "tp"}
    assert small.counts["Loc"] == 1 and small.counts["Bkg"] == 0
    assert small.ap == pytest.approx(stats["errors"]["bins"]["small"]["AP50"])
    assert small.ap == pytest.approx(2 / 3)  # FP, TP, TP: precision 2/3 at every recall
    assert small.dap["Loc"] == pytest.approx(1.0 - small.ap)  # removed: the car is not the bin's
    overall = analysis(ann_file, dets)["all"]
    assert overall.detections[1] == "Loc" and overall.ground_truth == {1: "tp", 2: "tp", 3: "tp"}


def test_crowd_regions_are_coco_s(tmp_path):
    ann_file = write_split(tmp_path / "gt.json", [(1, CAR, A), (1, CAR, [100, 100, 50, 50], 1)])
    dets = [(1, CAR, .9, [110, 110, 10, 10]), (1, CAR, .8, A)]  # the first lies inside the crowd
    result = analysis(ann_file, dets)["all"]
    assert result.detections == {2: "tp"} and result.ground_truth == {1: "tp"}
    assert result.ap == pytest.approx(1.0) and sum(result.counts.values()) == 0


def random_scenes(seed, num_images=12):
    """Objects of 3-38 px, one per 64 px cell of a grid (boxes never reach into the next cell),
    detected, nearly, wrongly, twice or not at all, plus stray boxes below the grid: every error
    type occurs in every bin under 32 px."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for image_id in range(1, num_images + 1):
        for cell in range(int(rng.integers(6, 16))):
            x0, y0 = 64 * (cell % 6), 64 * (cell // 6)
            side = float(rng.choice([rng.uniform(3, 8), rng.uniform(8, 16), rng.uniform(16, 32)]))
            w, h = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
            x, y = x0 + rng.uniform(0, 60 - 1.45 * w), y0 + rng.uniform(0, 60 - h)
            cat = int(rng.choice([CAR, PERSON]))
            gts.append((image_id, cat, [x, y, w, h]))
            score = float(rng.uniform(0.05, 1))
            other = PERSON if cat == CAR else CAR
            outcome = rng.choice(["hit", "loc", "cls", "both", "dupe", "miss"])
            shift = 0.45 * w  # IoU (w - shift) / (w + shift) = 0.38: between 0.1 and 0.5
            if outcome in ("hit", "dupe"):
                dets.append((image_id, cat, score, [x + rng.uniform(-.05, .05) * w, y, w, h]))
            if outcome == "dupe":
                dets.append((image_id, cat, score * rng.uniform(0.3, 0.99), [x + 0.1 * w, y, w, h]))
            if outcome == "loc":
                dets.append((image_id, cat, score, [x + shift, y, w, h]))
            if outcome == "cls":
                dets.append((image_id, other, score, [x, y, w, h]))
            if outcome == "both":
                dets.append((image_id, other, score, [x + shift, y, w, h]))
        for _ in range(int(rng.integers(1, 4))):  # background, below the grid
            side = float(rng.uniform(3, 30))
            dets.append((image_id, int(rng.choice([CAR, PERSON])), float(rng.uniform(0.05, 1)),
                         [float(rng.uniform(0, 360)), float(rng.uniform(330, 360)), side, side]))
    return gts, dets


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    gts, dets = random_scenes(seed=0)
    ann_file = write_split(tmp_path_factory.mktemp("errors") / "gt.json", gts, image_ids=range(1, 13))
    return ann_file, dets, coco_eval(ann_file, results_of(dets)), analysis(ann_file, dets)


def test_bin_ap_is_pycocotools_ap50_of_the_range(random_case):
    ann_file, dets, stats, _ = random_case
    bins = stats["errors"]["bins"]
    assert list(bins) == list(ERROR_BIN_LABELS)
    assert bins["all"]["AP50"] == pytest.approx(stats["AP50"])
    for label in FINE_BIN_LABELS[:3]:
        assert bins[label]["AP50"] == pytest.approx(stats["fine_bins"][label]["AP50"]), label
        assert bins[label]["num_gt"] == stats["fine_bins"][label]["num_gt"] > 0
    coco_gt = load_coco_gt(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results_of(dets)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    small = evaluator.eval["precision"][0, :, :, evaluator.params.areaRngLbl.index("small"), -1]
    assert bins["small"]["AP50"] == pytest.approx(small[small > -1].mean())


def test_counts_add_up_and_no_fix_lowers_ap(random_case):
    _, _, stats, bins = random_case
    for label, result in bins.items():
        summary = stats["errors"]["bins"][label]
        assert summary["counts"] == result.counts and summary["dAP"] == result.dap
        assert all(result.counts[t] > 0 for t in ERROR_TYPES), (label, result.counts)
        assert all(v >= 0 for v in result.dap.values()), (label, result.dap)
        outcomes = list(result.ground_truth.values())
        assert len(outcomes) == result.num_gt == summary["num_gt"]
        assert outcomes.count("Miss") == result.counts["Miss"] and outcomes.count("tp") == summary["tp"]
        assert set(outcomes) <= {"tp", "Miss", "Cls", "Loc"}
        detections = list(result.detections.values())
        for kind in ERROR_TYPES[:-1]:
            assert detections.count(kind) == result.counts[kind]
        assert detections.count("tp") == summary["tp"]


@pytest.mark.slow  # importing tidecv imports opencv, seaborn and pandas
def test_agrees_with_tidecv_where_both_apply(random_case):
    """tidecv (a dev dependency) on the whole image set: the same errors and dAPs. Its AP also
    counts classes without ground truth, which every class here has."""
    tidecv = pytest.importorskip("tidecv")
    ann_file, dets, stats, bins = random_case
    gt, pred = tidecv.Data("gt"), tidecv.Data("pred")
    for ann in json.loads(ann_file.read_text())["annotations"]:
        gt.add_ground_truth(ann["image_id"], ann["category_id"], ann["bbox"])
    for image_id, cat, score, box in dets:
        pred.add_detection(image_id, cat, score, box)
    tide = tidecv.TIDE(pos_threshold=0.5, background_threshold=0.1)
    run = tide.evaluate(gt, pred, name="random")
    assert run.ap / 100 == pytest.approx(bins["all"].ap)
    assert {e.short_name: n for e, n in run.count_errors().items()} == bins["all"].counts
    expected = {name: v / 100 for name, v in tide.get_main_errors()["random"].items()}
    assert bins["all"].dap == pytest.approx(expected)


def test_rejects_thresholds_in_the_wrong_order(random_case):
    ann_file, dets, _, _ = random_case
    coco_gt = load_coco_gt(ann_file)
    with pytest.raises(ValueError, match="background IoU < foreground IoU"):
        analyze(coco_gt, coco_gt, error_area_ranges(), fg_iou=0.1, bg_iou=0.5)


def test_errors_table(random_case):
    _, _, stats, _ = random_case
    table = format_errors_table([("baseline", stats), ("empty", {})], size_bin="<8").splitlines()
    assert table[0] == ("| Methods | AP50 <8 | dCls | dLoc | dBoth | dDupe | dBkg | dMiss "
                        "| #Cls | #Loc | #Both | #Dupe | #Bkg | #Miss |")
    result = stats["errors"]["bins"]["<8"]
    cells = table[2].strip("| ").split(" | ")
    assert cells[1] == f"{100 * result['AP50']:.1f}"
    assert cells[3] == f"{100 * result['dAP']['Loc']:.1f}" and cells[9] == str(result["counts"]["Loc"])
    assert table[3] == "| empty |" + "  |" * 13


# --- tiny-object metrics ----------------------------------------------------------------------------

def test_nwd_by_hand():
    # centres (2, 2) and (5, 6), equal sizes: W2 = 5
    assert nwd([[0, 0, 4, 4]], [[3, 4, 4, 4]])[0, 0] == pytest.approx(math.exp(-5 / 12.8))
    # same centre offset (2, -2) both ways and sizes 6x2 against 2x6: W2^2 = 8 + (16 + 16) / 4 = 16
    assert nwd([[0, 0, 6, 2]], [[0, 0, 2, 6]])[0, 0] == pytest.approx(math.exp(-4 / 12.8))
    assert nwd([[0, 0, 6, 2]], [[0, 0, 2, 6]], constant=4.0)[0, 0] == pytest.approx(math.exp(-1))
    matrix = nwd([[0, 0, 4, 4], [10, 10, 8, 8]], [[0, 0, 4, 4], [3, 4, 4, 4], [1, 1, 4, 4]])
    assert matrix.shape == (2, 3) and matrix[0, 0] == 1.0 and NWD_CONSTANT == 12.8
    assert matrix[0, 2] == pytest.approx(math.exp(-math.sqrt(2) / 12.8))
    with pytest.raises(ValueError, match="positive"):
        nwd([[0, 0, 1, 1]], [[0, 0, 1, 1]], constant=0)


def test_nwd_ap_matches_a_tiny_box_two_pixels_off(tmp_path):
    """A 4 px car boxed 2 px to the right: IoU 8/24 = 1/3 (a miss at 0.5, a hit at 0.25) and NWD
    exp(-2/12.8) = 0.855 (a hit at NWD thresholds 0.5..0.85, 8 of COCO's 10)."""
    ann_file = write_split(tmp_path / "gt.json", [(1, CAR, [100, 100, 4, 4])])
    stats = coco_eval(ann_file, results_of([(1, CAR, .9, [102, 100, 4, 4])]))
    tiny = stats["tiny"]
    assert tiny["nwd_constant"] == 12.8
    every, very_tiny = tiny["ranges"]["all"], tiny["ranges"]["very tiny"]
    assert (every["AP"], every["AP50"], every["AP25"]) == pytest.approx((0.0, 0.0, 1.0))
    assert (every["AP_nwd"], every["AP50_nwd"], every["AP25_nwd"]) == pytest.approx((0.8, 1.0, 1.0))
    assert very_tiny == every and very_tiny["num_gt"] == 1
    assert tiny["ranges"]["tiny"]["AP"] == -1 and tiny["ranges"]["tiny"]["num_gt"] == 0
    # the constant is configurable: C = 4 gives NWD exp(-0.5) = 0.61, a hit at 0.5..0.6 (3 of 10)
    coco_gt = load_coco_gt(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results_of([(1, CAR, .9, [102, 100, 4, 4])]))
    assert tiny_object_metrics(coco_gt, coco_dt, nwd_constant=4.0)["ranges"]["all"]["AP_nwd"] == pytest.approx(0.3)


def test_nwdeval_keeps_crowd_regions_iou_based(tmp_path):
    """A detection inside a crowd region is ignored by COCO's IoA test; NWD would not match it."""
    ann_file = write_split(tmp_path / "gt.json", [(1, CAR, A), (1, CAR, [100, 100, 80, 80], 1)])
    coco_gt = load_coco_gt(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results_of([(1, CAR, .9, [110, 110, 10, 10]), (1, CAR, .8, A)]))
        evaluator = NWDeval(coco_gt, coco_dt)
        evaluator.evaluate()
    entry = next(e for e in evaluator.evalImgs if e is not None and e["aRng"] == [0, 1e10])
    assert entry["dtIgnore"][0].tolist() == [True, False]  # crowd hit ignored, car matched


def test_ap25_at_least_ap50_and_all_equals_coco(random_case):
    _, _, stats, _ = random_case
    ranges = stats["tiny"]["ranges"]
    assert list(ranges) == ["all", "very tiny", "tiny", "small"]
    assert ranges["all"]["AP"] == pytest.approx(stats["AP"]) and ranges["all"]["AP50"] == pytest.approx(stats["AP50"])
    for label, metrics in ranges.items():
        assert metrics["num_gt"] > 0
        assert metrics["AP25"] >= metrics["AP50"] >= 0, label
        assert metrics["AP25_nwd"] >= metrics["AP50_nwd"] >= metrics["AP_nwd"] >= 0, label
    assert ranges["all"]["AP25"] > ranges["all"]["AP50"]  # the near misses (IoU 0.38) count at 0.25
    assert ranges["tiny"]["num_gt"] == stats["fine_bins"]["8-16"]["num_gt"]
    assert ranges["small"]["num_gt"] == stats["fine_bins"]["16-32"]["num_gt"]


def test_tiny_table(random_case):
    _, _, stats, _ = random_case
    table = format_tiny_table({"baseline": stats}).splitlines()
    assert table[0] == ("| Methods | AP 0.5:0.95 | 0.5 | 0.25 | NWD 0.5:0.95 | NWD 0.5 | very tiny 2-8 "
                        "| tiny 8-16 | small 16-32 |")
    ranges = stats["tiny"]["ranges"]
    expected = [ranges["all"][k] for k in ("AP", "AP50", "AP25", "AP_nwd", "AP50_nwd")]
    expected += [ranges[b]["AP"] for b in ("very tiny", "tiny", "small")]
    assert table[2] == "| baseline | " + " | ".join(f"{100 * v:.1f}" for v in expected) + " |"


def test_switches_leave_the_keys_out(random_case):
    ann_file, dets, stats, _ = random_case
    lean = coco_eval(ann_file, results_of(dets), errors=False, tiny=False)
    assert "errors" not in lean and "tiny" not in lean
    assert lean == {k: v for k, v in stats.items() if k not in ("errors", "tiny")}

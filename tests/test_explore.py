"""sodlab.explore against a private MongoDB: small-object counts equal pycocotools' per-image
matching, saved views hold exactly the expected objects, rebuilds touch no other dataset."""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------------------
# A private database, set up before fiftyone is imported. Pointing FIFTYONE_DATABASE_DIR
# elsewhere is not enough: FiftyOne attaches to any database service already running for
# this user (whatever its directory), so these tests start their own mongod and connect to
# it by URI. The App server subprocess inherits the URI.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_private_fiftyone_database() -> str:
    """Start a throwaway mongod (once per process) and point FiftyOne at it; return its URI."""
    if os.environ.get("SODLAB_TEST_FIFTYONE_URI"):
        return os.environ["SODLAB_TEST_FIFTYONE_URI"]
    package_dir = Path(importlib.util.find_spec("fiftyone").submodule_search_locations[0])
    mongod = package_dir / "db" / "bin" / "mongod"
    db_dir = tempfile.mkdtemp(prefix="sodlab-test-fiftyone-")
    port = free_port()
    process = subprocess.Popen(
        [str(mongod), "--dbpath", db_dir, "--port", str(port), "--bind_ip", "127.0.0.1",
         "--nounixsocket", "--logpath", os.path.join(db_dir, "mongod.log")],
        stdout=subprocess.DEVNULL)

    def stop():
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(db_dir, ignore_errors=True)

    atexit.register(stop)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private mongod did not start; see {db_dir}/mongod.log")
            time.sleep(0.1)
    uri = f"mongodb://127.0.0.1:{port}/"
    os.environ.update({
        "SODLAB_TEST_FIFTYONE_URI": uri, "FIFTYONE_DATABASE_URI": uri,
        "FIFTYONE_DATABASE_DIR": db_dir, "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_SHOW_PROGRESS_BARS": "false"})
    os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)  # a port inherited from a parent
    if "fiftyone" in sys.modules:  # imported by another test module: redirect if still possible
        import fiftyone as fo
        import fiftyone.core.odm.database as fodb

        if fodb._client is not None:
            raise RuntimeError("fiftyone connected to a database before the sodlab tests could "
                               "point it at a private one; import sodlab.explore lazily")
        fo.config.database_uri = uri
        fo.config.database_validation = False
        fo.config.show_progress_bars = False
    return uri


use_private_fiftyone_database()

import fiftyone as fo  # noqa: E402
from fiftyone import ViewField as F  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

import sodlab.explore as explore  # noqa: E402
from sodlab.errors import ERROR_TYPES  # noqa: E402
from sodlab.evaluate import error_analysis  # noqa: E402


# ----------------------------------------------------------------------------------------
# Tiny COCO splits and run directories written by hand


def write_coco_split(root: Path, images: list[dict], annotations: list[dict],
                     categories: list[dict], split: str = "val") -> Path:
    """PNG images (a drawn box per annotation) and annotations/instances_{split}.json."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for image in images:
        canvas = Image.new("RGB", (image["width"], image["height"]), (40, 40, 40))
        draw = ImageDraw.Draw(canvas)
        for ann in annotations:
            if ann["image_id"] == image["id"]:
                x, y, w, h = ann["bbox"]
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(200, 180, 60))
        canvas.save(root / split / image["file_name"])
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def write_run(runs_root: Path, name: str, method: str, detections: list[dict],
              split: str = "val") -> Path:
    run_dir = runs_root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"method": method, "seed": 0}))
    (run_dir / f"detections_{split}.json").write_text(json.dumps(detections))
    return run_dir


def image_record(image_id: int, width: int, height: int) -> dict:
    return {"id": image_id, "file_name": f"{image_id:06d}.png", "width": width, "height": height}


def gt(ann_id, image_id, category_id, bbox, area=None, iscrowd=0) -> dict:
    area = bbox[2] * bbox[3] if area is None else area
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [float(v) for v in bbox], "area": float(area), "iscrowd": iscrowd}


def det(image_id, category_id, bbox, score) -> dict:
    return {"image_id": image_id, "category_id": category_id,
            "bbox": [float(v) for v in bbox], "score": score}


CATEGORIES = [{"id": 1, "name": "car"}, {"id": 3, "name": "person"}, {"id": 7, "name": "bird"}]


def random_split(seed: int, num_images: int = 8):
    """GT objects on a grid of disjoint cells (small and medium; annotation areas below box
    areas so that size by annotation area and by box area disagree sometimes) and detections
    that hit, nearly hit (IoU ~0.43), hit with the wrong class, duplicate, shrink or miss,
    plus stray false positives."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    cell = 52
    for image_id in range(1, num_images + 1):
        cols, rows = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        images.append(image_record(image_id, cols * cell + 4, rows * cell + 6))
        for r in range(rows):
            for c in range(cols):
                if rng.random() < 0.25:
                    continue
                small = rng.random() < 0.6
                w, h = (rng.integers(5, 31, size=2) if small else rng.integers(33, 49, size=2))
                x = c * cell + 2 + rng.integers(0, cell - w)
                y = r * cell + 2 + rng.integers(0, cell - h)
                category = int(rng.choice([1, 3, 7]))
                ann_id = len(annotations) + 1
                annotations.append(gt(ann_id, image_id, category, [x, y, w, h],
                                      area=w * h * rng.uniform(0.55, 1.0)))
                outcome = rng.choice(["hit", "near", "wrong", "miss", "dup", "shrunk"])
                score = float(rng.uniform(0.05, 1.0))
                if outcome in ("hit", "dup"):
                    box = [x + rng.uniform(-1, 1), y + rng.uniform(-1, 1), w, h]
                    detections.append(det(image_id, category, box, score))
                if outcome == "dup":
                    detections.append(det(image_id, category, [x + 1, y, w, h], score / 2))
                if outcome == "near":  # shifted by 0.4 w: IoU = 0.6 / 1.4 ~ 0.43
                    detections.append(det(image_id, category, [x + 0.4 * w, y, w, h], score))
                if outcome == "wrong":
                    other = int(rng.choice([k for k in (1, 3, 7) if k != category]))
                    detections.append(det(image_id, other, [x, y, w, h], score))
                if outcome == "shrunk":  # 0.75 of each side: IoU 0.56, box area smaller
                    detections.append(det(image_id, category,
                                          [x + w / 8, y + h / 8, 0.75 * w, 0.75 * h], score))
        for _ in range(int(rng.integers(0, 4))):  # stray boxes anywhere, any size
            w, h = rng.integers(4, 60, size=2)
            box = [rng.uniform(0, cols * cell - w), rng.uniform(0, rows * cell - h), w, h]
            detections.append(det(image_id, int(rng.choice([1, 3, 7])), box,
                                  float(rng.uniform(0.05, 1.0))))
    return images, annotations, detections


# Hand-made corner cases, appended to the random split (image ids 100+).
CORNER_IMAGES = [image_record(100, 120, 90), image_record(101, 64, 64), image_record(102, 64, 64)]
CORNER_ANNOTATIONS = [
    gt(1001, 100, 1, [10, 10, 32, 32], area=1024),    # exactly 32**2: small in COCOeval
    gt(1002, 100, 1, [60, 10, 40, 40], area=900),     # box 1600 px, annotation area small
    gt(1003, 100, 3, [10, 50, 36, 36]),               # medium
    gt(1004, 101, 7, [0, 0, 30, 30], iscrowd=1),      # small crowd regions: ignored by both
    gt(1005, 101, 7, [34, 34, 20, 20], iscrowd=1),    # sides, hit (1004) or not (1005)
    gt(1006, 102, 1, [40, 40, 10, 10]),               # hit only by the 101st car box: a miss
]
CORNER_DETECTIONS = [
    det(100, 1, [10, 10, 32, 32], 0.9),               # TP on the 1024 px object
    det(100, 1, [60, 10, 40, 40], 0.8),               # TP on the small-by-area object
    det(100, 3, [13, 53, 30, 30], 0.7),               # small box matching a medium GT: ignored
    det(100, 3, [80, 60, 10, 10], 0.6),               # small FP
    det(100, 7, [70, 50, 40, 35], 0.5),               # medium FP: not counted
    det(101, 7, [10, 10, 8, 8], 0.9),                 # inside the crowd: ignored
    *[det(102, 1, [(i % 10) * 3, (i // 10) * 3, 6, 6], 0.99 - i / 1000) for i in range(100)],
    det(102, 1, [40, 40, 10, 10], 0.5),               # beyond COCOeval's maxDets=100
]


def pycocotools_small_counts(ann_file: Path, detections: list[dict]) -> dict[int, tuple]:
    """(TP, FP, FN) per image from COCOeval.evalImgs: areaRng small, IoU 0.5, maxDets 100."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
    params = coco_eval.params
    t = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    small_range = params.areaRng[params.areaRngLbl.index("small")]
    assert params.maxDets[-1] == 100
    counts = defaultdict(lambda: np.zeros(3, dtype=int))
    for e in coco_eval.evalImgs:
        if e is None or list(e["aRng"]) != list(small_range):
            continue
        matched, dt_ignored = e["dtMatches"][t] > 0, e["dtIgnore"][t].astype(bool)
        gt_matched, gt_ignored = e["gtMatches"][t] > 0, np.asarray(e["gtIgnore"], dtype=bool)
        counts[e["image_id"]] += [(matched & ~dt_ignored).sum(), (~matched & ~dt_ignored).sum(),
                                  (~gt_matched & ~gt_ignored).sum()]
    return {image_id: tuple(int(v) for v in c) for image_id, c in counts.items()}


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("randcoco")
    images, annotations, baseline_dets = random_split(seed=3)
    _, _, sr_dets = random_split(seed=3)  # same scenes, other detections below
    rng = np.random.default_rng(11)
    for d in sr_dets:  # the "SR" run: jittered boxes, shuffled scores
        d["bbox"] = [v + float(rng.uniform(-2, 2)) for v in d["bbox"][:2]] + d["bbox"][2:]
        d["score"] = float(rng.uniform(0.05, 1.0))
    data_dir = write_coco_split(root / "randcoco", images + CORNER_IMAGES,
                                annotations + CORNER_ANNOTATIONS, CATEGORIES)
    runs = [write_run(root / "runs", "baseline", "baseline", baseline_dets + CORNER_DETECTIONS),
            write_run(root / "runs", "SR-x4", "sr", sr_dets)]
    dataset = explore.build_dataset(data_dir, runs)
    return data_dir, runs, dataset


def test_small_counts_equal_pycocotools_evalimgs(random_case):
    data_dir, runs, dataset = random_case
    ann_file = data_dir / "annotations" / "instances_val.json"
    assert re.fullmatch(r"sodlab-randcoco-val-baseline\+sr_x4-[0-9a-f]{8}", dataset.name)
    for run_dir, field in zip(runs, ["baseline", "sr_x4"]):
        detections = json.loads((run_dir / "detections_val.json").read_text())
        expected = pycocotools_small_counts(ann_file, detections)
        image_ids, tp, fp, fn = dataset.values(
            ["image_id", f"small_tp_{field}", f"small_fp_{field}", f"small_fn_{field}"])
        got = {i: c for i, *c in zip(image_ids, tp, fp, fn)}
        for image_id in image_ids:
            assert tuple(got[image_id]) == expected.get(image_id, (0, 0, 0)), (field, image_id)
        totals = np.sum(list(expected.values()), axis=0)
        assert (totals > 0).all(), f"{field}: the case must have small TPs, FPs and FNs"
        summary = explore.small_object_summary(dataset)[field]
        assert (summary["tp"], summary["fp"], summary["fn"]) == tuple(totals)
    # The corner image, counted by hand: TPs on the 1024 px and the small-by-area object, one
    # small FP; the small box on the medium GT, the medium FP and the crowd hit count nowhere.
    corner = dataset.match(F("image_id") == 100).first()
    assert (corner.small_tp_baseline, corner.small_fp_baseline, corner.small_fn_baseline) == (2, 1, 0)
    crowd = dataset.match(F("image_id") == 101).first()
    assert (crowd.small_tp_baseline, crowd.small_fp_baseline, crowd.small_fn_baseline) == (0, 0, 0)
    crowded = dataset.match(F("image_id") == 102).first()
    assert (crowded.small_tp_baseline, crowded.small_fp_baseline, crowded.small_fn_baseline) \
        == (0, 100, 1)
    sizes = {d.annotation_id: (d.size, d.area_px) for d in corner.ground_truth.detections}
    assert sizes == {1001: ("small", 1024.0), 1002: ("small", 900.0), 1003: ("medium", 1296.0)}


def test_evaluation_equals_fiftyones_evaluate_detections(random_case):
    """build_dataset evaluates the samples before writing them; FiftyOne's own
    evaluate_detections, run again on a copy, must give every label the same outcome, match
    and IoU, every sample the same counts, and the same registered results."""
    _, _, dataset = random_case
    copy = dataset.clone(f"{dataset.name}-reference")
    try:
        for field in ("baseline", "sr_x4"):
            reference = copy.evaluate_detections(field, gt_field="ground_truth", eval_key="reference",
                                                 method="coco", iou=0.5, classwise=True)
            for labels in ("ground_truth", field):
                for suffix in ("", "_id", "_iou"):
                    ours = dataset.values(f"{labels}.detections.eval_{field}{suffix}")
                    assert ours == copy.values(f"{labels}.detections.reference{suffix}"), (field, labels, suffix)
                    assert any(value not in (None, "") for values in ours for value in values)
            for kind in ("tp", "fp", "fn"):
                assert dataset.values(f"eval_{field}_{kind}") == copy.values(f"reference_{kind}"), (field, kind)
            assert sum(copy.values("reference_fn")) > 0 and sum(copy.values("reference_fp")) > 0
            assert dataset.load_evaluation_results(f"eval_{field}").report() == reference.report()
            copy.delete_evaluation("reference")
        assert sorted(dataset.list_evaluations()) == ["eval_baseline", "eval_sr_x4"]
    finally:
        copy.delete()


def test_gain_is_recall_difference_and_none_without_small_gt(random_case):
    _, _, dataset = random_case
    for sample in dataset:
        small = [d for d in sample.ground_truth.detections if d.size == "small" and not d.iscrowd]
        assert sample.small_gt == len(small)
        if not small:
            assert sample.small_recall_gain is None
            continue
        recall = {k: sum(d[f"eval_{k}"] == "tp" for d in small) / len(small)
                  for k in ("baseline", "sr_x4")}
        assert sample.small_recall_gain == pytest.approx(recall["sr_x4"] - recall["baseline"])


# ----------------------------------------------------------------------------------------
# Saved views on a case worked out by hand

VIEW_IMAGES = [image_record(i, 100, 80) for i in (1, 2, 3, 4, 5)]
VIEW_ANNOTATIONS = [
    gt(11, 1, 1, [5, 5, 20, 20]),            # small: baseline misses, sr finds
    gt(12, 1, 1, [50, 20, 40, 40]),          # medium: baseline misses, sr finds (not small)
    gt(21, 2, 1, [5, 5, 20, 20]),            # small: baseline finds, sr misses (regression)
    gt(22, 2, 3, [50, 5, 20, 20]),           # small: both find
    gt(31, 3, 1, [5, 5, 10, 10]),            # small: both miss
    gt(32, 3, 3, [30, 5, 10, 10]),           # small: baseline misses, sr finds
    gt(33, 3, 7, [60, 5, 10, 10]),           # small: both find
    gt(41, 4, 1, [5, 5, 50, 50]),            # medium only
    gt(42, 4, 7, [60, 40, 20, 20], iscrowd=1),  # small crowd: in no view
]
VIEW_BASELINE = [
    det(2, 1, [5, 5, 20, 20], 0.9), det(2, 3, [50, 5, 20, 20], 0.8),
    det(3, 7, [60, 5, 10, 10], 0.7), det(4, 1, [5, 5, 50, 50], 0.9),
]
VIEW_SR = [
    det(1, 1, [5, 5, 20, 20], 0.9), det(1, 1, [50, 20, 40, 40], 0.8),
    det(2, 3, [50, 5, 20, 20], 0.8),
    det(3, 3, [30, 5, 10, 10], 0.7), det(3, 7, [60, 5, 10, 10], 0.6),
    det(5, 3, [40, 40, 12, 12], 0.5),        # small FP on an image without ground truth
]


def write_sr_patches(run_dir: Path, entries: list[tuple[int, int, str]]) -> None:
    patch_dir = run_dir / "sr_patches"
    patch_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for image_id, ann_id, label in entries:
        record = {"image_id": image_id, "annotation_id": ann_id, "label": label, "psnr": 21.5}
        for slice_name, side in (("lr", 16), ("sr", 64), ("hr", 64)):
            name = f"{image_id}_{ann_id}_{slice_name}.png"
            Image.new("RGB", (side, side), (0, 90 + side, 0)).save(patch_dir / name)
            record[slice_name] = name
        index.append(record)
    (patch_dir / "index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def view_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewcase")
    data_dir = write_coco_split(root / "handmade", VIEW_IMAGES, VIEW_ANNOTATIONS, CATEGORIES)
    runs = [write_run(root / "runs", "baseline", "baseline", VIEW_BASELINE),
            write_run(root / "runs", "sr", "sr", VIEW_SR)]
    write_sr_patches(runs[1], [(1, 11, "car"), (3, 32, "person")])
    return data_dir, runs, explore.build_dataset(data_dir, runs)


def gt_annotation_ids(view) -> set[int]:
    return set(view.values("ground_truth.detections.annotation_id", unwind=True))


def test_saved_views_hold_exactly_the_expected_objects(view_case):
    _, _, dataset = view_case
    assert set(dataset.list_saved_views()) == {
        "small-missed-by-baseline-found-by-sr", "small-regressions",
        "sorted-by-small-recall-gain", "small-gt-patches",
        "small-false-positives-baseline", "small-false-positives-sr",
        "small-loc-of-baseline-fixed-by-sr",
        *(f"false-{kind}-{run}" for kind in ("positives", "negatives") for run in ("baseline", "sr")),
        *(f"small-{kind.lower()}-{run}" for kind in ERROR_TYPES for run in ("baseline", "sr"))}
    assert gt_annotation_ids(dataset.load_saved_view("small-missed-by-baseline-found-by-sr")) \
        == {11, 32}
    assert gt_annotation_ids(dataset.load_saved_view("small-regressions")) == {21}
    patches = dataset.load_saved_view("small-gt-patches")
    assert sorted(patches.values("ground_truth.annotation_id")) == [11, 21, 22, 31, 32, 33]
    outcomes = dict(zip(patches.values("ground_truth.annotation_id"),
                        zip(patches.values("ground_truth.eval_baseline"),
                            patches.values("ground_truth.eval_sr"))))
    assert outcomes[21] == ("tp", "fn") and outcomes[31] == ("fn", "fn")
    # gains: image 1: 1 - 0; image 3: 2/3 - 1/3; image 2: 1/2 - 1; images 4, 5: no small GT
    ranked = dataset.load_saved_view("sorted-by-small-recall-gain")
    assert ranked.values("image_id") == [1, 3, 2]
    assert ranked.values("small_recall_gain") == pytest.approx([1.0, 1 / 3, -0.5])
    fp_view = dataset.load_saved_view("small-false-positives-sr")
    assert fp_view.values("image_id") == [5]
    assert explore.small_object_summary(dataset) == {
        "baseline": {"tp": 3, "fp": 0, "fn": 3, "recall": 0.5, "precision": 1.0},
        "sr": {"tp": 4, "fp": 1, "fn": 2, "recall": 4 / 6, "precision": 0.8}}


def test_sr_patches_are_linked_to_their_ground_truth(view_case):
    _, runs, dataset = view_case
    patches_ds = fo.load_dataset(dataset.name + "-sr-patches")
    assert patches_ds.media_type == "group"
    assert sorted(patches_ds.group_slices) == ["hr", "lr", "sr"]
    all_slices = patches_ds.select_group_slices()
    assert len(all_slices) == 6 and len(patches_ds) == 2  # 2 groups, one per patch record
    image3 = dataset.match(F("image_id") == 3).first()
    gt32 = next(d for d in image3.ground_truth.detections if d.annotation_id == 32)
    assert len(gt32.sr_patch_ids) == 1
    group = patches_ds.get_group(gt32.sr_patch_ids[0])
    assert set(group) == {"lr", "sr", "hr"}
    assert Path(group["lr"].filepath) == (runs[1] / "sr_patches" / "3_32_lr.png").resolve()
    for sample in group.values():
        assert (sample.gt_id, sample.source_sample_id) == (gt32.id, image3.id)
        assert (sample.annotation_id, sample.ground_truth.label, sample.psnr) == (32, "person", 21.5)
        assert (sample.eval_baseline, sample.eval_sr) == ("fn", "tp")
    # from a miss of the baseline to its patch, three ways
    missed = dataset.load_saved_view("small-missed-by-baseline-found-by-sr")
    patch_sample = missed.to_patches("ground_truth").match(
        F("ground_truth.annotation_id") == 32).first()
    for handle in (patch_sample, gt32, image3):
        view = explore.sr_patches_for(handle)
        assert view.values("annotation_id") == [32]
    assert explore.sr_patches_for(dataset.match(F("image_id") == 4).first()).count() == 0


def test_bad_sr_index_names_file_and_record(view_case, tmp_path):
    data_dir, runs, _ = view_case
    run_dir = write_run(tmp_path / "runs", "sr", "sr", VIEW_SR)
    write_sr_patches(run_dir, [(1, 11, "car"), (1, 21, "car")])  # 21 is on image 2
    with pytest.raises(ValueError, match=r"index\.json: record 1: no annotation id 21"):
        explore.build_dataset(data_dir, [runs[0], run_dir], name="sodlab-bad-index")
    assert not fo.dataset_exists("sodlab-bad-index")


def test_bad_detections_name_file_and_record(view_case, tmp_path):
    data_dir, runs, _ = view_case
    bad = write_run(tmp_path / "runs", "broken", "sr", VIEW_SR + [det(99, 1, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match=r"detections_val\.json: record 6: image_id 99"):
        explore.build_dataset(data_dir, [runs[0], bad], name="sodlab-broken")


def test_launch_refuses_a_busy_port(view_case):
    _, _, dataset = view_case
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match=r"cannot serve the FiftyOne App on 127\.0\.0\.1:\d+"):
            explore.launch(dataset, port=busy.getsockname()[1], wait=False)


@pytest.mark.slow
def test_launch_waits_for_a_slow_app_server_quietly(view_case, monkeypatch, capfd):
    """fo.launch_app's session gives up pinging after 10 s and prints "Could not connect
    session, trying again in 10 seconds"; a server slower than that to start (a busy CPU,
    simulated here) must not make launch print it."""
    import time

    import fiftyone.core.service as fos
    import requests

    _, _, dataset = view_case
    real_start = fos.ServerService.start

    def slow_start(self):
        time.sleep(11)
        real_start(self)

    monkeypatch.setattr(fos.ServerService, "start", slow_start)
    port = free_port()
    session = explore.launch(dataset, port=port, wait=False)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/fiftyone", timeout=5).ok
        time.sleep(1)
        assert "Could not connect session" not in capfd.readouterr().out
    finally:
        session.close()


# ----------------------------------------------------------------------------------------
# TIDE error types on the labels


def test_error_attributes_equal_the_analysis(random_case):
    """error_<run> on every label equals sodlab.evaluate.error_analysis's small bin, object by
    object (ground truth by annotation id, detections by position in the results file)."""
    data_dir, runs, dataset = random_case
    ann_file = data_dir / "annotations" / "instances_val.json"
    for run_dir, field in zip(runs, ["baseline", "sr_x4"]):
        detections = json.loads((run_dir / "detections_val.json").read_text())
        small = error_analysis(ann_file, detections)["small"]
        assert explore.small_error_counts(dataset)[field] == small.counts
        assert sum(small.counts[k] > 0 for k in ERROR_TYPES) >= 5, small.counts
        ann_ids, outcomes = dataset.values(["ground_truth.detections.annotation_id",
                                            f"ground_truth.detections.error_{field}"], unwind=True)
        assert {a: o for a, o in zip(ann_ids, outcomes) if o is not None} == small.ground_truth
        # detections: match the dataset's boxes and scores back to the results file
        position = {(d["image_id"], d["score"], tuple(d["bbox"])): i + 1 for i, d in enumerate(detections)}
        got = {}
        for sample in dataset.select_fields([field, "image_id"]):
            width, height = sample.metadata.width, sample.metadata.height
            for d in sample[field].detections:
                x, y, w, h = d.bounding_box
                key = (sample.image_id, d.confidence, (x * width, y * height, w * width, h * height))
                match = [i for k, i in position.items() if k[:2] == key[:2]
                         and np.allclose(k[2], key[2], atol=1e-6)]
                assert len(match) == 1
                if d[f"error_{field}"] is not None:
                    got[match[0]] = d[f"error_{field}"]
        assert got == small.detections


ERROR_IMAGES = [image_record(i, 120, 90) for i in (1, 2, 3, 4)]
ERROR_ANNOTATIONS = [
    gt(1, 1, 1, [10, 10, 20, 20]),            # baseline: Loc error; sr: found
    gt(2, 1, 3, [60, 10, 20, 20]),            # baseline: a car box on the person (Cls); sr: found
    gt(3, 2, 1, [10, 10, 12, 12]),            # both miss
    gt(4, 2, 1, [50, 10, 20, 20]),            # both find; the baseline adds a duplicate
    gt(5, 3, 1, [10, 10, 60, 60]),            # medium: both find; the baseline adds a small box in it
    gt(6, 3, 1, [80, 60, 20, 20]),            # baseline: a person box half on it (Both), a Miss
    gt(7, 4, 1, [10, 10, 30, 30]),            # baseline: a 45 px box on it (IoU 0.44): Loc
]
ERROR_BASELINE = [
    det(1, 1, [20, 10, 20, 20], 0.9),         # Loc (IoU 1/3)
    det(1, 1, [60, 10, 20, 20], 0.8),         # Cls
    det(2, 1, [90, 60, 10, 10], 0.7),         # Bkg
    det(2, 1, [50, 10, 20, 20], 0.95), det(2, 1, [51, 10, 20, 20], 0.6),  # TP, Dupe
    det(3, 1, [10, 10, 60, 60], 0.9),         # medium TP: in no small-range view
    det(3, 1, [20, 20, 30, 30], 0.5),         # small box on the medium car (IoU 0.25): small Loc
    det(3, 3, [90, 60, 20, 20], 0.4),         # Both
    det(4, 1, [10, 10, 45, 45], 0.9),         # medium box, Loc error of the small car
]
ERROR_SR = [det(1, 1, [10, 10, 20, 20], 0.9), det(1, 3, [60, 10, 20, 20], 0.8),
            det(2, 1, [50, 10, 20, 20], 0.9), det(3, 1, [10, 10, 60, 60], 0.9),
            det(3, 1, [80, 60, 20, 20], 0.8), det(4, 1, [10, 10, 30, 30], 0.9)]


@pytest.fixture(scope="module")
def error_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("errorcase")
    data_dir = write_coco_split(root / "errorcase", ERROR_IMAGES, ERROR_ANNOTATIONS, CATEGORIES)
    runs = [write_run(root / "runs", "baseline", "baseline", ERROR_BASELINE),
            write_run(root / "runs", "sr", "sr", ERROR_SR)]
    return data_dir, runs, explore.build_dataset(data_dir, runs)


def labels_with(view, field, attribute):
    """{(image_id, annotation id or confidence): value} of the labels in `field` of a view."""
    key = "annotation_id" if field == "ground_truth" else "confidence"
    image_ids, keys, values = view.values(["image_id", f"{field}.detections.{key}",
                                           f"{field}.detections.{attribute}"])
    return {(i, k): v for i, ks, vs in zip(image_ids, keys, values) for k, v in zip(ks, vs)}


def test_error_types_and_views_on_a_hand_built_case(error_case):
    _, _, dataset = error_case
    assert explore.small_error_counts(dataset) == {
        "baseline": {"Cls": 1, "Loc": 3, "Both": 1, "Dupe": 1, "Bkg": 1, "Miss": 2},
        "sr": {"Cls": 0, "Loc": 0, "Both": 0, "Dupe": 0, "Bkg": 0, "Miss": 1}}
    gt_errors = labels_with(dataset, "ground_truth", "error_baseline")
    assert gt_errors == {(1, 1): "Loc", (1, 2): "Cls", (2, 3): "Miss", (2, 4): "tp", (3, 5): None,
                         (3, 6): "Miss", (4, 7): "Loc"}
    det_errors = labels_with(dataset, "baseline", "error_baseline")
    assert det_errors == {(1, 0.9): "Loc", (1, 0.8): "Cls", (2, 0.7): "Bkg", (2, 0.95): "tp", (2, 0.6): "Dupe",
                          (3, 0.9): None, (3, 0.5): "Loc", (3, 0.4): "Both", (4, 0.9): "Loc"}
    fixed = dataset.load_saved_view("small-loc-of-baseline-fixed-by-sr")
    assert gt_annotation_ids(fixed) == {1, 7}
    loc = dataset.load_saved_view("small-loc-baseline")
    assert gt_annotation_ids(loc) == {1, 7}
    assert sorted(loc.values("baseline.detections.confidence", unwind=True)) == [0.5, 0.9, 0.9]
    assert "sr" not in loc.get_field_schema()
    miss = dataset.load_saved_view("small-miss-baseline")
    assert gt_annotation_ids(miss) == {3, 6} and miss.count("baseline.detections") == 0
    assert dataset.load_saved_view("small-bkg-baseline").values("image_id") == [2]
    assert len(dataset.load_saved_view("small-cls-sr")) == 0
    # export views: only the unmatched detections / only the missed ground truth, all sizes
    false_positives = dataset.load_saved_view("false-positives-baseline")
    assert set(false_positives.get_field_schema()) & {"ground_truth", "sr"} == set()
    assert sorted(false_positives.values("baseline.detections.confidence", unwind=True)) \
        == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9]
    false_negatives = dataset.load_saved_view("false-negatives-baseline")
    assert "baseline" not in false_negatives.get_field_schema()
    assert gt_annotation_ids(false_negatives) == {1, 2, 3, 6, 7}
    assert gt_annotation_ids(dataset.load_saved_view("false-negatives-sr")) == {3}


def test_size_range_evaluation_filters_predictions_as_cocoeval(random_case, error_case):
    data_dir, runs, dataset = random_case
    ann_file = data_dir / "annotations" / "instances_val.json"
    for run_dir, field in zip(runs, ["baseline", "sr_x4"]):
        results = explore.evaluate_size_range(dataset, field)
        key = f"eval_{field}_small"
        view = dataset.load_evaluation_view(key)
        image_ids, gt_eval, gt_crowd, dt_eval = view.values(
            ["image_id", f"ground_truth.detections.{key}", "ground_truth.detections.iscrowd",
             f"{field}.detections.{key}"])
        got = {i: (sum(e == "tp" for e, c in zip(g, cr) if not c), d.count("fp"),
                   sum(e == "fn" for e, c in zip(g, cr) if not c))
               for i, g, cr, d in zip(image_ids, gt_eval, gt_crowd, dt_eval)}
        expected = pycocotools_small_counts(ann_file, json.loads((run_dir / "detections_val.json").read_text()))
        assert {i: c for i, c in got.items() if any(c)} == {i: c for i, c in expected.items() if any(c)}
        assert results.key == key
    # by hand: the small box in the medium car is a small FP; the 45 px box on the 30 px car and
    # the medium car's own box leave the range; the 30 px car is then a small miss.
    _, _, hand = error_case
    explore.evaluate_size_range(hand, "baseline", eval_key="eval_small")
    view = hand.load_evaluation_view("eval_small")
    assert labels_with(view, "ground_truth", "eval_small") == {
        (1, 1): "fn", (1, 2): "fn", (2, 3): "fn", (2, 4): "tp", (3, 6): "fn", (4, 7): "fn"}
    assert labels_with(view, "baseline", "eval_small") == {
        (1, 0.9): "fp", (1, 0.8): "fp", (2, 0.7): "fp", (2, 0.95): "tp", (2, 0.6): "fp", (3, 0.5): "fp",
        (3, 0.4): "fp"}
    with pytest.raises(ValueError, match="no run 'nope'"):
        explore.evaluate_size_range(hand, "nope")


# ----------------------------------------------------------------------------------------
# Database hygiene


def test_rebuild_is_idempotent_and_touches_no_other_dataset(view_case):
    data_dir, runs, _ = view_case
    other = fo.Dataset("other", persistent=True, overwrite=True)
    other.add_samples([fo.Sample(filepath=f"/nonexistent/{i}.png", note=i) for i in range(3)])
    first = explore.build_dataset(data_dir, runs)
    schema, views, count = first.get_field_schema(), first.list_saved_views(), len(first)
    second = explore.build_dataset(data_dir, runs)
    assert second.name == explore.dataset_name(data_dir, "val", runs)
    assert second.name.startswith("sodlab-handmade-val-") and "baseline" in second.name
    assert len(second) == count == 5
    assert second.get_field_schema().keys() == schema.keys()
    assert second.list_saved_views() == views
    assert second.persistent
    assert fo.dataset_exists("other") and len(fo.load_dataset("other")) == 3
    assert sorted(fo.load_dataset("other").values("note")) == [0, 1, 2]
    sodlab_datasets = [n for n in fo.list_datasets() if n.startswith("sodlab-handmade")]
    assert sorted(sodlab_datasets) == [second.name, second.name + "-sr-patches"]


def test_refuses_to_replace_a_dataset_sodlab_did_not_build(view_case):
    data_dir, runs, _ = view_case
    other = fo.Dataset("other", persistent=True, overwrite=True)
    other.add_sample(fo.Sample(filepath="/nonexistent/0.png"))
    with pytest.raises(ValueError, match="not built by sodlab"):
        explore.build_dataset(data_dir, runs, name="other")
    assert len(fo.load_dataset("other")) == 1


@pytest.mark.slow  # a fresh interpreter importing FiftyOne
def test_importing_explore_turns_tracking_off_even_if_the_user_enabled_it():
    probe = ("import os, sodlab.explore, fiftyone as fo; "
             "print(fo.config.do_not_track, os.environ['FIFTYONE_DO_NOT_TRACK'])")
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "false"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split()[-2:] == ["True", "true"]

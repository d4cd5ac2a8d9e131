"""COCO evaluation: values worked out by hand, pycocotools conventions, run files and tables."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sodlab.data.coco import CocoDetection, make_transforms
from sodlab.evaluate import (
    FINE_BIN_LABELS,
    STAT_NAMES,
    coco_eval,
    evaluate_model,
    evaluate_run,
    format_fine_bins_table,
    format_table,
    predictions_to_coco_results,
)

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}]


def write_gt(path, boxes_per_image, image_size=(400, 400), categories=CATEGORIES):
    """boxes_per_image: {image_id: [(category_id, [x, y, w, h]) or (category_id, bbox, iscrowd)]}."""
    images, annotations = [], []
    for image_id, boxes in boxes_per_image.items():
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png",
                       "width": image_size[0], "height": image_size[1]})
        for category_id, bbox, *crowd in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd[0] if crowd else 0})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def perfect_results(ann_file):
    data = json.loads(ann_file.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in data["annotations"] if not a["iscrowd"]]


# Sides 5, 8, 20, 50, 100, 150 px: one object in each fine bin (8 sits on a bin edge: area 64
# belongs to 8-16 only), and in COCO terms small (5, 8, 20), medium (50) and large (100, 150).
SIDES = (5, 8, 20, 50, 100, 150)


def test_perfect_predictions_score_one_everywhere(tmp_path):
    gt = {1: [(3, [10, 10, 5, 5]), (7, [30, 30, 8, 8]), (3, [60, 60, 20, 20])],
          2: [(7, [10, 10, 50, 50]), (3, [100, 100, 100, 100])],
          3: [(7, [200, 200, 150, 150])]}
    ann_file = write_gt(tmp_path / "gt.json", gt)
    stats = coco_eval(ann_file, perfect_results(ann_file))
    for name in STAT_NAMES:
        if name != "AR1":
            assert stats[name] == pytest.approx(1.0), name
    # AR1 keeps one detection per image and class: image 1 has two cars, so car recall is 2/3,
    # person recall 3/3, and AR1 = (2/3 + 1) / 2.
    assert stats["AR1"] == pytest.approx(5 / 6)
    assert [stats["fine_bins"][b]["num_gt"] for b in FINE_BIN_LABELS] == [1, 1, 1, 1, 1, 1]
    for b in FINE_BIN_LABELS:
        assert stats["fine_bins"][b]["AP"] == pytest.approx(1.0)
        assert stats["fine_bins"][b]["AR100"] == pytest.approx(1.0)


def test_size_ranges_without_objects_are_minus_one(tmp_path):
    ann_file = write_gt(tmp_path / "gt.json", {1: [(3, [10, 10, 20, 20]), (7, [50, 50, 10, 12])]})
    stats = coco_eval(ann_file, perfect_results(ann_file))
    assert [stats["AP"], stats["APs"], stats["ARs"]] == pytest.approx([1.0, 1.0, 1.0])
    assert stats["APm"] == stats["APl"] == stats["ARm"] == stats["ARl"] == -1
    bins = stats["fine_bins"]
    assert [bins["8-16"]["AP"], bins["16-32"]["AP"]] == pytest.approx([1.0, 1.0])
    assert all(bins[b]["AP"] == -1 and bins[b]["num_gt"] == 0 for b in ("<8", "32-64", "64-128", ">128"))


def test_hand_computed_average_precision(tmp_path):
    """One class, one image, 2 ground-truth boxes (20x20, so "small").

    Detections sorted by score: 0.9 TP (IoU 0.95+ with GT A), 0.8 FP (far from both), 0.7 TP
    (IoU 0.95+ with GT B). Every IoU threshold 0.50..0.95 sees the same matches.
      cumulative TP = 1, 1, 2   FP = 0, 1, 1
      recall        = 0.5, 0.5, 1.0
      precision     = 1, 1/2, 2/3  -> made non-increasing from the right: 1, 2/3, 2/3
    COCO's 101 recall points r = 0, 0.01, ..., 1 take the precision at the first rank whose
    recall >= r: r in [0, 0.5] (51 points) -> 1; r in (0.5, 1] (50 points) -> 2/3.
      AP = (51 * 1 + 50 * 2/3) / 101 = 84.333... / 101 = 0.83498...
    """
    ann_file = write_gt(tmp_path / "gt.json", {1: [(3, [10, 10, 20, 20]), (3, [100, 100, 20, 20])]},
                        categories=CATEGORIES[:1])
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 19.5], "score": 0.9},  # IoU 390/400 = 0.975
        {"image_id": 1, "category_id": 3, "bbox": [250, 250, 20, 20], "score": 0.8},  # no overlap
        {"image_id": 1, "category_id": 3, "bbox": [100.5, 100, 19.5, 20], "score": 0.7},  # IoU 0.975
    ]
    expected = (51 + 50 * 2 / 3) / 101
    stats = coco_eval(ann_file, results)
    assert stats["AP"] == pytest.approx(expected, abs=1e-6)
    assert [stats["AP50"], stats["AP75"], stats["APs"]] == pytest.approx([expected] * 3, abs=1e-6)
    assert stats["AR100"] == pytest.approx(1.0) and stats["AR1"] == pytest.approx(0.5)
    assert stats["fine_bins"]["16-32"]["AP"] == pytest.approx(expected, abs=1e-6)
    assert results[0]["bbox"] == [10, 10, 20, 19.5] and "id" not in results[0]  # caller's list untouched


def test_ap75_of_small_objects_separates_loose_from_tight_boxes(tmp_path):
    """Two small objects (20 px) boxed at IoU 0.9 and at IoU 0.6, one medium object (50 px) exact:
    AP75s counts only the tight small box (recall 1/2 at precision 1: AP 51/101), AP50 on small
    objects (fine bin 16-32) both, and the medium object does not enter AP75s."""
    ann_file = write_gt(tmp_path / "gt.json", {1: [(3, [10, 10, 20, 20]), (3, [100, 100, 20, 20]),
                                                   (3, [200, 200, 50, 50])]}, categories=CATEGORIES[:1])
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 18], "score": 0.9},  # IoU 360/400 = 0.9
        {"image_id": 1, "category_id": 3, "bbox": [100, 100, 20, 12], "score": 0.8},  # IoU 240/400 = 0.6
        {"image_id": 1, "category_id": 3, "bbox": [200, 200, 50, 50], "score": 0.7},
    ]
    stats = coco_eval(ann_file, results)
    assert stats["AP75s"] == pytest.approx(51 / 101, abs=1e-6)
    assert stats["fine_bins"]["16-32"]["AP50"] == pytest.approx(1.0)
    assert coco_eval(ann_file, results[2:])["AP75s"] == 0.0  # small objects missed: 0, not -1
    assert coco_eval(ann_file, perfect_results(ann_file))["AP75s"] == pytest.approx(1.0)


def test_crowd_ground_truth_is_ignored_not_a_false_positive(tmp_path):
    """A 0.9 detection on a crowd region, then a 0.5 TP: the crowd hit is ignored, AP = 1.

    The same 0.9 detection where there is no ground truth is a false positive ranked first:
    recall 0, 1 with precision 0, 1/2 -> interpolated 1/2, 1/2 -> AP = 0.5 at every recall point.
    """
    crowd_box, object_box = [200, 200, 60, 60], [10, 10, 30, 30]
    results = [{"image_id": 1, "category_id": 3, "bbox": [210, 210, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 3, "bbox": object_box, "score": 0.5}]
    with_crowd = write_gt(tmp_path / "crowd.json", {1: [(3, object_box), (3, crowd_box, 1)]})
    without = write_gt(tmp_path / "plain.json", {1: [(3, object_box)]})
    assert coco_eval(with_crowd, results)["AP"] == pytest.approx(1.0)
    assert coco_eval(without, results)["AP"] == pytest.approx(0.5, abs=1e-6)
    assert coco_eval(with_crowd, results)["fine_bins"]["16-32"]["num_gt"] == 1  # crowd not counted


def test_empty_results_score_zero_where_objects_exist(tmp_path):
    ann_file = write_gt(tmp_path / "gt.json", {1: [(3, [10, 10, 20, 20])], 2: []})
    stats = coco_eval(ann_file, [])
    assert stats["AP"] == stats["APs"] == stats["AR100"] == 0.0
    assert stats["APm"] == stats["APl"] == -1
    assert stats["fine_bins"]["16-32"]["AP"] == 0.0 and stats["fine_bins"]["<8"]["AP"] == -1


def test_fine_bins_partition_ground_truth(tmp_path):
    """Boxes with sides 1..200 px: each lands in exactly one bin, bin edges included from below."""
    sides = list(range(1, 201, 3)) + [8, 16, 32, 64, 128]
    gt = {i + 1: [(3, [0, 0, s, s])] for i, s in enumerate(sides)}
    ann_file = write_gt(tmp_path / "gt.json", gt)
    bins = coco_eval(ann_file, perfect_results(ann_file))["fine_bins"]
    counts = [bins[b]["num_gt"] for b in FINE_BIN_LABELS]
    assert sum(counts) == len(sides)
    edges = [0, 8, 16, 32, 64, 128, np.inf]
    assert counts == [sum(lo <= s < hi for s in sides) for lo, hi in zip(edges[:-1], edges[1:])]


def test_annotation_id_zero_does_not_lose_true_positives(tmp_path):
    # pycocotools reads a matched ground-truth id of 0 as "unmatched"; load_coco_gt renumbers.
    ann_file = write_gt(tmp_path / "gt.json", {1: [(3, [10, 10, 20, 20])]})
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["id"] = 0
    ann_file.write_text(json.dumps(data))
    assert coco_eval(ann_file, perfect_results(ann_file))["AP"] == pytest.approx(1.0)


def test_results_errors_name_the_record(tmp_path):
    ann_file = write_gt(tmp_path / "gt.json", {1: [(3, [10, 10, 20, 20])]})
    with pytest.raises(ValueError, match=r"results\[0\]: image id 99 is not in the ground truth"):
        coco_eval(ann_file, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"results\[0\] \(image id 1\): category_id 1 "):
        coco_eval(ann_file, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_predictions_to_coco_results_maps_labels_and_boxes():
    outputs = {12: {"boxes": torch.tensor([[10.0, 20.0, 15.5, 30.25]]), "labels": torch.tensor([2]),
                    "scores": torch.tensor([0.75])},
               13: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}}
    results = predictions_to_coco_results(outputs, {1: 3, 2: 7})
    assert results == [{"image_id": 12, "category_id": 7, "bbox": [10.0, 20.0, 5.5, 10.25], "score": 0.75}]
    with pytest.raises(ValueError, match=r"image id 12: predicted label 2 has no category"):
        predictions_to_coco_results(outputs, {1: 3})


def test_format_table_in_paper_layout():
    stats = {"AP": 0.318, "AP50": 0.5214, "AP75": 0.337, "APs": 0.155, "APm": -1.0, "APl": 0.43349}
    table = format_table({"Faster R-CNN": stats})
    assert table.splitlines() == [
        "| Methods | AP 0.5:0.95 | 0.5 | 0.75 | S | M | L |",
        "|---|---|---|---|---|---|---|",
        "| Faster R-CNN | 31.8 | 52.1 | 33.7 | 15.5 | - | 43.3 |",
    ]
    with_backbones = format_table([("Ours", "ResNet-50", stats), ("Ours", "Res50-FPN", dict(stats, AP=0.351))])
    assert with_backbones.splitlines()[0] == "| Methods | Backbone | AP 0.5:0.95 | 0.5 | 0.75 | S | M | L |"
    assert with_backbones.splitlines()[3].startswith("| Ours | Res50-FPN | 35.1 |")


def test_format_fine_bins_table():
    bins = {b: {"AP": 0.1 * i, "num_gt": i} for i, b in enumerate(FINE_BIN_LABELS)}
    bins["<8"]["AP"] = -1
    table = format_fine_bins_table({"baseline": {"fine_bins": bins}})
    assert table.splitlines()[0] == (
        "| Methods | AP <8 px | AP 8-16 px | AP 16-32 px | AP 32-64 px | AP 64-128 px | AP >128 px |"
    )
    assert table.splitlines()[2] == "| baseline | - | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 |"


class BrightRegionDetector(torch.nn.Module):
    """Oracle detector: one "person" (label 2) box around the pixels brighter than 0.5, in input coordinates."""

    def forward(self, images):
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            outputs.append({"boxes": box, "labels": torch.tensor([2]), "scores": torch.tensor([0.9])})
        return outputs


def test_evaluate_run_maps_boxes_back_from_upscaled_input(tmp_path):
    (tmp_path / "val").mkdir()
    gt = {1: [(7, [10, 12, 20, 8])], 2: [(7, [30, 5, 16, 16])]}
    for image_id, [(_, (x, y, w, h))] in gt.items():
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[y:y + h, x:x + w] = 255
        Image.fromarray(pixels).save(tmp_path / "val" / f"{image_id:06d}.png")
    ann_file = write_gt(tmp_path / "gt.json", gt, image_size=(64, 64))
    dataset = CocoDetection(tmp_path / "val", ann_file, make_transforms(train=False, scale=2.0))
    model = BrightRegionDetector().train()

    results, outputs = evaluate_model(model, dataset, batch_size=2, progress=False)
    assert model.training  # mode restored
    assert outputs[1]["boxes"][0].tolist() == pytest.approx([10, 12, 30, 20], abs=0.5)
    assert outputs[2]["boxes"][0].tolist() == pytest.approx([30, 5, 46, 21], abs=0.5)
    assert {r["category_id"] for r in results} == {7}  # label 2 -> the dataset's category id 7

    run_dir = tmp_path / "runs" / "oracle"
    stats = evaluate_run(run_dir, model, dataset, progress=False)
    assert stats["AP50"] == pytest.approx(1.0)
    assert json.loads((run_dir / "eval.json").read_text()) == stats
    assert json.loads((run_dir / "detections_val.json").read_text()) == results
    assert set(STAT_NAMES) | {"AP75s", "fine_bins", "errors", "tiny", "inference"} == set(stats)
    assert stats["inference"] == {"mode": "whole image"}

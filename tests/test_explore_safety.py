"""Issue 17, explore: hostile run names, same-named data folders, off-image ground truth, paths.

Uses test_explore's private FiftyOne database and its hand-written COCO splits.
"""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from test_explore import CATEGORIES, det, explore, fo, gt, image_record, write_coco_split, write_run


@pytest.mark.parametrize("run_name, field", [
    ("SR-x4", "sr_x4"), ("exp--2", "exp_2"), ('"quoted"', "quoted"), ("ëxp", "xp"),
    ("x; rm -rf ~", "x_rm_rf"), ("2021-run", "run_2021_run"), ("___", "run"), ("日本", "run"),
])
def test_field_names_are_valid_mongo_fields(run_name, field):
    assert explore.field_name(run_name) == field
    assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", field)  # no "__", no trailing "_"


@pytest.mark.slow
def test_hostile_run_names_build_with_distinct_fields(tmp_path):
    """`exp--2` crashed the build with mongoengine's LookUpError ("__" reads as a lookup)."""
    images = [image_record(1, 64, 48)]
    annotations = [gt(1, 1, 1, [10, 10, 12, 12])]
    data_dir = write_coco_split(tmp_path / "names", images, annotations, CATEGORIES)
    names = ["exp--2", "exp-2", "exp_2", '"quoted"', "ëxp", "x; rm -rf ~"]
    runs = [write_run(tmp_path / "runs", name, "baseline", [det(1, 1, [10, 10, 12, 12], 0.9)]) for name in names]
    dataset = explore.build_dataset(data_dir, runs)
    fields = list(dataset.info["sodlab"]["runs"])
    assert len(set(fields)) == len(names)
    assert sorted(fields[:3]) == sorted(f"exp_2_{explore._path_hash(r)}" for r in runs[:3])
    assert fields[3:] == ["quoted", "xp", "x_rm_rf"]
    schema = dataset.get_field_schema()
    for field in fields:
        assert "__" not in field and field in schema
        assert dataset.values(f"small_tp_{field}") == [1]  # each run evaluated on its own


def _one_image_split(root, n_images: int):
    images = [image_record(i, 40, 40) for i in range(1, n_images + 1)]
    annotations = [gt(i, i, 1, [5, 5, 10, 10]) for i in range(1, n_images + 1)]
    return write_coco_split(root, images, annotations, CATEGORIES)


@pytest.mark.slow
def test_data_folders_of_one_name_keep_their_own_datasets(tmp_path):
    """Two folders called "synth" used to share the name sodlab-synth-val and replace each other."""
    first = _one_image_split(tmp_path / "a" / "synth", 2)
    second = _one_image_split(tmp_path / "b" / "synth", 3)
    run = write_run(tmp_path / "runs", "baseline", "baseline", [det(1, 1, [5, 5, 10, 10], 0.9)])
    assert explore.dataset_name(first, "val", [run]) != explore.dataset_name(second, "val", [run])
    built_first = explore.build_dataset(first, [run])
    built_second = explore.build_dataset(second, [run])
    assert built_first.name.startswith("sodlab-synth-val-baseline-")
    assert fo.dataset_exists(built_first.name) and fo.dataset_exists(built_second.name)
    assert len(fo.load_dataset(built_first.name)) == 2 and len(fo.load_dataset(built_second.name)) == 3
    # Rebuilding from another spelling of the same folder replaces its own dataset only.
    again = explore.build_dataset(tmp_path / "a" / ".." / "a" / "synth", [run])
    assert again.name == built_first.name and len(fo.load_dataset(built_second.name)) == 3


def test_off_image_ground_truth_follows_the_training_and_evaluation_policy(tmp_path):
    images = [image_record(1, 100, 80)]
    annotations = [
        gt(1, 1, 1, [10, 10, 20, 20]),
        gt(2, 1, 1, [150, 10, 20, 20]),   # entirely outside: dropped
        gt(3, 1, 1, [190, 90, 5, 5]),     # entirely outside: dropped
        gt(4, 1, 1, [90, 70, 30, 30]),    # partly outside: clipped to 10x10
    ]
    data_dir = write_coco_split(tmp_path / "offimage", images, annotations, CATEGORIES)
    ann_file = data_dir / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"].append({"id": 5, "image_id": 1, "category_id": 1, "bbox": [5, 5, None, 10]})  # no area
    ann_file.write_text(json.dumps(coco))
    # The perfect detector: the objects as they are in the image.
    run = write_run(tmp_path / "runs", "baseline", "baseline",
                    [det(1, 1, [10, 10, 20, 20], 0.9), det(1, 1, [90, 70, 10, 10], 0.8)])
    with pytest.warns(UserWarning, match=r"instances_val\.json: skipped 3 degenerate annotation\(s\) from the "
                                         r"FiftyOne ground truth \(2 outside their image, 1 with a null.*\); "
                                         r"clipped 1 box"):
        dataset = explore.build_dataset(data_dir, [run])
    detections = dataset.first().ground_truth.detections
    assert sorted(d.annotation_id for d in detections) == [1, 4]
    clipped = next(d for d in detections if d.annotation_id == 4)
    assert clipped.bounding_box == pytest.approx([0.9, 70 / 80, 0.1, 10 / 80])
    assert [d.eval_baseline for d in detections] == ["tp", "tp"]


def test_file_name_leaving_the_split_folder_is_refused(tmp_path):
    data_dir = write_coco_split(tmp_path / "paths", [image_record(1, 20, 20)], [], CATEGORIES)
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "outside" / "x.png")
    ann_file = data_dir / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["images"][0]["file_name"] = "../../outside/x.png"
    ann_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances_val\.json: image id 1: file_name '\.\./\.\./outside/x\.png' "
                                         r"leaves the split folder"):
        explore.build_dataset(data_dir, [])

"""Tests of the embedded small-object benchmark generator (sodlab.data.synth)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sodlab.data import synth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 images with x4 twins, made with 2 workers."""
    out = tmp_path_factory.mktemp("tiny") / "ds"
    summary = synth.generate(out, n_train=4, n_val=2, seed=0, hr_scale=4, workers=2, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def fifty(tmp_path_factory):
    """50 images without twins: enough to measure the size distribution."""
    out = tmp_path_factory.mktemp("fifty") / "ds"
    summary = synth.generate(out, n_train=46, n_val=4, seed=7, workers=2, progress=False)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_lr(root: Path, split: str, image_id: int) -> np.ndarray:
    return np.asarray(Image.open(root / split / f"{image_id:06d}.png"))


def _plain_scene(objects: list[dict], size: int = 64) -> dict:
    """A scene with a flat grey background, no clutter, no blur and no noise."""
    background = {
        "corners": [[128.0, 128.0, 128.0]] * 4,
        "coarse_cells": 2,
        "coarse_seed": 0,
        "coarse_amplitude": 0.0,
        "texture_cells": 4,
        "texture_seed": 0,
        "texture_amplitude": 0.0,
        "stripes": None,
    }
    return {
        "version": synth.SYNTH_VERSION,
        "size": [size, size],
        "background": background,
        "objects": objects,
        "distractors": [],
        "blur_sigma": 0.0,
        "noise_sigma": 0.0,
        "noise_seed": 0,
    }


def _square(cx: float, cy: float, extent: float, colour=(255, 0, 0)) -> dict:
    return {"category": "square", "cx": cx, "cy": cy, "extent": extent, "rotation": 0.0, "detail": 0.0,
            "colour": list(colour)}


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_for_any_worker_count(tiny, tmp_path):
    first, _ = tiny
    again = synth.generate(tmp_path / "again", 4, 2, seed=0, hr_scale=4, workers=2, progress=False)
    single = synth.generate(tmp_path / "single", 4, 2, seed=0, hr_scale=4, workers=1, progress=False)
    reference = _files(first)
    # Every kind of file is covered: LR images, twins, scenes and instances json.
    assert {Path(name).parts[0] for name in reference} == {"annotations", "train", "val", "train_x4", "val_x4",
                                                            "train_x2", "val_x2"}
    assert len(reference) == 4 + 6 + 6 + 6
    assert _files(Path(again["out_dir"])) == reference
    assert _files(Path(single["out_dir"])) == reference


def test_another_seed_gives_other_images(tiny, tmp_path):
    first, _ = tiny
    synth.generate(tmp_path / "other", 1, 0, seed=1, workers=1, progress=False)
    assert (tmp_path / "other/train/000001.png").read_bytes() != (first / "train/000001.png").read_bytes()


def test_train_and_val_draw_from_different_streams(tiny):
    root, _ = tiny
    assert not np.array_equal(_load_lr(root, "train", 1), _load_lr(root, "val", 1))


# ------------------------------------------------------------------------------------------------
# Size distribution and counts
# ------------------------------------------------------------------------------------------------


def test_size_buckets_follow_the_coco_targets(fifty):
    root, summary = fifty
    areas = []
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        areas += [a["area"] for a in coco["annotations"]]
    areas = np.array(areas)
    small = np.mean(areas < 32**2)
    medium = np.mean((areas >= 32**2) & (areas <= 96**2))
    large = np.mean(areas > 96**2)
    assert small >= 0.5, small
    assert medium >= 0.25, medium
    assert large > 0, large
    # The summary reports the same fractions the json holds.
    assert summary["size_fractions"]["small"] == pytest.approx(small)
    assert summary["size_fractions"]["large"] == pytest.approx(large)
    assert summary["objects"] == len(areas)


def test_every_image_has_5_to_30_objects(fifty):
    root, summary = fifty
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    per_image = {image["id"]: 0 for image in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
    assert len(per_image) == 46
    assert min(per_image.values()) >= 5
    assert max(per_image.values()) <= 30
    assert summary["splits"]["train"] == {"images": 46, "objects": len(coco["annotations"])}


def test_small_objects_include_tiny_ones(fifty):
    root, _ = fifty
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    extents = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]])
    # The hard end of the benchmark: objects a few pixels across.
    assert np.mean(extents < 8) > 0.1
    assert extents.min() >= 2


# ------------------------------------------------------------------------------------------------
# Twins
# ------------------------------------------------------------------------------------------------


def test_area_reduced_x4_twin_reproduces_the_lr_image(tiny):
    root, _ = tiny
    for split, n in (("train", 4), ("val", 2)):
        for image_id in range(1, n + 1):
            twin = np.asarray(Image.open(root / f"{split}_x4" / f"{image_id:06d}.png"))
            lr = _load_lr(root, split, image_id)
            assert twin.shape == (1024, 1024, 3) and lr.shape == (256, 256, 3)
            diff = np.abs(synth.area_downsample(twin, 4).astype(int) - lr.astype(int))
            assert diff.max() <= 1, (split, image_id, diff.max())


def test_render_twin_rerenders_from_the_stored_scene(fifty, tiny):
    # Without written twins, the x4 twin comes from scenes_train.json and still reduces to LR.
    root, _ = fifty
    assert not (root / "train_x4").exists()
    twin = synth.render_twin(root, "train", 3, 4)
    assert np.array_equal(synth.area_downsample(twin, 4), _load_lr(root, "train", 3))
    # With written twins, reading and re-rendering agree exactly.
    tiny_root, _ = tiny
    scenes = json.loads((tiny_root / "annotations" / "scenes_val.json").read_text())
    rerendered, _ = synth.render_scene(scenes["scenes"]["2"], 4)
    assert np.array_equal(synth.render_twin(tiny_root, "val", 2, 4), rerendered)
    assert np.array_equal(synth.render_twin(tiny_root, "val", 2, 1), _load_lr(tiny_root, "val", 2))


def test_twin_at_another_scale_shows_the_same_scene(fifty):
    root, _ = fifty
    lr = _load_lr(root, "train", 5).astype(float)
    twin2 = synth.render_twin(root, "train", 5, 2)
    assert twin2.shape == (512, 512, 3)
    # Not bit-exact (shape edges are sampled on another grid) but the same picture.
    assert np.abs(synth.area_downsample(twin2, 2).astype(float) - lr).mean() < 1.5


def test_x4_twins_serve_x2_as_their_area_average(tiny, tmp_path):
    """A split with only x4 twins loads x2 twins as the x4 ones area-averaged by 2, which reduce
    to the LR image (up to uint8 rounding); written x2 twins come first, and a scale that divides
    no written twin is refused with the folder it looked for."""
    from sodlab.data.coco import load_split, twin_source

    # data whose only twins are x4 (converted with --twins 4, or synthesized before synth wrote x2)
    root = tmp_path / "only-x4"
    shutil.copytree(tiny[0], root)
    for split in ("train", "val"):
        shutil.rmtree(root / f"{split}_x2")
    assert twin_source(root, "val", 2) == (root / "val_x4", 2)
    assert twin_source(root, "val", 4) == (root / "val_x4", 1)
    assert twin_source(root, "val", 3) is None
    _, target = load_split(root, "val", train=False, hr_scale=2)[0]
    twin2 = (target["hr_image"] * 255).round().byte().permute(1, 2, 0).numpy()  # the loader gives floats in [0, 1]
    x4 = np.asarray(Image.open(root / "val_x4" / "000001.png").convert("RGB"))
    assert np.array_equal(twin2, synth.area_downsample(x4, 2))
    assert np.abs(synth.area_downsample(twin2, 2).astype(int) - _load_lr(root, "val", 1).astype(int)).max() <= 1
    assert np.array_equal(synth.render_twin(root, "val", 1, 2), twin2)
    with pytest.raises(FileNotFoundError, match="val_x3"):
        load_split(root, "val", train=False, hr_scale=3)

    written = tmp_path / "written"
    shutil.copytree(root, written)
    (written / "val_x2").mkdir()
    Image.fromarray(np.zeros_like(twin2)).save(written / "val_x2" / "000001.png")
    assert twin_source(written, "val", 2) == (written / "val_x2", 1)
    _, target = load_split(written, "val", train=False, hr_scale=2)[0]
    assert int(target["hr_image"].max()) == 0


def test_synth_writes_the_x4_twins_area_averages_at_x2(tiny):
    """Beside the x4 twins synth writes x2 ones, the x4 twins area-averaged by 2 pixel for pixel:
    what the loader would make of the x4 twins, read from a file four times smaller."""
    root, _ = tiny
    assert synth.reduced_twin_scales(4) == [2] and synth.reduced_twin_scales(6) == [2, 3]
    assert synth.reduced_twin_scales(3) == [] and synth.reduced_twin_scales(2) == []
    for split in ("train", "val"):
        names = sorted(p.name for p in (root / f"{split}_x4").iterdir())
        assert names and names == sorted(p.name for p in (root / f"{split}_x2").iterdir())
        for name in names:
            x4 = np.asarray(Image.open(root / f"{split}_x4" / name).convert("RGB"))
            x2 = np.asarray(Image.open(root / f"{split}_x2" / name).convert("RGB"))
            assert np.array_equal(x2, synth.area_downsample(x4, 2))


def test_render_twin_names_the_missing_image(tiny):
    root, _ = tiny
    with pytest.raises(KeyError, match="999"):
        synth.render_twin(root, "train", 999, 2)


def test_area_downsample_rounds_block_means_half_up():
    img = np.array([[0, 1, 10, 10], [2, 3, 10, 11], [255, 255, 0, 0], [255, 254, 0, 1]], np.uint8)
    # Block means 1.5, 10.25, 254.75, 0.25.
    assert synth.area_downsample(img, 2).tolist() == [[2, 10], [255, 0]]
    assert synth.area_downsample(img.astype(np.float32), 2).tolist() == [[1.5, 10.25], [254.75, 0.25]]
    with pytest.raises(ValueError, match="not divisible"):
        synth.area_downsample(img[:3], 2)


# ------------------------------------------------------------------------------------------------
# Boxes and areas
# ------------------------------------------------------------------------------------------------


def test_axis_aligned_square_has_the_hand_computed_box_and_area():
    # Square of side 10 centred at (20, 30): it covers x in [15, 25], y in [25, 35].
    scene = _plain_scene([_square(20.0, 30.0, 10.0)])
    image, visible = synth.render_scene(scene, 4)
    bbox, area = synth.visible_box_and_area(visible[0]["window"], visible[0]["mask"], 4)
    assert bbox == [15.0, 25.0, 10.0, 10.0]
    assert area == 100.0
    lr = synth.area_downsample(image, 4)
    assert lr[30, 20].tolist() == [255, 0, 0] and lr[30, 10].tolist() == [128, 128, 128]


def test_later_object_occludes_earlier_one():
    # The second square covers x >= 20 of the first one: half of it stays visible.
    scene = _plain_scene([_square(20.0, 20.0, 10.0), _square(25.0, 20.0, 10.0, colour=(0, 0, 255))])
    _, visible = synth.render_scene(scene, 4)
    first = synth.visible_box_and_area(visible[0]["window"], visible[0]["mask"], 4)
    second = synth.visible_box_and_area(visible[1]["window"], visible[1]["mask"], 4)
    assert first == ([15.0, 15.0, 5.0, 10.0], 50.0)
    assert second == ([20.0, 15.0, 10.0, 10.0], 100.0)
    assert visible[0]["visible_pixels"] * 2 == visible[0]["drawn_pixels"]


DETAILS = {"ring": 0.3, "frame": 0.3, "notched_disk": 90.0, "slashed_square": 0.1, "cross": 0.3}


def test_every_class_has_its_designed_area():
    # At a fine render scale the pixel count converges to the analytic area: this checks each
    # class's geometry (the hole, the notch, the slash) really is drawn.
    for category in synth.CLASS_NAMES:
        detail = DETAILS.get(category, 0.0)
        obj = {"category": category, "cx": 32.0, "cy": 32.0, "extent": 30.0, "rotation": 17.0, "detail": detail,
               "colour": [0, 0, 0]}
        _, visible = synth.render_scene(_plain_scene([obj]), 8)
        expected = synth._fill_fraction(category, detail) * 30.0**2
        assert visible[0]["visible_pixels"] / 64 == pytest.approx(expected, rel=0.03), category


def test_stored_boxes_are_tight_around_the_rerendered_visible_mask(tiny):
    root, _ = tiny
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    scenes = json.loads((root / "annotations" / "scenes_train.json").read_text())
    checked = 0
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        scene = scenes["scenes"][str(image["id"])]
        _, visible = synth.render_scene(scene, 4)
        # Scene objects and annotations correspond one to one, in order.
        assert len(anns) == len(scene["objects"]) == len(visible)
        for ann, obj, vis in zip(anns, scene["objects"], visible):
            assert ann["category_id"] == synth.CLASS_NAMES.index(obj["category"]) + 1
            full = np.zeros((1024, 1024), bool)
            x0, y0, x1, y1 = vis["window"]
            full[y0:y1, x0:x1] = vis["mask"]
            ys, xs = np.nonzero(full)
            box = [xs.min() / 4, ys.min() / 4, (xs.max() + 1 - xs.min()) / 4, (ys.max() + 1 - ys.min()) / 4]
            assert ann["bbox"] == box, ann["id"]
            assert ann["area"] == full.sum() / 16, ann["id"]
            assert full.sum() >= 0.5 * vis["drawn_pixels"], ann["id"]  # mostly hidden ones are dropped
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256 and w > 0 and h > 0
            checked += 1
    assert checked > 20


# ------------------------------------------------------------------------------------------------
# COCO format
# ------------------------------------------------------------------------------------------------


def test_annotations_load_with_pycocotools(tiny):
    root, _ = tiny
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    assert coco.getCatIds() == list(range(1, 9))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synth.CLASS_NAMES)
    assert {c["supercategory"] for c in coco.loadCats(coco.getCatIds())} == {"shape"}
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4]
    image = coco.loadImgs(1)[0]
    assert image == {"id": 1, "file_name": "000001.png", "width": 256, "height": 256}
    ann_ids = sorted(coco.getAnnIds())
    assert ann_ids == list(range(1, len(ann_ids) + 1))  # unique across the split, from 1
    assert {a["iscrowd"] for a in coco.loadAnns(ann_ids)} == {0}
    params = coco.dataset["info"]["sodlab_synth"]
    expected = {"seed": 0, "size": [256, 256], "render_scale": 4, "hr_scale": 4, "num_classes": 8}
    assert params == {**expected, "version": synth.SYNTH_VERSION}


def test_ground_truth_as_detections_scores_perfectly_in_cocoeval(tiny):
    from pycocotools.cocoeval import COCOeval

    root, _ = tiny
    gt = COCO(str(root / "annotations" / "instances_train.json"))
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP
    assert evaluator.stats[3] == pytest.approx(1.0)  # AP small: small objects exist and match


def test_scene_files_are_keyed_by_image_id(tiny):
    root, _ = tiny
    doc = json.loads((root / "annotations" / "scenes_val.json").read_text())
    assert doc["render_scale"] == 4
    assert sorted(doc["scenes"]) == ["1", "2"]
    scene = doc["scenes"]["1"]
    assert scene["size"] == [256, 256]
    assert {"category", "cx", "cy", "extent", "rotation", "colour"} <= set(scene["objects"][0])


def test_sample_scene_is_json_roundtrippable_and_seeded():
    a = synth.sample_scene(np.random.default_rng(3), size=(96, 64))
    b = synth.sample_scene(np.random.default_rng(3), size=(96, 64))
    assert a == b == json.loads(json.dumps(a))
    image, visible = synth.render_scene(a, 2)
    assert image.shape == (128, 192, 3) and image.dtype == np.uint8
    assert len(visible) == len(a["objects"])


# ------------------------------------------------------------------------------------------------
# Refusing to overwrite
# ------------------------------------------------------------------------------------------------


def test_refuses_a_non_empty_directory_unless_told(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=str(out)):
        synth.generate(out, 1, 0, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written


def test_overwrite_replaces_the_old_dataset_and_keeps_other_files(tmp_path):
    out = tmp_path / "ds"
    synth.generate(out, 3, 1, seed=0, hr_scale=2, workers=1, progress=False)
    (out / "notes.txt").write_text("mine")
    synth.generate(out, 1, 1, seed=5, workers=1, progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.png"]
    assert not (out / "train_x2").exists()  # stale twins would no longer match
    assert (out / "notes.txt").read_text() == "mine"
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert coco["info"]["sodlab_synth"]["seed"] == 5


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hr_scale"):
        synth.generate(tmp_path / "a", 1, 0, hr_scale=1, progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        synth.generate(tmp_path / "b", -1, 0, progress=False)
    with pytest.raises(ValueError, match="at least 16x16"):
        synth.sample_scene(np.random.default_rng(0), size=8)


def test_fill_fractions_match_hand_values():
    assert synth._fill_fraction("disk", 0.0) == pytest.approx(math.pi / 4)
    assert synth._fill_fraction("frame", 0.5) == pytest.approx(0.75)
    assert synth._fill_fraction("cross", 0.5) == pytest.approx(0.75)
    assert synth._fill_fraction("notched_disk", 90.0) == pytest.approx(math.pi / 4 * 0.75)

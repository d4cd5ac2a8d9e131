"""VOC / YOLO / VisDrone -> COCO conversion and HR twins from real images (sodlab.data.convert).

Each format gets a hand-written dataset with an ignore region, round-tripped through the COCO
json, CocoDetection (training targets) and COCOeval (crowd regions ignored).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodlab.data.coco import CocoDetection, load_split, read_rgb_image
from sodlab.data.convert import VISDRONE_CLASSES, convert, convert_visdrone, convert_voc, make_twins
from sodlab.evaluate import coco_eval

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "hit-uav-voc"


def _noise(height, width, channels=None, seed=0, dtype=np.uint8, high=256):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def _json(out, split):
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def _voc_object(name, box, difficult=0):
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def write_voc(root, objects_a, objects_b=(), size_a=(64, 48)):
    """Two images: a.jpg (RGB) in train, b.png (grayscale) in val; plus a per-class list VOC ships."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(size_a[1], size_a[0], 3)).save(root / "JPEGImages" / "a.jpg", quality=95)
    Image.fromarray(_noise(40, 50, seed=1)).save(root / "JPEGImages" / "b.png")
    for stem, (w, h), objects in (("a", size_a, objects_a), ("b", (50, 40), objects_b)):
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{''.join(objects)}</annotation>")
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    (root / "ImageSets/Main/val.txt").write_text("b\n\n")
    (root / "ImageSets/Main/Person_train.txt").write_text("a  1\n")  # a class list, not a split
    return root


VOC_A = [_voc_object("Person", (11, 6, 20, 25)), _voc_object("DontCare", (31, 1, 50, 20)),
         _voc_object("Car", (41, 31, 60, 45), difficult=1), _voc_object("Car", (1, 30, 15, 40))]
VOC_B = [_voc_object("Person", (5, 5, 14, 24))]


def test_voc_round_trip_one_based(tmp_path):
    src = write_voc(tmp_path / "voc", VOC_A, VOC_B)
    summary = convert_voc(src, tmp_path / "out")
    out = tmp_path / "out"
    # No xmin or ymin is 0: the VOC devkit's 1-based inclusive indices. x = xmin - 1, w = xmax - xmin + 1.
    assert summary["coordinates"] == "one-based"
    assert summary["categories"] == ["Car", "Person"]  # sorted, DontCare is not a class
    assert sorted(summary["splits"]) == ["train", "val"]  # Person_train.txt is a class list
    train = _json(out, "train")
    assert train["categories"] == [{"id": 1, "name": "Car", "supercategory": ""},
                                   {"id": 2, "name": "Person", "supercategory": ""}]
    assert train["images"] == [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]
    anns = [(a["category_id"], a["bbox"], a["iscrowd"], a.get("ignore_region", False)) for a in train["annotations"]]
    assert anns == [
        (2, [10.0, 5.0, 10.0, 20.0], 0, False),
        (1, [30.0, 0.0, 20.0, 20.0], 1, True),  # DontCare: one crowd copy per category
        (2, [30.0, 0.0, 20.0, 20.0], 1, True),
        (1, [40.0, 30.0, 20.0, 15.0], 1, False),  # difficult: crowd of its own class
        (1, [0.0, 29.0, 15.0, 11.0], 0, False),
    ]
    assert [a["id"] for a in train["annotations"]] == [1, 2, 3, 4, 5]
    assert summary["splits"]["train"] == {"images": 1, "objects": 2, "crowd_annotations": 3, "ignore_regions": 1,
                                          "difficult": 1, "clipped_boxes": 0}
    assert (out / "train" / "a.jpg").is_symlink() and (out / "train" / "a.jpg").resolve() == (
        src / "JPEGImages" / "a.jpg").resolve()

    # Training targets: crowd left out; the grayscale val image is read as RGB.
    dataset = CocoDetection(out / "train", out / "annotations" / "instances_train.json")
    image, target = dataset[0]
    assert image.shape == (3, 48, 64) and dataset.num_crowd == 3
    assert target["boxes"].tolist() == [[10, 5, 20, 25], [0, 29, 15, 40]]
    assert target["labels"].tolist() == [2, 1]
    val = load_split(out, "val", train=False)
    assert val[0][0].shape == (3, 40, 50) and val[0][1]["boxes"].tolist() == [[4, 4, 14, 24]]


def test_voc_ignore_region_and_difficult_are_ignored_by_coco_eval(tmp_path):
    out = tmp_path / "out"
    convert_voc(write_voc(tmp_path / "voc", VOC_A, VOC_B), out)
    ann_file = out / "annotations" / "instances_train.json"
    truth = [{"image_id": 1, "category_id": c, "bbox": b, "score": 0.9}
             for c, b in ((2, [10, 5, 10, 20]), (1, [0, 29, 15, 11]))]
    assert coco_eval(ann_file, truth)["AP"] == pytest.approx(1.0)
    # Confident detections of either class inside the DontCare region, and of the difficult car,
    # are neither true nor false positives.
    ignored = [{"image_id": 1, "category_id": c, "bbox": b, "score": 0.99}
               for c, b in ((1, [32, 2, 10, 10]), (2, [35, 5, 12, 12]), (1, [40, 30, 20, 15]))]
    assert coco_eval(ann_file, truth + ignored)["AP"] == pytest.approx(1.0)
    # The same detection outside any ignore region is a false positive that outranks the truth.
    stray = [{"image_id": 1, "category_id": 2, "bbox": [50, 30, 10, 10], "score": 0.99}]
    assert coco_eval(ann_file, truth + stray)["AP"] < 1.0


def test_voc_zero_based_detected_and_overridable(tmp_path):
    src = write_voc(tmp_path / "voc", [_voc_object("Person", (0, 6, 20, 25)), _voc_object("Car", (10, 10, 64, 48))])
    summary = convert_voc(src, tmp_path / "auto")
    assert summary["coordinates"] == "zero-based"
    assert [a["bbox"] for a in _json(tmp_path / "auto", "train")["annotations"]] == [[0, 6, 20, 19], [10, 10, 54, 38]]
    assert _json(tmp_path / "auto", "train")["info"]["sodlab_convert"]["coordinates"] == "zero-based"
    convert_voc(src, tmp_path / "one", coordinates="one-based", splits=["train"], class_names=["Person", "Car"])
    one = _json(tmp_path / "one", "train")
    assert [c["name"] for c in one["categories"]] == ["Person", "Car"]
    # xmin 0 under one-based indices starts a pixel left of the image: clipped, and counted.
    assert [a["bbox"] for a in one["annotations"]] == [[0, 5, 20, 20], [9, 9, 55, 39]]
    assert not (tmp_path / "one" / "val").exists()


def write_yolo(root):
    """train: x.png (16-bit grayscale) and sub/y.jpg (8-bit grayscale, no label file); names with DontCare."""
    (root / "images" / "train" / "sub").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.fromarray(_noise(50, 80, dtype=np.uint16, high=65536)).save(root / "images" / "train" / "x.png")
    Image.fromarray(_noise(30, 40, seed=2)).save(root / "images" / "train" / "sub" / "y.jpg")
    # class 0 person at (10..30, 5..25); class 2 DontCare at (40..80, 0..50); class 1 bike half outside
    (root / "labels" / "train" / "x.txt").write_text(
        "0 0.25 0.3 0.25 0.4\n\n2 0.75 0.5 0.5 1.0\n1 0.9375 0.5 0.25 0.2\n")
    (root / "names.txt").write_text("person\nbike\nDontCare\n")
    return root


def test_yolo_round_trip_with_16_bit_and_grayscale_images(tmp_path):
    src = write_yolo(tmp_path / "yolo")
    out = tmp_path / "out"
    summary = convert("yolo", src, out, names=src / "names.txt", copy=True)
    assert summary["categories"] == ["person", "bike"]
    coco = _json(out, "train")
    assert [i["file_name"] for i in coco["images"]] == ["sub/y.jpg", "x.png"]
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(40, 30), (80, 50)]
    anns = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"]]
    assert anns == [(2, 1, [10.0, 5.0, 20.0, 20.0], 0), (2, 1, [40.0, 0.0, 40.0, 50.0], 1),
                    (2, 2, [40.0, 0.0, 40.0, 50.0], 1), (2, 2, [65.0, 20.0, 15.0, 10.0], 0)]
    assert summary["splits"]["train"]["clipped_boxes"] == 1
    assert not (out / "train" / "x.png").is_symlink()  # copy=True

    dataset = load_split(out, "train", train=False)
    for index, image_id in enumerate(dataset.ids):
        image, target = dataset[index]
        native = np.asarray(Image.open(out / "train" / dataset.images[image_id]["file_name"]), dtype=np.float64)
        if image_id == 2:  # 16-bit: rescaled to 8 bits, not clipped
            assert target["boxes"].tolist() == [[10, 5, 30, 25], [65, 20, 80, 30]]
            expected = np.clip(np.rint(native / 257), 0, 255)
        else:
            expected = native
        assert image.shape[0] == 3 and torch.equal(image[0], image[2])
        assert np.array_equal(np.rint(image[0].numpy() * 255), expected)


def write_visdrone(root):
    split = root / "VisDrone2019-DET-val"
    (split / "images").mkdir(parents=True)
    (split / "annotations").mkdir()
    Image.fromarray(_noise(60, 100, 3)).save(split / "images" / "0000001_00000_d_0000001.jpg")
    (split / "annotations" / "0000001_00000_d_0000001.txt").write_text(
        "10,20,8,16,1,1,0,1\n"  # pedestrian
        "50,5,30,20,1,4,1,0,\n"  # car (a trailing comma, as some files have)
        "0,40,40,20,0,0,0,0\n"  # ignored region
        "60,30,10,10,1,11,0,2\n")  # others
    return root


def test_visdrone_round_trip(tmp_path):
    out = tmp_path / "out"
    summary = convert_visdrone(write_visdrone(tmp_path / "vd"), out)
    assert list(summary["splits"]) == ["val"]
    coco = _json(out, "val")
    assert [c["name"] for c in coco["categories"]] == list(VISDRONE_CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))  # VisDrone's own ids
    objects = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert [(a["category_id"], a["bbox"], a["truncation"], a["occlusion"]) for a in objects] == [
        (1, [10, 20, 8, 16], 0, 1), (4, [50, 5, 30, 20], 1, 0)]
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    # The ignored region and the "others" object: each an ignore region for all ten classes.
    assert len(crowd) == 20 and all(a["ignore_region"] for a in crowd)
    assert sorted({tuple(a["bbox"]) for a in crowd}) == [(0, 40, 40, 20), (60, 30, 10, 10)]
    assert sorted(a["category_id"] for a in crowd if a["visdrone_category"] == 0) == list(range(1, 11))
    assert summary["splits"]["val"]["ignore_regions"] == 2
    dataset = load_split(out, "val", train=False)
    assert dataset[0][1]["labels"].tolist() == [1, 4] and dataset.num_crowd == 20
    # A detection of any class on the ignored region costs nothing.
    truth = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5} for a in objects]
    on_ignored = [{"image_id": 1, "category_id": 6, "bbox": [5, 42, 20, 15], "score": 0.9}]
    assert coco_eval(out / "annotations" / "instances_val.json", truth + on_ignored)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("fmt, edit, message", [
    ("voc", lambda r: (r / "Annotations/a.xml").write_text(
        "<annotation>" + _voc_object("Person", (11, 6, 20, 25)) + _voc_object("Car", (30, 6, 20, 25))
        + "</annotation>"), r"a\.xml: object 2 \('Car'\): empty box"),
    ("voc", lambda r: (r / "Annotations/a.xml").write_text(
        "<annotation>" + _voc_object("Person", (11, 6, "abc", 25)) + "</annotation>"),
     r"a\.xml: object 1 \('Person'\): xmax 'abc' is not a number"),
    ("voc", lambda r: (r / "Annotations/a.xml").write_text(
        "<annotation><object><name>Car</name></object></annotation>"), r"a\.xml: object 1 \('Car'\): missing <bndbox>"),
    ("voc", lambda r: (r / "Annotations/a.xml").write_text("<annotation><object>"), r"a\.xml: invalid XML"),
    ("voc", lambda r: (r / "Annotations/a.xml").write_text(
        "<annotation><size><width>60</width><height>48</height></size></annotation>"),
     r"a\.xml: <size> says 60x48 but a\.jpg is 64x48"),
    ("voc", lambda r: (r / "Annotations/a.xml").write_text(
        "<annotation>" + _voc_object("Person", (70, 6, 80, 25)) + "</annotation>"),
     r"a\.xml: object 1 \('Person'\): box .* lies outside the 64x48 image"),
    ("yolo", lambda r: (r / "labels/train/x.txt").write_text("0 0.5 0.5 0.1\n"),
     r"x\.txt: line 1: expected 'class cx cy w h' \(5 values\), got 4"),
    ("yolo", lambda r: (r / "labels/train/x.txt").write_text("0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.1 0.1\n"),
     r"x\.txt: line 2: class '3' is not an index of the 3 class names"),
    ("yolo", lambda r: (r / "labels/train/x.txt").write_text("1 0.5 0.5 0 0.1\n"),
     r"x\.txt: line 1 \('bike'\): empty box"),
    ("visdrone", lambda r: (r / "VisDrone2019-DET-val/annotations/0000001_00000_d_0000001.txt").write_text(
        "1,2,3,4,1,1,0\n"), r"0000001_00000_d_0000001\.txt: line 1: expected 8 comma-separated values"),
    ("visdrone", lambda r: (r / "VisDrone2019-DET-val/annotations/0000001_00000_d_0000001.txt").write_text(
        "10,20,8,16,1,1,0,1\n10,20,8,16,1,12,0,1\n"),
     r"0000001_00000_d_0000001\.txt: line 2: object_category '12' is not 0\.\.11"),
])
def test_bad_records_are_one_line_errors_naming_file_and_object(tmp_path, fmt, edit, message):
    src = {"voc": lambda: write_voc(tmp_path / "src", VOC_A, VOC_B), "yolo": lambda: write_yolo(tmp_path / "src"),
           "visdrone": lambda: write_visdrone(tmp_path / "src")}[fmt]()
    edit(src)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as error:
        convert(fmt, src, out, names=src / "names.txt" if fmt == "yolo" else None)
    assert "\n" not in str(error.value)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []  # nothing half-written


def test_refuses_a_non_empty_out_and_replaces_it_with_overwrite(tmp_path):
    src = write_voc(tmp_path / "voc", VOC_A, VOC_B)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert("voc", src, out)
    with pytest.raises(FileExistsError, match="not empty"):
        convert("voc", src, out, twins=2)
    assert (out / "keep.txt").read_text() == "mine"
    convert("voc", src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "annotations" / "instances_val.json").is_file()


def test_convert_checks_its_options_before_writing(tmp_path):
    src = write_voc(tmp_path / "voc", VOC_A, VOC_B)
    out = tmp_path / "out"
    for kwargs, message in (({"format": "coco"}, "unknown format 'coco'"),
                            ({"format": "yolo"}, "YOLO labels hold class indices"),
                            ({"format": "visdrone", "names": "n.txt"}, "VisDrone has its own class list"),
                            ({"format": "yolo", "names": "n.txt", "coordinates": "one-based"}, "a VOC option"),
                            ({"format": "voc", "twins": 1}, "twin scale must be an integer >= 2")):
        with pytest.raises(ValueError, match=message):
            convert(src=src, out=out, **kwargs)
    assert not out.exists()
    (tmp_path / "names.txt").write_text("Person\nCar\nDontCare\n")  # DontCare stays an ignore region
    summary = convert("voc", src, out, names=tmp_path / "names.txt", splits=["train"], coordinates="one-based")
    assert summary["categories"] == ["Person", "Car"] and list(summary["splits"]) == ["train"]
    assert summary["splits"]["train"]["ignore_regions"] == 1


def _area_average(pixels, k):
    """k x k block means rounded half up, in float64: independent of synth.area_downsample."""
    h, w = pixels.shape[:2]
    blocks = pixels.astype(np.float64).reshape(h // k, k, w // k, k, *pixels.shape[2:])
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def test_twins_lr_is_the_area_average_of_the_native_image(tmp_path):
    """An odd-sized RGB image (cropped to a multiple of k), a grayscale one and a 16-bit one."""
    src = tmp_path / "coco"
    (src / "val").mkdir(parents=True)
    Image.fromarray(_noise(31, 47, 3, seed=3)).save(src / "val" / "rgb.png")
    Image.fromarray(_noise(24, 36, seed=4)).save(src / "val" / "gray.jpg")
    Image.fromarray(_noise(30, 30, dtype=np.uint16, high=65536, seed=5)).save(src / "val" / "deep.png")
    images = [{"id": 1, "file_name": "rgb.png", "width": 47, "height": 31},
              {"id": 2, "file_name": "gray.jpg", "width": 36, "height": 24},
              {"id": 3, "file_name": "deep.png", "width": 30, "height": 30}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 6, 9, 12], "area": 100.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40, 20, 7, 11], "area": 77.0, "iscrowd": 0},  # cut
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [45, 0, 2, 5], "area": 10.0, "iscrowd": 0},  # cropped away
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 36, 24], "area": 864.0, "iscrowd": 1},
    ]
    (src / "annotations").mkdir()
    (src / "annotations" / "instances_val.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    out = tmp_path / "x3"
    summary = make_twins(src, out, 3)
    assert summary["splits"]["val"] == {"images": 3, "cropped_images": 1, "annotations": 3, "dropped_by_crop": 1}

    coco = _json(out, "val")
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        ("rgb.png", 15, 10), ("gray.png", 12, 8), ("deep.png", 10, 10)]
    boxes = {a["id"]: (a["bbox"], a["area"], a["iscrowd"]) for a in coco["annotations"]}
    assert boxes[1] == ([1.0, 2.0, 3.0, 4.0], pytest.approx(100 / 9), 0)
    # Cut by the crop to 45x30: 5 x 10 of its 7 x 11 remain; area scales with the kept part.
    assert boxes[2][0] == pytest.approx([40 / 3, 20 / 3, 5 / 3, 10 / 3]) and boxes[2][1] == pytest.approx(
        77 * 50 / 77 / 9)
    assert boxes[4] == ([0.0, 0.0, 12.0, 8.0], pytest.approx(96.0), 1)
    assert Image.open(out / "val" / "gray.png").mode == "L"  # grayscale stays one channel

    dataset = load_split(out, "val", train=False, hr_scale=3)
    for index, image in enumerate(images):
        native = np.asarray(read_rgb_image(src / "val" / image["file_name"]))  # 16-bit rescaled as sodlab reads it
        lr, target = dataset[index]
        h, w = lr.shape[-2:]
        hr = target["hr_image"].permute(1, 2, 0).numpy()
        hr = np.rint(hr * 255).astype(np.uint8) if hr.dtype != np.uint8 else hr
        assert np.array_equal(hr, native[:3 * h, :3 * w])  # the HR twin is the native image, cropped
        lr_pixels = np.rint(lr.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(lr_pixels, _area_average(native[:3 * h, :3 * w], 3))


def test_convert_with_twins(tmp_path):
    src = write_voc(tmp_path / "voc", VOC_A, VOC_B)
    summary = convert("voc", src, tmp_path / "x2", twins=2)
    assert summary["twins"]["scale"] == 2 and summary["out"] == str(tmp_path / "x2")
    assert sorted(p.name for p in (tmp_path / "x2").iterdir()) == ["annotations", "train", "train_x2", "val", "val_x2"]
    assert list(tmp_path.glob(".x2*")) == []  # the intermediate COCO folder is gone
    coco = _json(tmp_path / "x2", "train")
    assert coco["images"][0] == {"id": 1, "file_name": "a.png", "width": 32, "height": 24}
    assert coco["annotations"][0]["bbox"] == [5.0, 2.5, 5.0, 10.0]
    assert coco["info"]["sodlab_convert"]["format"] == "voc" and coco["info"]["sodlab_twins"]["scale"] == 2
    assert coco["info"]["sodlab_twins"]["src"] == str(src)  # the converted dataset, not the temporary folder


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"{REALDATA} not present")
def test_hit_uav_sample_converts_with_its_counts(tmp_path):
    summary = convert("voc", REALDATA, tmp_path / "hit-uav")
    # HIT-UAV's boxes start at 0: pixel edges, not VOC's 1-based indices.
    assert summary["coordinates"] == "zero-based"
    assert summary["categories"] == ["Bicycle", "Car", "OtherVehicle", "Person"]
    splits = summary["splits"]
    assert (splits["train"]["images"], splits["val"]["images"]) == (400, 100)
    # README: 4,502 objects, of which 28 DontCare regions; 20 objects are marked difficult.
    assert splits["train"]["ignore_regions"] + splits["val"]["ignore_regions"] == 28
    assert splits["train"]["difficult"] + splits["val"]["difficult"] == 20
    assert sum(s["objects"] for s in splits.values()) == 4502 - 28 - 20
    assert sum(s["crowd_annotations"] for s in splits.values()) == 28 * 4 + 20
    val = load_split(tmp_path / "hit-uav", "val", train=False)
    image, target = val[0]
    assert image.shape == (3, 512, 640) and len(target["boxes"]) > 0


@pytest.mark.slow
@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"{REALDATA} not present")
def test_hit_uav_val_twins(tmp_path):
    convert("voc", REALDATA, tmp_path / "coco", splits=["val"])
    make_twins(tmp_path / "coco", tmp_path / "x2", 2)
    dataset = load_split(tmp_path / "x2", "val", train=False, hr_scale=2)
    assert len(dataset) == 100
    lr, target = dataset[0]
    assert lr.shape == (3, 256, 320) and target["hr_image"].shape == (3, 512, 640)
    native = np.asarray(read_rgb_image(dataset.hr_dir / dataset.images[dataset.ids[0]]["file_name"]))
    assert np.array_equal(np.rint(lr.permute(1, 2, 0).numpy() * 255).astype(np.uint8), _area_average(native, 2))

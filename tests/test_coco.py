"""CocoDetection, transforms and paths on a tiny COCO split written into tmp_path."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from sodlab.data.coco import CocoDetection, coco_paths, collate_fn, load_split, make_transforms

# Non-contiguous and unsorted category ids: labels must come out as 1..3 in id order.
CATEGORIES = [{"id": 42, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "person"}]


def _rgb_image(width, height):
    """Black image with a bright left column block, so a flip is visible."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :5] = (200, 100, 50)
    return Image.fromarray(pixels)


def write_split(root, split="val"):
    """DIR/annotations/instances_{split}.json + DIR/{split}/*.png covering the awkward cases."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    _rgb_image(64, 48).save(root / split / "000001.png")
    Image.new("L", (32, 32), 128).save(root / split / "000002.png")  # grayscale, no annotations
    Image.new("RGBA", (40, 40), (10, 20, 30, 0)).save(root / split / "000003.png")
    Image.fromarray(np.full((20, 20), 257 * 100, dtype=np.uint16)).save(root / split / "000004.png")  # 16-bit
    images = [
        {"id": 1, "file_name": "000001.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "000002.png", "width": 32, "height": 32},
        {"id": 3, "file_name": "000003.png", "width": 40, "height": 40},
        {"id": 4, "file_name": "000004.png", "width": 20, "height": 20},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 20, 8, 16], "area": 100, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 42, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},  # degenerate
        {"id": 5, "image_id": 1, "category_id": 42, "bbox": [50, 40, 30, 20], "area": 600},  # partly outside
        {"id": 6, "image_id": 3, "category_id": 42, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 7, "image_id": 4, "category_id": 7, "bbox": [2, 2, 5, 5], "iscrowd": 0},  # no area: w*h
    ]
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root / split, ann_file


@pytest.fixture
def split(tmp_path):
    return write_split(tmp_path)


def load(split, transforms=None):
    with pytest.warns(UserWarning, match=r"instances_val\.json: skipped 1 degenerate"):
        return CocoDetection(*split, transforms=transforms)


def item_by_id(dataset, image_id):
    return dataset[dataset.ids.index(image_id)]


def test_category_ids_map_to_contiguous_labels_and_back(split):
    dataset = load(split)
    assert dataset.cat_ids == [3, 7, 42]
    assert dataset.cat_id_to_label == {3: 1, 7: 2, 42: 3}
    assert dataset.label_to_cat_id == {1: 3, 2: 7, 3: 42}
    assert dataset.class_names == ["__background__", "car", "person", "kite"]
    assert dataset.num_classes == 4
    _, target = item_by_id(dataset, 1)
    assert [dataset.label_to_cat_id[label] for label in target["labels"].tolist()] == [3, 7, 42]


def test_target_format_crowd_and_degenerate_left_out_and_clipped(split):
    dataset = load(split)
    assert len(dataset) == 4 and dataset.num_crowd == 1 and dataset.num_degenerate == 1
    image, target = item_by_id(dataset, 1)
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert tuple(target["boxes"].canvas_size) == (48, 64)
    # Car and person as annotated; the kite at x 50..80, y 40..60 is clipped to the 64x48 image.
    # The crowd kite (id 3) and the zero-width car (id 4) are absent.
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [30, 20, 38, 36], [50, 40, 64, 48]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2, 3]
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0, 0, 0]
    assert target["area"].tolist() == [200, 100, 600]
    assert target["image_id"] == 1
    # Missing area falls back to the box area.
    assert item_by_id(dataset, 4)[1]["area"].tolist() == [25.0]


def test_image_without_annotations_is_kept(split):
    dataset = load(split, make_transforms(train=True, hflip_prob=1.0))
    assert 2 in dataset.ids
    image, target = item_by_id(dataset, 2)
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_horizontal_flip_moves_boxes_and_pixels(split):
    plain = load(split, make_transforms(train=False))
    flipped = load(split, make_transforms(train=True, hflip_prob=1.0))
    image, target = item_by_id(plain, 1)
    flipped_image, flipped_target = item_by_id(flipped, 1)
    width = 64
    expected = [[width - x2, y1, width - x1, y2] for x1, y1, x2, y2 in target["boxes"].tolist()]
    assert flipped_target["boxes"].tolist() == expected  # x1' = W - x2, x2' = W - x1
    assert flipped_target["labels"].tolist() == target["labels"].tolist()
    assert torch.equal(flipped_image, image.flip(-1))
    assert flipped_image[:, :, -5:].mean() > 0.1 and flipped_image[:, :, :5].max() == 0  # the block moved right


def test_grayscale_rgba_and_16bit_become_rgb(split):
    dataset = load(split)
    gray, _ = item_by_id(dataset, 2)
    assert gray.shape == (3, 32, 32)
    assert torch.allclose(gray, torch.full_like(gray, 128 / 255))
    rgba, _ = item_by_id(dataset, 3)
    assert rgba.shape == (3, 40, 40)
    assert torch.allclose(rgba[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    deep, _ = item_by_id(dataset, 4)  # 16-bit value 257*100 is 8-bit 100, not clipped to 255
    assert torch.allclose(deep, torch.full_like(deep, 100 / 255))


def test_exif_orientation_applied(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    stored = np.zeros((10, 20, 3), dtype=np.uint8)  # stored 20 wide, 10 high
    stored[0, 0] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "val" / "a.png", exif=exif)
    ann_file = tmp_path / "annotations" / "instances_val.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.png", "width": 10, "height": 20}],
        "annotations": [], "categories": CATEGORIES,
    }))
    image, _ = CocoDetection(tmp_path / "val", ann_file)[0]
    assert image.shape == (3, 20, 10)
    assert image[:, 0, -1].tolist() == [1.0, 1.0, 1.0]  # rotated clockwise: stored top-left is now top-right


def test_resize_scale_and_scale_attribute(split):
    image_dir, _ = split
    with pytest.warns(UserWarning, match="degenerate"):
        dataset = load_split(image_dir.parent, "val", train=False, scale=2.0)
    assert dataset.scale == 2.0 and load(split).scale == 1.0
    image, target = item_by_id(dataset, 1)
    assert image.shape == (3, 96, 128)
    assert target["boxes"].tolist() == [[20, 10, 60, 30], [60, 40, 76, 72], [100, 80, 128, 96]]
    assert tuple(target["boxes"].canvas_size) == (96, 128)
    assert len(target["area"]) == len(target["iscrowd"]) == 3


def test_collate_and_dataloader(split):
    dataset = load(split, make_transforms(train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2
    assert [t["image_id"] for t in targets] == [1, 2]
    assert collate_fn([("a", 1), ("b", 2)]) == (("a", "b"), (1, 2))


def test_missing_and_unreadable_image_errors_name_file_and_id(split):
    image_dir, ann_file = split
    dataset = load(split)
    (image_dir / "000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000003\.png \(image id 3\)"):
        item_by_id(dataset, 3)
    (image_dir / "000004.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"000004\.png \(image id 4\): cannot read image"):
        item_by_id(dataset, 4)


def test_image_size_mismatch_is_an_error(split):
    image_dir, _ = split
    dataset = load(split)
    Image.new("RGB", (10, 10)).save(image_dir / "000002.png")
    with pytest.raises(ValueError, match=r"000002\.png \(image id 2\): image is 10x10 .* says 32x32"):
        item_by_id(dataset, 2)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"bad\.json: invalid JSON"),
        (json.dumps({"images": [], "categories": []}), r"bad\.json: missing key 'annotations'"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": CATEGORIES,
                     "annotations": [{"id": 9, "image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}]}),
         r"bad\.json: annotation id 9: image_id 2 is not in 'images'"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": CATEGORIES,
                     "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]}),
         r"bad\.json: annotation id 9: category_id 5"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": CATEGORIES,
                     "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1]}]}),
         r"bad\.json: annotation id 9: 'bbox' must be"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 4}], "categories": [], "annotations": []}),
         r"bad\.json: image id 1: needs a positive 'width'"),
    ],
)
def test_invalid_json_errors_name_file_and_record(tmp_path, content, message):
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(content)
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, ann_file)


def test_nan_box_counts_as_degenerate(tmp_path):
    ann_file = tmp_path / "nan.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": CATEGORIES,
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [float("nan"), 0, 1, 1]},
                        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 10, 2, 2]}],  # outside a 4x4 image
    }))
    with pytest.warns(UserWarning, match=r"nan\.json: skipped 2 degenerate"):
        dataset = CocoDetection(tmp_path, ann_file)
    assert dataset.num_degenerate == 2 and len(dataset) == 1


def test_coco_paths(split):
    image_dir, ann_file = split
    assert coco_paths(image_dir.parent, "val") == (image_dir, ann_file)
    with pytest.raises(FileNotFoundError, match=r"instances_train\.json.*present: instances_val\.json"):
        coco_paths(image_dir.parent, "train")


def test_size_buckets_use_cocos_inclusive_bounds():
    from sodlab.data.coco import size_bucket

    assert [size_bucket(a) for a in (1, 32**2, 32**2 + 0.25, 96**2, 96**2 + 0.25)] == \
        ["small", "small", "medium", "medium", "large"]

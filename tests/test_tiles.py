"""Native-resolution tiles (sodlab.data.tiles): the cut-box policy, the tile dataset, sliced inference
scored by sodlab.evaluate's COCOeval, and the count of objects a resize puts under 8 px."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sodlab.data.coco import collate_fn, load_split
from sodlab.data.tiles import (TiledDataset, count_pushed_under, crop_target, resize_factor, sliced_outputs,
                               sliced_predict, tile_windows)
from sodlab.evaluate import coco_eval, predictions_to_coco_results


def write_coco(root, pixels, boxes, labels=None, crowd=(), split="val", categories=2):
    """One image (HxWx3 uint8) with xyxy ``boxes``; indices in ``crowd`` are iscrowd regions."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    Image.fromarray(pixels).save(root / split / "000001.png")
    labels = labels or [1] * len(boxes)
    annotations = [{"id": i + 1, "image_id": 1, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)), "iscrowd": int(i in crowd)}
                   for i, ((x0, y0, x1, y1), label) in enumerate(zip(boxes, labels))]
    height, width = pixels.shape[:2]
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000001.png", "width": width, "height": height}],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, categories + 1)]}))
    return root


# --- the cut-box policy ------------------------------------------------------------------------------

def test_crop_target_policy():
    boxes = torch.tensor([
        [20, 20, 30, 30],  # inside: kept as is
        [0, 20, 30, 30],  # 20 of 30 columns inside (67%): an object, clipped
        [0, 40, 14, 50],  # 4 of 14 inside (29%): an ignore region
        [50, 50, 70, 70],  # a crowd region 1/4 inside: stays crowd, clipped
        [60, 0, 70, 10],  # outside
        [0, 0, 10, 10],  # touches the window's left edge from outside: no area inside
        [55, 10, 65, 20],  # exactly half inside: kept (>= min_visible)
    ], dtype=torch.float32)
    iscrowd = torch.tensor([0, 0, 0, 1, 0, 0, 0])
    out, index, crowd = crop_target(boxes, iscrowd, (10, 5, 60, 60), min_visible=0.5)
    assert index.tolist() == [0, 1, 2, 3, 6]
    assert out.tolist() == [[10, 15, 20, 25], [0, 15, 20, 25], [0, 35, 4, 45], [40, 45, 50, 55], [45, 5, 50, 15]]
    assert crowd.tolist() == [0, 0, 1, 1, 0]
    # A stricter threshold turns the half-visible box into an ignore region.
    assert crop_target(boxes, iscrowd, (10, 5, 60, 60), min_visible=0.6)[2].tolist() == [0, 0, 1, 1, 1]


# --- the tile dataset --------------------------------------------------------------------------------

def _random_boxes(rng, count, width, height, max_side):
    boxes = []
    for _ in range(count):
        w, h = rng.integers(2, max_side, 2)
        x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
        boxes.append([int(x0), int(y0), int(x0 + w), int(y0 + h)])
    return boxes


def _expected(boxes, labels, window, min_visible=0.5):
    """The policy computed box by box: {(box in window pixels, label)} of the training objects."""
    wx0, wy0, wx1, wy1 = window
    kept = set()
    for (x0, y0, x1, y1), label in zip(boxes, labels):
        cx0, cy0, cx1, cy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) >= min_visible * (x1 - x0) * (y1 - y0):
            kept.add(((cx0 - wx0, cy0 - wy0, cx1 - wx0, cy1 - wy0), label))
    return kept


def test_tiles_keep_inside_boxes_exactly_and_cut_boxes_by_the_policy(tmp_path):
    rng = np.random.default_rng(0)
    width, height, tile = 120, 90, 48
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = _random_boxes(rng, 40, width, height, 30)
    labels = [int(v) for v in rng.integers(1, 3, len(boxes))]
    root = write_coco(tmp_path, pixels, boxes + [[0, 0, 120, 90]], labels + [1], crowd={len(boxes)})
    base = load_split(root, "val", train=False)
    tiles = TiledDataset(base, tile, generator=torch.Generator().manual_seed(0))
    assert len(tiles) == 1 and tiles.num_classes == 3 and tiles.ids == [1]
    inside = cut_kept = cut_dropped = 0
    for _ in range(60):
        image, target = tiles[0]
        x0, y0, x1, y1 = target["tile"]
        assert (x1 - x0, y1 - y0) == (tile, tile) and image.shape == (3, tile, tile)
        assert torch.equal(image, base[0][0][:, y0:y1, x0:x1])
        got = {(tuple(b), label) for b, label in zip(target["boxes"].tolist(), target["labels"].tolist())}
        assert got == _expected(boxes, labels, (x0, y0, x1, y1))
        assert target["iscrowd"].tolist() == [0] * len(got)  # the crowd region never becomes a target
        assert target["boxes"].canvas_size == (tile, tile) and target["image_id"] == 1
        for bx0, by0, bx1, by1 in boxes:
            visible = max(0, min(bx1, x1) - max(bx0, x0)) * max(0, min(by1, y1) - max(by0, y0))
            area = (bx1 - bx0) * (by1 - by0)
            inside += visible == area
            cut_kept += 0.5 * area <= visible < area
            cut_dropped += 0 < visible < 0.5 * area
    # The draws exercised every branch of the policy.
    assert inside > 50 and cut_kept > 10 and cut_dropped > 10


def test_tile_area_is_the_visible_part(tmp_path):
    root = write_coco(tmp_path, np.zeros((40, 60, 3), np.uint8), [[10, 10, 30, 20]])
    tiles = TiledDataset(load_split(root, "val", train=False), 25)
    tiles.window = lambda height, width: (15, 0, 40, 25)  # 15 of the box's 20 columns
    _, target = tiles[0]
    assert target["boxes"].tolist() == [[0, 10, 15, 20]] and target["area"].tolist() == [pytest.approx(150.0)]


def test_tiles_are_reproducible_from_the_seed(tmp_path):
    root = write_coco(tmp_path, np.zeros((90, 120, 3), np.uint8), [[10, 10, 20, 20]])
    base = load_split(root, "val", train=True, hflip_prob=0.5)

    def draws(tiles, n=8):
        return [(target["tile"], target["boxes"].tolist()) for _, target in (tiles[0] for _ in range(n))]

    # Crop positions from an explicit generator, or from torch's global RNG as train.py seeds it
    # (the flips draw from it too, so then the whole sample repeats).
    windows = [[t for t, _ in draws(TiledDataset(base, 32, generator=torch.Generator().manual_seed(5)))]
               for _ in range(2)]
    assert windows[0] == windows[1]
    torch.manual_seed(1)
    first = draws(TiledDataset(base, 32))
    torch.manual_seed(1)
    assert draws(TiledDataset(base, 32)) == first
    assert len({w for w, _ in first}) > 1


def test_image_smaller_than_the_tile_is_taken_whole(tmp_path):
    root = write_coco(tmp_path, np.zeros((30, 70, 3), np.uint8), [[5, 5, 25, 25]])
    image, target = TiledDataset(load_split(root, "val", train=False), 48)[0]
    assert image.shape == (3, 30, 48) and target["tile"][1::2] == (0, 30)


def test_tiles_crop_the_hr_twin_to_the_same_region(tmp_path):
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    root = write_coco(tmp_path, hr.reshape(40, 2, 60, 2, 3).mean(axis=(1, 3)).astype(np.uint8), [[5, 5, 20, 20]])
    (root / "val_x2").mkdir()
    Image.fromarray(hr).save(root / "val_x2" / "000001.png")
    tiles = TiledDataset(load_split(root, "val", train=False, hr_scale=2), 32,
                         generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        _, target = tiles[0]
        x0, y0, x1, y1 = target["tile"]
        expected = torch.from_numpy(hr[2 * y0:2 * y1, 2 * x0:2 * x1]).permute(2, 0, 1).float() / 255
        assert torch.allclose(target["hr_image"], expected)


def test_tiles_refuse_a_resizing_dataset(tmp_path):
    root = write_coco(tmp_path, np.zeros((30, 30, 3), np.uint8), [[5, 5, 25, 25]])
    with pytest.raises(ValueError, match="native resolution; the dataset resizes by 2.0"):
        TiledDataset(load_split(root, "val", train=False, scale=2.0), 16)


def test_crops_of_a_resizing_dataset_are_windows_of_its_resized_image(tmp_path):
    """TrainConfig.crop: the x2 upscale input is cropped at x2, its boxes scaled then shifted."""
    rng = np.random.default_rng(3)
    root = write_coco(tmp_path, rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), [[4, 4, 8, 8]])
    scaled = load_split(root, "val", train=False, scale=2.0)
    whole, _ = scaled[0]
    crops = TiledDataset(scaled, 32, generator=torch.Generator().manual_seed(0), native_resolution=False)
    windows = set()
    for _ in range(8):
        image, target = crops[0]
        x0, y0, x1, y1 = target["tile"]
        windows.add((x0, y0))
        assert (x1 - x0, y1 - y0) == (32, 32) and torch.equal(image, whole[:, y0:y1, x0:x1])
        # the 40 x 40 image's every 32 px window holds the box, at [8, 8, 16, 16] in the x2 image
        assert target["boxes"].tolist() == [[8.0 - x0, 8.0 - y0, 16.0 - x0, 16.0 - y0]]
    assert len(windows) > 1


@pytest.mark.slow
def test_a_detector_trains_on_tiles(tmp_path):
    """The cpu-preset detector, told not to resize (min_size = max_size = tile), takes a tiled batch."""
    from sodlab.models.detector import build_detector, preset

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    root = write_coco(tmp_path, pixels, _random_boxes(rng, 8, 150, 100, 20))
    tiles = TiledDataset(load_split(root, "val", train=True), 64)
    torch.manual_seed(0)
    model = build_detector(preset("cpu", min_size=64, max_size=64, rpn_post_nms_top_n_train=50,
                                  box_batch_size_per_image=16), num_classes=3)
    images, targets = collate_fn([tiles[0], tiles[0]])
    model.train()
    losses = model(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.transform(list(images))[0].image_sizes == [(64, 64), (64, 64)]  # no resize


def test_a_detector_trained_on_crops_takes_them_as_they_come_and_evaluates_resized():
    """resize_in_training=False (TrainConfig.crop): a training crop of the x2 input is not resized
    again, while evaluation still resizes whole images to min_size x image_scale."""
    from sodlab.models.detector import build_detector, preset

    crops = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    on_crops = build_detector(preset("cpu", min_size=64, max_size=64), 3, image_scale=2.0, resize_in_training=False)
    resizing = build_detector(preset("cpu", min_size=64, max_size=64), 3, image_scale=2.0)
    on_crops.train(), resizing.train()
    assert on_crops.transform(crops)[0].image_sizes == [(64, 64), (64, 64)]
    assert resizing.transform(crops)[0].image_sizes == [(128, 128), (128, 128)]
    on_crops.eval()
    assert on_crops.transform([torch.rand(3, 48, 48)])[0].image_sizes == [(128, 128)]


# --- sliced inference --------------------------------------------------------------------------------

def test_tile_windows_cover_the_image_with_full_size_tiles():
    windows = tile_windows(150, 200, 64, 0.2)
    # Steps of 64 - int(0.2 * 64) = 52 px; the last column and row end at the image edge.
    assert sorted({w[0] for w in windows}) == [0, 52, 104, 136]
    assert sorted({w[1] for w in windows}) == [0, 52, 86]
    assert len(windows) == 12 and all(x1 - x0 == 64 and y1 - y0 == 64 for x0, y0, x1, y1 in windows)
    covered = np.zeros((150, 200), bool)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_windows(40, 50, 64) == [(0, 0, 50, 40)]
    assert tile_windows(64, 128, 64, 0.0) == [(0, 0, 64, 64), (64, 0, 128, 64)]


@pytest.mark.parametrize("height, width, tile, overlap", [(150, 200, 64, 0.2), (512, 640, 256, 0.2),
                                                          (100, 100, 128, 0.2), (257, 300, 128, 0.25)])
def test_tile_windows_are_sahis(height, width, tile, overlap):
    slicing = pytest.importorskip("sahi.slicing")
    expected = slicing.get_slice_bboxes(height, width, tile, tile, False, overlap, overlap)
    assert tile_windows(height, width, tile, overlap) == [tuple(w) for w in expected]


class PerfectDetector(torch.nn.Module):
    """A detector that reads the truth off the pixels, with the tiles' cut-box policy.

    Channel 0 holds an object's number n (1..255) / 255 and channel 1 its label / 255, 0 elsewhere.
    It reports every object of which it sees at least half (``crop_target``'s rule), boxed by its
    visible pixels, scored by the fraction it sees; torchvision detection format.
    """

    def __init__(self, full_areas: dict[int, int]):
        super().__init__()
        self.full_areas = full_areas
        self.calls = []

    def forward(self, images):
        outputs = []
        for image in images:
            self.calls.append(tuple(image.shape[-2:]))
            numbers = torch.round(image[0] * 255).long()
            classes = torch.round(image[1] * 255).long()
            boxes, labels, scores = [], [], []
            for n in numbers.unique().tolist():
                if n == 0:
                    continue
                ys, xs = torch.nonzero(numbers == n, as_tuple=True)
                fraction = len(xs) / self.full_areas[n]
                if fraction >= 0.5:
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    labels.append(classes[ys[0], xs[0]])
                    scores.append(fraction)
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)})
        return outputs


def write_scene(root, large: bool):
    """A 200x150 image of small rectangles (<= 12 px, the tiles' overlap), one of them a crowd region,
    and optionally one object larger than a tile."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((150, 200, 3), np.uint8)
    boxes, labels, areas = [], [], {}
    if large:  # 80x70: a medium object, larger than a 64 px tile
        pixels[70:140, 100:180] = (200, 2, 0)
        areas[200] = 80 * 70
    while len(boxes) < 30:
        w, h = (int(v) for v in rng.integers(3, 13, 2))
        x0, y0 = int(rng.integers(0, 200 - w)), int(rng.integers(0, 150 - h))
        if pixels[max(0, y0 - 1):y0 + h + 1, max(0, x0 - 1):x0 + w + 1].any():
            continue  # objects do not touch
        n, label = len(boxes) + 1, int(rng.integers(1, 3))
        pixels[y0:y0 + h, x0:x0 + w] = (n, label, 0)
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(label)
        areas[n] = w * h
    if large:
        boxes.append([100, 70, 180, 140])
        labels.append(2)
    # Object 1 is a region to ignore: a crowd annotation of each class, as the converters write it.
    crowd_box = boxes[0]
    boxes, labels = boxes + [crowd_box], labels + [3 - labels[0]]
    write_coco(root, pixels, boxes, labels, crowd={0, len(boxes) - 1})
    return root, PerfectDetector(areas)


def _sliced_ap(root, model, **options):
    dataset = load_split(root, "val", train=False)
    outputs = sliced_outputs(model, dataset, tile=64, overlap=0.2, **options)
    results = predictions_to_coco_results(outputs, dataset.label_to_cat_id)
    return coco_eval(dataset.ann_file, results, image_ids=outputs)


def test_sliced_evaluation_of_a_perfect_detector_scores_ap_1(tmp_path):
    root, model = write_scene(tmp_path, large=False)
    # Tiles alone: every object lies whole in some tile, so it is found only if the boxes are
    # shifted back to the right place; detections on the crowd region are ignored.
    stats = _sliced_ap(root, model, full_image=False)
    assert stats["AP"] == pytest.approx(1.0) and stats["APs"] == pytest.approx(1.0)
    assert model.calls == [(64, 64)] * 12
    assert _sliced_ap(root, model)["AP"] == pytest.approx(1.0)
    assert model.calls[-1] == (150, 200)  # the full-image pass


def test_the_full_image_pass_finds_objects_larger_than_a_tile(tmp_path):
    root, model = write_scene(tmp_path, large=True)
    tiles_only = _sliced_ap(root, model, full_image=False)
    assert tiles_only["APm"] < 0.5 and tiles_only["APs"] == pytest.approx(1.0)  # only cut views of it
    merged = _sliced_ap(root, model)
    assert merged["AP"] == pytest.approx(1.0)


def test_sliced_predict_merges_duplicates_by_class_wise_nms():
    model = PerfectDetector({1: 100, 2: 100})
    image = torch.zeros(3, 100, 150)
    image[0, 40:50, 60:70], image[1, 40:50, 60:70] = 1 / 255, 1 / 255  # whole in three tiles
    image[0, 40:50, 75:85], image[1, 40:50, 75:85] = 2 / 255, 1 / 255  # same class, IoU 0: both stay
    output = sliced_predict(model, image, tile=64, overlap=0.5)
    assert sorted(output["boxes"].tolist()) == [[60, 40, 70, 50], [75, 40, 85, 50]]
    assert output["labels"].tolist() == [1, 1] and output["scores"].tolist() == [1.0, 1.0]
    assert len(sliced_predict(model, image, tile=64, overlap=0.5, max_detections=1)["boxes"]) == 1

    class SameBoxTwoClasses(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), "labels": torch.tensor([1, 2]),
                     "scores": torch.tensor([0.9, 0.8])} for _ in images]

    # Every tile reports both classes at its origin; the full-image pass repeats the first tile's.
    output = sliced_predict(SameBoxTwoClasses(), image, tile=64, overlap=0.5)
    origins = {(x0, y0) for x0, y0, _, _ in tile_windows(100, 150, 64, 0.5)}
    assert len(output["boxes"]) == 2 * len(origins)
    assert sorted((int(b[0]), int(b[1]), label) for b, label in zip(output["boxes"], output["labels"].tolist())) == \
        sorted((x0, y0, label) for x0, y0 in origins for label in (1, 2))


def test_sliced_predict_matches_sahi(tmp_path):
    """The bench's `sahi` row (SAHI's sliced prediction, NMS at IoU 0.5, class-wise) gives the same boxes."""
    pytest.importorskip("sahi")
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    root, model = write_scene(tmp_path, large=True)
    dataset = load_split(root, "val", train=False)
    image = dataset[0][0]
    ours = sliced_predict(model, image, tile=64, overlap=0.2)
    sahi_model = TorchVisionDetectionModel(model=model, device="cpu", confidence_threshold=0.0,
                                           category_mapping={"1": "class1", "2": "class2"}, load_at_init=True)
    hwc = dataset.load_image(1).permute(1, 2, 0).numpy()
    result = get_sliced_prediction(hwc, sahi_model, slice_height=64, slice_width=64, overlap_height_ratio=0.2,
                                   overlap_width_ratio=0.2, perform_standard_pred=True,
                                   postprocess_class_agnostic=False, verbose=0, force_postprocess_type=True,
                                   postprocess_type="NMS", postprocess_match_metric="IOU",
                                   postprocess_match_threshold=0.5)
    theirs = {(tuple(round(v, 3) for v in p.bbox.to_xyxy()), p.category.id, round(p.score.value, 4))
              for p in result.object_prediction_list}
    mine = {(tuple(round(v, 3) for v in b), label, round(s, 4))
            for b, label, s in zip(ours["boxes"].tolist(), ours["labels"].tolist(), ours["scores"].tolist())}
    assert mine == theirs


# --- what a resize does to small objects -------------------------------------------------------------

def test_resize_factor_is_torchvisions():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(256, 256, [0, 0, 0], [1, 1, 1]).eval()
    for height, width in ((512, 640), (100, 60), (300, 1000)):
        resized = transform([torch.zeros(3, height, width)])[0].image_sizes[0]
        factor = resize_factor(height, width, 256, 256)
        assert resized == (int(height * factor), int(width * factor))
    assert resize_factor(512, 640, 256, 256) == pytest.approx(0.4)  # HIT-UAV under the cpu preset


def test_count_pushed_under(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 640, "height": 512},
              {"id": 2, "file_name": "b.png", "width": 100, "height": 100}]
    sides = [(1, 10, 0), (1, 30, 0), (1, 5, 0), (1, 10, 1), (2, 5, 0)]  # (image, side, crowd)
    annotations = [{"id": i + 1, "image_id": image, "category_id": 1, "bbox": [0, 0, side, side],
                    "area": float(side * side), "iscrowd": crowd} for i, (image, side, crowd) in enumerate(sides)]
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "thing"}]}))
    # 640x512 x0.4: side 10 -> 4 px (pushed under), 30 -> 12, 5 -> 2 (under already); 100x100 x2.56.
    report = count_pushed_under(ann_file, 256, 256)
    assert (report.objects, report.under_native, report.under_resized, report.pushed_under) == (4, 2, 2, 1)
    assert report.factor_range == pytest.approx((0.4, 2.56))
    assert "puts 1 of 4 objects (25%) under 8 px" in report.warning()
    assert report.warning(min_fraction=0.3) is None
    # Tiles of 256 px at min_size = max_size = 256: the 640x512 image is not resized.
    tiled = count_pushed_under(ann_file, 256, 256, tile=256)
    assert tiled.pushed_under == 0 and tiled.factor_range == pytest.approx((1.0, 2.56)) and tiled.warning() is None
    # The upscale method: the dataset doubles the image and the detector's sizes are doubled too.
    upscale = count_pushed_under(ann_file, 512, 512, input_scale=2.0)
    assert upscale.factor_range == pytest.approx((0.8, 5.12))
    assert (upscale.under_resized, upscale.pushed_under) == (1, 0)  # side 10 -> 8 px: not under 8


@pytest.mark.slow
def test_train_on_tiles_and_evaluate_sliced_from_the_command_line(tiny_synth, tmp_path):
    """--tile alone sets the detector's input size to the tile, training draws tiles, and the
    evaluation is sliced at native resolution (recorded in eval.json)."""
    from sodlab.cli import main
    from sodlab.io import read_json

    run = tmp_path / "tiled"
    assert main(["train", "--data", str(tiny_synth), "--tile", "64", "--iters", "2", "--batch-size", "2",
                 "--warmup-iters", "1", "--out", str(run)]) == 0
    config = read_json(run / "config.json")
    assert config["tile"] == 64 and (config["detector"]["min_size"], config["detector"]["max_size"]) == (64, 64)
    stats = read_json(run / "eval.json")
    assert stats["inference"] == {"mode": "sliced", "tile": 64, "overlap": 0.2, "full_image_pass": True,
                                  "merge": "class-wise NMS at IoU 0.5"}
    assert 0 <= stats["AP"] <= 1


@pytest.mark.slow
def test_train_upscale_on_crops_and_evaluate_whole_images_from_the_command_line(tiny_synth, tmp_path, monkeypatch):
    """--crop trains on crops of the x2 input and evaluates whole images; a tile and a crop together
    are refused before anything is written."""
    import sodlab.train
    from sodlab.cli import main
    from sodlab.io import read_json

    seen = []

    class Recorded(TiledDataset):  # the images training draws, as the loader hands them on
        def __getitem__(self, index):
            image, target = super().__getitem__(index)
            seen.append(tuple(image.shape[-2:]))
            return image, target

    monkeypatch.setattr(sodlab.train, "TiledDataset", Recorded)
    run = tmp_path / "cropped"
    assert main(["train", "--data", str(tiny_synth), "--method", "upscale", "--crop", "64", "--iters", "2",
                 "--batch-size", "2", "--warmup-iters", "1", "--out", str(run)]) == 0
    assert read_json(run / "config.json")["crop"] == 64
    assert seen and set(seen) == {(64, 64)}  # crops of the 256 px x2 images, not the images
    stats = read_json(run / "eval.json")
    assert stats["inference"] == {"mode": "whole image"} and 0 <= stats["AP"] <= 1
    both = tmp_path / "both"
    assert main(["train", "--data", str(tiny_synth), "--tile", "64", "--crop", "64", "--iters", "1",
                 "--out", str(both)]) != 0
    assert not both.exists()

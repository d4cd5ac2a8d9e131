"""Bad input the COCO-format path must survive: each case builds its own bad file.

Policy (data/README.md): unusual but valid images are converted (grayscale, RGBA, 16-bit, CMYK,
EXIF orientation); degenerate boxes are skipped with a counted warning and boxes partly outside
the image are clipped; everything else is an error that names the file and the record.
"""
import io
import json

import numpy as np
import pytest
from PIL import Image

from sodlab.cli import main
from sodlab.data.coco import CocoDetection

CATS = [{"id": 1, "name": "disk"}]


def _dataset(tmp_path, images, annotations, categories=CATS, files=None):
    (tmp_path / "val").mkdir(exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    for name, data in (files or {}).items():
        (tmp_path / "val" / name).write_bytes(data)
    ann = tmp_path / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return tmp_path / "val", ann


def _png(image: Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


IMAGE = {"id": 7, "file_name": "a.png", "width": 16, "height": 16}
BOX = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 2, 6, 6], "area": 36}


def test_truncated_image_names_file_and_id(tmp_path):
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    dataset = CocoDetection(*_dataset(tmp_path, [IMAGE], [BOX], files={"a.png": data[: len(data) // 2]}))
    with pytest.raises(OSError, match=r"a\.png \(image id 7\)"):
        dataset[0]


def test_text_file_posing_as_image(tmp_path):
    dataset = CocoDetection(*_dataset(tmp_path, [IMAGE], [BOX], files={"a.png": b"hello, I am text\n"}))
    with pytest.raises(OSError, match=r"a\.png \(image id 7\): cannot read image"):
        dataset[0]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    image = {**IMAGE, "file_name": "a.jpg"}
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    dataset = CocoDetection(*_dataset(tmp_path, [image], [BOX], files={"a.jpg": _png(cmyk, "JPEG")}))
    pixels, _ = dataset[0]
    assert pixels.shape == (3, 16, 16)
    red, green, blue = pixels[:, 8, 8].tolist()
    assert red > 0.9 and green < 0.1 and blue < 0.1


def test_negative_and_zero_size_boxes_are_skipped_and_counted(tmp_path):
    anns = [BOX, {**BOX, "id": 2, "bbox": [5, 5, -3, 4]}, {**BOX, "id": 3, "bbox": [5, 5, 3, 0]}]
    files = {"a.png": _png(Image.new("RGB", (16, 16)))}
    with pytest.warns(UserWarning, match=r"instances_val\.json: skipped 2 degenerate"):
        dataset = CocoDetection(*_dataset(tmp_path, [IMAGE], anns, files=files))
    assert dataset[0][1]["boxes"].shape == (1, 4)


@pytest.mark.parametrize("images, anns, message", [
    ([IMAGE, IMAGE], [BOX], r"image id 7: duplicate image id"),
    ([IMAGE], [BOX, BOX], r"annotation id 1: duplicate"),
])
def test_duplicate_ids(tmp_path, images, anns, message):
    with pytest.raises(ValueError, match=r"instances_val\.json: " + message):
        CocoDetection(*_dataset(tmp_path, images, anns))


def test_empty_dataset_is_refused_for_training_with_one_clear_line(tmp_path, capsys):
    _dataset(tmp_path, [], [])
    (tmp_path / "train").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": CATS}))
    assert main(["train", "--data", str(tmp_path), "--iters", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'train' split has no images" in err and "Traceback" not in err


def test_corrupt_image_mid_training_is_one_clear_line(tmp_path, capsys):
    """The CLI reports the file and image id, not a traceback from inside PIL."""
    (tmp_path / "train").mkdir()
    files = {"a.png": b"\x89PNG\r\n\x1a\n broken"}
    for name, data in files.items():
        (tmp_path / "train" / name).write_bytes(data)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": [IMAGE], "annotations": [BOX], "categories": CATS}))
    # --no-eval: the data has no val split, which a run that evaluates would be refused for at the start
    assert main(["train", "--data", str(tmp_path), "--iters", "1", "--out", str(tmp_path / "run"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "sodlab train: error:" in err and "a.png (image id 7)" in err and "Traceback" not in err

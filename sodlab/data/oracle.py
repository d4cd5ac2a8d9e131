"""The HR oracle's dataset: a COCO split's exact xk twins as images, every annotation scaled by k.

The oracle is the baseline trained and evaluated on the twins: the upper limit that
super-resolving the small objects can approach. Its boxes are mapped back by 1/k and scored
against the LR ground truth, so its size buckets are the LR objects'.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from sodlab.data.coco import area_downsample, load_coco_json, twin_source
from sodlab.data.synth import render_twin
from sodlab.io import atomic_write_json, read_json


def _twin_source(data_dir: Path, split: str, k: int) -> tuple[str, int] | None:
    """How to get the xk twins of a split: ("written", k), ("reduce", m) from written xm twins
    (m a multiple of k, area-averaged by m/k), ("render", k) from the scene file, or None."""
    source = twin_source(data_dir, split, k)
    if source is not None:
        folder, factor = source
        return ("written", k) if factor == 1 else ("reduce", k * factor)
    if (data_dir / "annotations" / f"scenes_{split}.json").is_file():
        return "render", k
    return None


def prepare_oracle_data(data_dir: str | Path, k: int, out_dir: Path,
                        splits: tuple[str, ...]) -> tuple[Path | None, str]:
    """The HR oracle's COCO dataset: the xk twins as images, every annotation scaled by k.

    Images: DIR/{split}_xk/ linked; or DIR/{split}_xm/ (m = 2k, 4k, ...) area-averaged down to xk,
    which keeps the LR image exactly the area average of the twin, as the generator makes it; or
    rendered from DIR/annotations/scenes_{split}.json. Returns (dataset dir, note), or (None, why
    not) when the data has no twins and no scene files. A split whose json is written is complete
    (the json comes last) and is reused, so a resumed bench does not make it again.
    """
    from PIL import Image

    data_dir = Path(data_dir)
    sources = {split: _twin_source(data_dir, split, k) for split in splits}
    for split, source in sources.items():
        if source is None:
            return None, (f"HR oracle skipped: {data_dir} has no twins ({split}_x*/) and no scene file "
                          f"(annotations/scenes_{split}.json) for split {split!r}")
    for split, (how, m) in sources.items():
        if (out_dir / "annotations" / f"instances_{split}.json").is_file():
            continue
        coco = load_coco_json(data_dir / "annotations" / f"instances_{split}.json")
        for image in coco["images"]:
            image["width"], image["height"] = image["width"] * k, image["height"] * k
        for ann in coco["annotations"]:
            ann["bbox"] = [v * k for v in ann["bbox"]]
            if ann.get("area") is not None:
                ann["area"] = ann["area"] * k * k
        coco.setdefault("info", {})["hr_oracle"] = {"scale": k, "lr_data": str(data_dir), "twins": how}
        images_dir = out_dir / split
        images_dir.parent.mkdir(parents=True, exist_ok=True)
        if images_dir.is_symlink():
            images_dir.unlink()
        elif images_dir.is_dir():  # an interrupted earlier attempt
            shutil.rmtree(images_dir)
        if how == "written":
            images_dir.symlink_to((data_dir / f"{split}_x{k}").resolve(), target_is_directory=True)
        else:
            images_dir.mkdir()
            for image in coco["images"]:
                if how == "reduce":
                    with Image.open(data_dir / f"{split}_x{m}" / image["file_name"]) as twin:
                        pixels = area_downsample(np.asarray(twin.convert("RGB")), m // k)
                else:
                    pixels = render_twin(data_dir, split, image["id"], k)
                Image.fromarray(pixels).save(images_dir / image["file_name"])
        atomic_write_json(out_dir / "annotations" / f"instances_{split}.json", coco, indent=None)
    how = {"written": "the written twins", "reduce": "the x{m} twins area-averaged by {r}",
           "render": "rendered from the scene files"}
    used = "; ".join(f"{split}: " + how[h].format(m=m, r=m // k) for split, (h, m) in sources.items())
    return out_dir, f"HR oracle at x{k} ({used}); its boxes are scaled by 1/{k} and evaluated against the LR val json"


def oracle_view(data_dir: str | Path, split: str) -> dict | None:
    """What ``prepare_oracle_data`` recorded in a split's json ({"scale": k, "lr_data": DIR, ...}),
    or None when the split is not the HR oracle's view (plain data, or a missing json)."""
    ann_file = Path(data_dir) / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        return None
    info = read_json(ann_file).get("info")
    return info.get("hr_oracle") if isinstance(info, dict) else None


def oracle_ground_truth(data_dir: str | Path, split: str) -> tuple[Path, float] | None:
    """(the LR json, 1/k) an oracle view's detections are scored against, so its size buckets are
    the LR objects' (as in the bench); None for other data."""
    view = oracle_view(data_dir, split)
    if view is None:
        return None
    return Path(view["lr_data"]) / "annotations" / f"instances_{split}.json", 1 / view["scale"]

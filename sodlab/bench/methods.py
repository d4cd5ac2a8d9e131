"""The bench's rows: which methods it compares, how each is trained, and the paper's published numbers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # the row, and the prefix of its run directory
    description: str
    train_as: str | None  # the TrainConfig.method trained; None: reuses the run of `reuse`
    reuse: str | None = None
    inference: str = "model"  # model: the trained model on each image | sahi: sliced inference
    twins: bool = False  # the HR oracle: trained and evaluated on xK twins, boxes mapped back to LR
    shares_detector: bool = False  # an SR variant: its branch trains on the seed's baseline detector


METHODS: tuple[Method, ...] = (
    Method("baseline", "Faster R-CNN", "baseline"),
    Method("upscale", "Faster R-CNN trained and run on input upsampled x2", "upscale"),
    Method("sahi", "SAHI sliced inference with the baseline's weights", None, reuse="baseline", inference="sahi"),
    Method("sr-cls-only", "SR on small RoIs, D's class scores only (boxes from the box head)", "sr-cls-only",
           shares_detector=True),
    Method("sr", "generative + discriminative reconstruction (the paper)", "sr", shares_detector=True),
    Method("sr-no-recon", "sr without G: D sees bilinear-upsampled patches", "sr-no-recon", shares_detector=True),
    Method("sr-no-adv", "sr without the adversarial loss", "sr-no-adv", shares_detector=True),
    Method("sr-no-cls", "sr without the classification loss", "sr-no-cls", shares_detector=True),
    Method("hr-oracle", "Faster R-CNN trained and evaluated on the exact HR twins (scale above)",
           "hr-oracle", twins=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)

# The paper's published COCO numbers (percent): context only, a different dataset and scale.
# "cf." names the nearest row of this bench, not the same method.
PUBLISHED_MAIN = (
    ("Faster R-CNN (cf. baseline)", "ResNet-50", (31.8, 52.1, 33.7, 15.5, 36.9, 43.3)),
    ("Faster R-CNN (cf. baseline)", "ResNet-50-FPN", (34.2, 55.0, 36.4, 20.0, 37.5, 43.9)),
    ("Faster R-CNN (cf. baseline)", "ResNet-101", (35.0, 55.1, 37.7, 17.3, 39.8, 48.4)),
    ("Faster R-CNN (cf. baseline)", "ResNet-101-FPN", (36.2, 57.3, 39.2, 21.3, 39.8, 46.6)),
    ("SOD-MTGAN (cf. sr-cls-only)", "ResNet-101", (41.4, 63.2, 45.4, 24.7, 44.2, 52.6)),
    ("Ours (cf. sr)", "ResNet-50", (34.8, 55.2, 37.6, 23.5, 44.2, 35.7)),
    ("Ours (cf. sr)", "ResNet-50-FPN", (37.3, 58.0, 40.6, 28.4, 44.2, 36.4)),
    ("Ours (cf. sr)", "ResNet-101", (37.9, 58.0, 40.7, 26.3, 47.5, 40.4)),
    ("Ours (cf. sr)", "ResNet-101-FPN", (39.2, 59.7, 43.0, 28.8, 46.8, 38.8)),
)
PUBLISHED_ABLATION = (
    ("w/o reconstruction module (cf. sr-no-recon)", "ResNet-50", (33.2, 53.8, 35.7, 12.0, 30.2, 34.9)),
    ("w/o reconstruction module (cf. sr-no-recon)", "ResNet-50-FPN", (35.7, 56.8, 38.4, 15.1, 30.0, 35.3)),
    ("w/o advloss (cf. sr-no-adv)", "ResNet-50", (32.5, 52.6, 34.6, 19.8, 40.1, 28.6)),
    ("w/o advloss (cf. sr-no-adv)", "ResNet-50-FPN", (35.2, 56.2, 37.9, 23.9, 39.1, 28.5)),
    ("w/o clsloss (cf. sr-no-cls)", "ResNet-50", (32.5, 52.8, 34.5, 1.9, 11.5, 29.9)),
    ("w/o clsloss (cf. sr-no-cls)", "ResNet-50-FPN", (35.1, 55.9, 38.0, 5.2, 14.6, 31.0)),
    ("Ours (cf. sr)", "ResNet-50", (32.5, 52.8, 34.5, 19.8, 39.8, 28.9)),
    ("Ours (cf. sr)", "ResNet-50-FPN", (35.1, 55.9, 38.0, 23.7, 38.7, 28.6)),
)


def select_methods(names: list[str] | None) -> list[Method]:
    if not names:
        return list(METHODS)
    unknown = sorted(set(names) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"unknown bench method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    if "baseline" not in names:
        raise ValueError("the bench needs the baseline: every ratio and the gap closed are relative to it")
    return [m for m in METHODS if m.name in names]

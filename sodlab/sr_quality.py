"""How good is G as a super-resolver? PSNR and SSIM of G(z_LR) against z_HR, next to bicubic.

Measured on held-out RoIs (the ground-truth boxes of the val split) whose HR patch is a real
target (``hr_valid``), with the same patch protocol as training, so the numbers describe the
patches G actually serves. RoIs are binned by their box's side, sqrt(w * h), the size that puts
a proposal in the SR scope and a pair in G's pretraining bins; COCO's small/medium split uses the
annotation's (mask) area instead, which for the embedded benchmark's shapes is about half the
box's, and would count 40 px boxes as 16-32 px RoIs. Saved as runs/NAME/sr_quality.json.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sodlab.patches import box_side, lr_hr_pairs


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per patch [N] in dB (inf for identical patches)."""
    mse = ((x.clamp(0, data_range) - y) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per patch [N] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03), averaged over channels and valid window positions."""
    x = x.clamp(0, data_range)
    channels = x.shape[1]
    window = _gaussian_window().to(x)[None, None].repeat(channels, 1, 1, 1)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def _finite_mean(values: Tensor) -> float:
    values = values[torch.isfinite(values)]
    return values.mean().item() if values.numel() else math.nan


# Box side sqrt(w * h) bins of the small RoIs, in the detector's input pixels.
SIZE_BINS = (("<8", 0.0, 8.0), ("8-16", 8.0, 16.0), ("16-32", 16.0, 32.0))


def _quality(sr: Tensor, bicubic: Tensor, hr: Tensor) -> dict:
    return {"rois": len(hr),
            "sr": {"psnr": _finite_mean(psnr(sr, hr)), "ssim": _finite_mean(ssim(sr, hr))},
            "bicubic": {"psnr": _finite_mean(psnr(bicubic, hr)), "ssim": _finite_mean(ssim(bicubic, hr))}}


@torch.no_grad()
def evaluate_sr_quality(model, dataset, max_rois: int = 2000) -> dict:
    """PSNR/SSIM of the SR branch (G, or bilinear without G) and of bicubic on held-out small RoIs.

    The RoIs are the val split's ground-truth boxes under 32 px of side (the first ``max_rois``
    in image order). z_LR and G(z_LR) come from ``SRDetector.reconstruct``, exactly as inference
    cuts and serves them, for every RoI (those that ``SRConfig.large_rois="native"`` keeps from G
    included: this measures G); z_HR is the same box cut from the exact twin
    (``target["hr_image"]``, when the dataset was loaded with ``hr_scale``), which holds k x the
    image's detail at every size. Without twins only RoIs large enough for a real HR patch from the
    image itself count (none of them small).
    Reported overall and per box-side bin (``SIZE_BINS``).
    """
    return evaluate_sr_qualities([model], dataset, max_rois)[0]


@torch.no_grad()
def evaluate_sr_qualities(models: list, dataset, max_rois: int = 2000) -> list[dict]:
    """``evaluate_sr_quality`` of each of ``models`` (SR runs with one patch geometry: lr_size,
    scale and context) in one pass over ``dataset``: each image and its twin are decoded, and the
    HR patches cut, once for all of them."""
    geometry = {(m.lr_size, m.scale, m.context) for m in models}
    if len(geometry) != 1:
        raise ValueError(f"SR quality in one pass needs one patch geometry (lr_size, scale, context); got {geometry}")
    (lr_size, scale, context), = geometry
    sides, hr_all, lr_all, sr_all = [], [], [[] for _ in models], [[] for _ in models]
    has_twins = False
    for index in range(len(dataset)):
        image, target = dataset[index]
        boxes = target["boxes"].as_subclass(Tensor)
        side = box_side(boxes)
        small = side < SIZE_BINS[-1][2]
        if "iscrowd" in target:
            small &= target["iscrowd"].as_subclass(Tensor) == 0
        if not small.any():
            continue
        boxes, side = boxes[small], side[small]
        twins = [target["hr_image"]] if "hr_image" in target else None
        has_twins = twins is not None
        _, hr, valid = lr_hr_pairs([image], [boxes], lr_size, scale, context, hr_images=twins)
        keep = torch.ones_like(valid) if twins else valid
        for model, lr_out, sr_out in zip(models, lr_all, sr_all):
            device = next(model.parameters()).device
            out = model.reconstruct([image.to(device)], [boxes[keep].to(device)], judge=False,
                                    every_roi_through_g=True)
            lr_out.append(out["lr_patch"].cpu())
            sr_out.append(out["sr_patch"].cpu())
        hr_all.append(hr[keep])
        sides.append(side[keep])
        if sum(len(h) for h in hr_all) >= max_rois:
            break
    if not hr_all or sum(len(h) for h in hr_all) == 0:
        return [{"rois": 0, "note": "no held-out small RoI has a real HR target (the data has no xk twins)"}
                for _ in models]
    hr, side = torch.cat(hr_all)[:max_rois], torch.cat(sides)[:max_rois]
    qualities = []
    for model, lr_out, sr_out in zip(models, lr_all, sr_all):
        lr, sr = torch.cat(lr_out)[:max_rois], torch.cat(sr_out)[:max_rois]
        bicubic = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        bins = {}
        for label, low, high in SIZE_BINS:
            chosen = (side >= low) & (side < high)
            if chosen.any():
                bins[label] = _quality(sr[chosen], bicubic[chosen], hr[chosen])
        qualities.append({**_quality(sr, bicubic, hr), "bins": bins,
                          "hr_source": "twin" if has_twins else "image",
                          "method": "G" if model.generator is not None else "bilinear (no reconstruction module)"})
    return qualities


@torch.no_grad()
def write_sr_patches(model, dataset, out_dir, max_rois: int = 300, twins=None) -> int:
    """Write the (LR, SR, HR) patches of the val split's small ground-truth objects for browsing.

    LR is the patch the detector's SR branch really gets at inference (``lr_patches``), SR is
    what G makes of it, HR the same region from the exact twin (``twins``, a
    ``coco.twin_source``; or resampled from the image when there is none). Writes
    out_dir/{lr,sr,hr}/<annotation id>.png and out_dir/index.json, the format sodlab.explore
    reads. Returns the number of patches.
    """
    from pathlib import Path

    from PIL import Image

    from torchvision.transforms.functional import pil_to_tensor

    from sodlab.data.coco import apply_box_policy, load_coco_json, read_twin
    from sodlab.io import atomic_write_json

    out_dir = Path(out_dir)
    for kind in ("lr", "sr", "hr"):
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    data = load_coco_json(dataset.ann_file)
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list] = {}
    for ann in apply_box_policy(data, dataset.ann_file, "SR patches"):  # the boxes training and eval see
        w, h = ann["bbox"][2:]
        if not ann.get("iscrowd", 0) and 0 < w * h < model.area_threshold:
            by_image.setdefault(ann["image_id"], []).append(ann)

    def save(t: Tensor, path: Path) -> None:
        array = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(path)

    device = next(model.parameters()).device
    index = []
    for image_id in sorted(by_image):
        anns = by_image[image_id][: max_rois - len(index)]
        if not anns:
            break
        image = dataset.load_image(image_id).float() / 255
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns])
        out = model.reconstruct([image.to(device)], [boxes.to(device)], judge=False, every_roi_through_g=True)
        lr, sr = out["lr_patch"].cpu(), out["sr_patch"].cpu()
        twin = None
        if twins is not None:
            twin = [pil_to_tensor(read_twin(twins, dataset.images[image_id]["file_name"], image_id)).float() / 255]
        _, hr, _ = lr_hr_pairs([image], [boxes], model.lr_size, model.scale, model.context, hr_images=twin)
        for a, lr_i, sr_i, hr_i in zip(anns, lr, sr, hr):
            stem = f"{a['id']}.png"
            save(lr_i, out_dir / "lr" / stem)
            save(sr_i, out_dir / "sr" / stem)
            save(hr_i, out_dir / "hr" / stem)
            index.append({"image_id": image_id, "annotation_id": a["id"], "label": names[a["category_id"]],
                          "lr": f"lr/{stem}", "sr": f"sr/{stem}", "hr": f"hr/{stem}",
                          "psnr": psnr(sr_i[None], hr_i[None]).item(),
                          "bicubic_psnr": psnr(F.interpolate(lr_i[None], scale_factor=model.scale, mode="bicubic",
                                                             align_corners=False), hr_i[None]).item()})
    atomic_write_json(out_dir / "index.json", index)
    return len(index)

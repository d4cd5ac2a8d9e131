"""PSNR/SSIM of the SR branch, and the GAN health check."""
import math

import pytest
import torch

from sodlab.sr_quality import psnr, ssim
from sodlab.train import GanHealth


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert psnr(y, x) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)
    assert math.isinf(psnr(x, x)[0].item())


def test_ssim_of_constant_patches_by_hand():
    # constant patches: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.6, 0.3, 0.01**2
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)
    noisy = (x + 0.2 * torch.randn_like(x, generator=None)).clamp(0, 1)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(0)
    img = torch.rand(1, 3, 32, 32)
    assert ssim(img, (img + 0.05 * torch.randn_like(img)).clamp(0, 1)).item() < ssim(img, img).item()


def test_gan_health_warns_on_pinned_discriminator_and_weak_generator():
    health = GanHealth(window=5, warmup=5)
    messages = [health.update(i, {"d_real_acc": 1.0, "d_fake_acc": 1.0, "g_psnr": 20.0, "bicubic_psnr": 25.0})
                for i in range(1, 11)]
    assert messages[:4] == [None] * 4
    assert "D's accuracy has been 1.0" in messages[4] and "below bicubic" not in messages[4]  # still warming up
    assert "D's accuracy" in messages[9] and "below bicubic" in messages[9]
    healthy = GanHealth(window=5, warmup=0)
    assert all(healthy.update(i, {"d_real_acc": 0.8, "d_fake_acc": 1.0, "g_psnr": 30.0, "bicubic_psnr": 25.0})
               is None for i in range(1, 11))


def test_sr_quality_bins_rois_by_box_side_not_mask_area(tiny_config):
    """A RoI's size is its box's side, as the SR scope and G's pretraining measure it: a 20 px box
    whose mask covers a quarter of it is a 16-32 px RoI, and a 40 px box is no small RoI at all,
    though COCO's area would call them 10 and 20 px."""
    import dataclasses

    from sodlab.models import build_model
    from sodlab.sr_quality import evaluate_sr_quality

    model = build_model(dataclasses.replace(tiny_config, method="sr"), num_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 64, generator=g)
    twin = torch.nn.functional.interpolate(image[None], scale_factor=4, mode="bicubic", align_corners=False)[0]
    boxes = torch.tensor([[2.0, 2.0, 8.0, 8.0], [10.0, 10.0, 30.0, 30.0], [20.0, 20.0, 60.0, 60.0]])
    target = {"boxes": boxes, "area": torch.tensor([36.0, 100.0, 400.0]), "iscrowd": torch.zeros(3, dtype=torch.int64),
              "hr_image": twin.clamp(0, 1)}
    quality = evaluate_sr_quality(model, [(image, target)])
    assert quality["rois"] == 2
    assert {label: entry["rois"] for label, entry in quality["bins"].items()} == {"<8": 1, "16-32": 1}


def test_sr_quality_of_several_runs_in_one_pass_is_each_runs_own_without_running_d(tiny_config):
    """One pass over the held-out images gives each run the report it gets alone, and D, whose
    answers the report does not read, never runs; runs that cut other patches are refused."""
    import dataclasses

    from sodlab.models import build_model
    from sodlab.sr_quality import evaluate_sr_qualities, evaluate_sr_quality

    torch.manual_seed(0)
    models = [build_model(dataclasses.replace(tiny_config, method=m), num_classes=3).eval() for m in ("sr", "sr-no-recon")]
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 64, 64, generator=g)
    twin = torch.nn.functional.interpolate(image[None], scale_factor=4, mode="bicubic", align_corners=False)[0]
    boxes = torch.tensor([[2.0, 2.0, 8.0, 8.0], [10.0, 10.0, 30.0, 30.0], [30.0, 8.0, 42.0, 22.0]])
    target = {"boxes": boxes, "iscrowd": torch.zeros(3, dtype=torch.int64), "hr_image": twin.clamp(0, 1)}
    dataset = [(image, target)] * 2
    alone = [evaluate_sr_quality(m, dataset) for m in models]
    judged = []
    for m in models:
        m.discriminator.register_forward_pre_hook(lambda module, args: judged.append(len(args[0])))
    assert evaluate_sr_qualities(models, dataset) == alone
    assert judged == [], "the report reads G's patches, not D's answers"
    assert alone[0]["method"] == "G" and alone[1]["method"].startswith("bilinear") and alone[0]["rois"] == 6
    other = build_model(dataclasses.replace(tiny_config, method="sr"), num_classes=3).eval()
    other.context = 2 * models[0].context
    with pytest.raises(ValueError, match="one patch geometry"):
        evaluate_sr_qualities([models[0], other], dataset)


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

"""G: the super-resolution generator of the reconstruction module.

G maps a low-resolution RoI patch z_LR [B, 3, lr, lr] (values in [0, 1]) to a super-resolved patch
G(z_LR) [B, 3, lr*scale, lr*scale] in the same image space. The layout follows SRGAN's SRResNet,
which SOD-MTGAN also uses for its generator:

    head conv -> n residual blocks (conv-[BN]-PReLU-conv + skip) -> conv (+ long skip from the head)
    -> log2(scale) x [conv(c -> 4c) -> PixelShuffle(2) -> PReLU] -> output conv (c -> 3)

(a x3 scale takes one x3 stage, conv(c -> 9c) -> PixelShuffle(3), as EDSR's upsampler does)

and the output is a *residual* added to a fixed bicubic upsampling of the input (see forward).
With ``upsample_channels`` = u > 0 the tail is instead one sub-pixel step, as ESPCN's:
conv(c -> u * scale^2) -> PixelShuffle(scale) -> PReLU -> output conv (u -> 3). SRGAN's x2 stages
run a c -> 4c conv at every intermediate size, and at lr 16, c 32, scale 4 the last of them (at
32 x 32) is half of G's multiply-adds; the single step runs its only conv at the LR size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """conv-[BN]-PReLU-conv-[BN] + identity skip, as in SRGAN/SRResNet (EDSR drops the BN)."""

    def __init__(self, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.act = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class UpsampleStage(nn.Module):
    """Learned xf upsampling (f = 2 or 3): conv to f^2 c channels, PixelShuffle(f) rearranges them."""

    def __init__(self, channels: int, factor: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * factor * factor, 3, padding=1)
        self.shuffle = nn.PixelShuffle(factor)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class SubPixelUpsample(nn.Module):
    """Learned xk upsampling in one step: conv to u * k^2 channels at the LR size, PixelShuffle(k)."""

    def __init__(self, channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


def stage_factors(scale: int) -> list[int] | None:
    """SRGAN's x2 stages for a power of 2, EDSR's single x3 stage for 3 (and a x3 stage after the
    x2 ones for 3 * 2^n); None for a scale without such stages (use one sub-pixel step)."""
    twos = 0
    while scale % 2 == 0:
        scale, twos = scale // 2, twos + 1
    return [2] * twos + [3] if scale == 3 else [2] * twos if scale == 1 else None


class SRGenerator(nn.Module):
    """LR RoI patch [B, 3, lr, lr] -> SR patch [B, 3, lr*scale, lr*scale], both in [0, 1] image space.

    Args:
        channels: feature channels of the trunk (SRGAN: 64).
        num_blocks: residual blocks (SRGAN: 16; 6 is the CPU preset).
        scale: upsampling factor, an integer >= 2: any with ``upsample_channels``; otherwise one
            whose stages exist (``stage_factors``: 2^n, 3 * 2^n).
        batch_norm: BN inside the residual blocks as in SRGAN. Off by default: RoI batches vary in
            size and content between the detector's steps and inference, and EDSR showed BN is
            not needed (and slightly harmful) for SR; with it off, train and eval mode agree.
        base_upsample: interpolation mode of the fixed base the residual is added to.
        upsample_channels: 0 for SRGAN's stack of x2 stages at ``channels``; u > 0 for one
            sub-pixel step to u channels at the SR size (cheaper; see the module docstring).

    The output is not clamped: the losses compare raw outputs, and clamping would zero the
    gradient of every pixel that overshoots. Use ``SRGenerator.to_display`` to clamp for viewing.
    """

    def __init__(
        self,
        channels: int = 64,
        num_blocks: int = 6,
        scale: int = 4,
        batch_norm: bool = False,
        base_upsample: str = "bicubic",
        upsample_channels: int = 0,
    ) -> None:
        super().__init__()
        if not (isinstance(scale, int) and scale >= 2):
            raise ValueError(f"SRGenerator: scale must be an integer >= 2, got {scale!r}")
        factors = stage_factors(scale)
        if not upsample_channels and factors is None:
            raise ValueError(f"SRGenerator: x{scale} has no x2 / x3 upsampling stages (2^n or 3 * 2^n); upsample in "
                             "one sub-pixel step instead (upsample_channels > 0, the SR recipe's)")
        self.scale = scale
        self.base_upsample = base_upsample
        # the constructor's arguments that fix the weights' shapes: a pretrained G must match them
        self.arch = {"channels": channels, "num_blocks": num_blocks, "scale": scale,
                     "upsample_channels": upsample_channels}

        # A 9x9 head sees a wide neighbourhood of the small input cheaply (it runs at lr x lr).
        self.head = nn.Sequential(nn.Conv2d(3, channels, 9, padding=4), nn.PReLU(channels))
        self.blocks = nn.Sequential(*[ResidualBlock(channels, batch_norm) for _ in range(num_blocks)])
        self.trunk_out = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(channels) if batch_norm else nn.Identity(),
        )
        if upsample_channels:
            self.upsample = SubPixelUpsample(channels, upsample_channels, scale)
        else:
            self.upsample = nn.Sequential(*[UpsampleStage(channels, factor) for factor in factors])
        # 3x3 rather than SRGAN's 9x9 at the output: this conv runs at the full SR size, where a 9x9
        # kernel would cost 9x more for every RoI on a CPU.
        self.output = nn.Conv2d(upsample_channels or channels, 3, 3, padding=1)

        # Small output weights: the residual starts near zero, so an untrained G is (almost) the
        # bicubic upsampling. Not exactly zero, so that gradients reach every layer from step one.
        nn.init.normal_(self.output.weight, std=1e-3)
        nn.init.zeros_(self.output.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"SRGenerator: expected LR patches [B, 3, h, w], got {tuple(lr.shape)}")
        # Residual learning over a fixed interpolation (as VDSR): the interpolation already carries
        # the low frequencies, so G only has to add the missing high-frequency detail. An untrained G
        # therefore starts as a plain bicubic upsampler instead of noise, so L_MSE and D's class and
        # box heads see a sensible image from the first step and training converges faster.
        base = F.interpolate(lr, scale_factor=self.scale, mode=self.base_upsample, align_corners=False)
        features = self.head(lr)
        features = features + self.trunk_out(self.blocks(features))  # long skip over all blocks
        return base + self.output(self.upsample(features))

    @staticmethod
    def to_display(sr: torch.Tensor) -> torch.Tensor:
        """Clamp an SR patch to [0, 1] for display; never use this inside a loss."""
        return sr.detach().clamp(0.0, 1.0)

"""torchvision's MultiScaleRoIAlign on the CPU as one sparse matrix product, in training and inference.

torchvision's CPU RoI Align runs on one thread, one RoI after another, forward and backward: in a
training step of the cpu preset its backward took about a fifth of the time (README: the
detector's step), and at inference its forward was about a fifth of the detector's time (README:
"RoI pooling as a product at inference too"). But RoI Align is linear in the features. Each output
bin is a fixed bilinear mix of at most ``sampling_ratio**2 * 4`` feature pixels, so the pooled
RoIs of every FPN level together are ``S @ F``: F stacks all levels' pixels as rows (channels as
columns), and S is sparse, one row per output bin. The backward is ``S.T @ grad``. Both products
are multithreaded.

The numbers are torchvision's (``aligned=False``: the same sample points, the same clamping at the
border, the same average), up to float rounding; ``tests/test_roi_pool.py`` compares both ways
with torchvision's kernel. Elsewhere (CUDA, half precision, adaptive sampling) this module is
torchvision's own.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales


def _axis_samples(coords: Tensor, size: Tensor):
    """Bilinear neighbours along one axis of feature maps ``size`` pixels long (one per RoI), as
    torchvision's roi_align kernel takes them: a sample more than a pixel outside contributes
    nothing, one within a pixel of the border is clamped onto it."""
    inside = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0)
    low = coords.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    coords = torch.where(at_end, low.to(coords.dtype), coords)
    high = torch.where(at_end, low, low + 1)
    return low, high, coords - low, inside


def sampling_matrix(rois: Tensor, levels: Tensor, shapes: list[tuple[int, int, int]], scales: list[float],
                    output_size: int, sampling_ratio: int) -> Tensor:
    """The sparse (rois * output_size**2, pixels of all levels) matrix of RoI Align.

    ``rois`` are (image index, x1, y1, x2, y2) in the image frame, ``levels`` the FPN level of each
    (torchvision's LevelMapper), ``shapes`` each level's (batch, height, width) and ``scales`` its
    feature-map scale. Columns address level l's pixel (n, y, x) at
    offset_l + (n * height_l + y) * width_l + x.
    """
    device, dtype = rois.device, rois.dtype
    num, out, ratio = len(rois), output_size, sampling_ratio
    sizes = [b * h * w for b, h, w in shapes]
    offset = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)[levels]
    height = torch.tensor([h for _, h, _ in shapes], device=device)[levels]
    width = torch.tensor([w for _, _, w in shapes], device=device)[levels]
    scale = torch.tensor(scales, device=device, dtype=dtype)[levels]

    # The kernel's arithmetic, operation for operation, so that samples land on the same side of a
    # pixel border: start + bin * b + (i + 0.5) * bin / ratio, bins of extent / out.
    start = rois[:, 1:3] * scale[:, None]
    extent = (rois[:, 3:5] * scale[:, None] - start).clamp(min=1.0)  # aligned=False: at least a pixel
    bin_size = (extent / out)[:, None, None, :]
    bins = torch.arange(out, device=device, dtype=dtype)[None, :, None, None]
    samples = (torch.arange(ratio, device=device, dtype=dtype) + 0.5)[None, None, :, None]
    positions = (start[:, None, None, :] + bins * bin_size + samples * bin_size / ratio).reshape(num, out * ratio, 2)
    x_low, x_high, x_frac, x_in = (t.reshape(num, 1, out, 1, ratio)
                                   for t in _axis_samples(positions[..., 0], width[:, None]))
    y_low, y_high, y_frac, y_in = (t.reshape(num, out, 1, ratio, 1)
                                   for t in _axis_samples(positions[..., 1], height[:, None]))
    # Four corners per sample: dims (roi, bin_y, bin_x, sample_y, sample_x, corner).
    kept = (y_in & x_in).to(dtype) / ratio ** 2  # the kernel averages the ratio^2 samples of a bin
    weights = torch.stack([(1 - y_frac) * (1 - x_frac), (1 - y_frac) * x_frac,
                           y_frac * (1 - x_frac), y_frac * x_frac], dim=-1) * kept[..., None]
    rows = torch.stack([y_low, y_low, y_high, y_high], dim=-1)
    cols = torch.stack([x_low, x_high, x_low, x_high], dim=-1)

    def per_roi(values: Tensor) -> Tensor:  # one value per RoI, over the other five dims
        return values.view(-1, 1, 1, 1, 1, 1)

    pixel = per_roi(offset) + (per_roi(rois[:, 0].long()) * per_roi(height) + rows) * per_roi(width) + cols
    shape = (num, out, out, ratio, ratio, 4)
    pixel, weights = pixel.expand(shape).reshape(num * out * out, -1), weights.expand(shape).reshape(num * out * out, -1)
    crow = torch.arange(0, pixel.numel() + 1, pixel.shape[1], device=device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": noise in every run's output
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        return torch.sparse_csr_tensor(crow, pixel.reshape(-1), weights.reshape(-1), (num * out * out, sum(sizes)),
                                       check_invariants=False)


class _SparseRoIAlign(torch.autograd.Function):
    """out = S @ F, grad_F = S.T @ grad_out, for F the stacked pixels of every level."""

    @staticmethod
    def forward(ctx, matrix: Tensor, *features: Tensor) -> Tensor:
        ctx.save_for_backward(matrix)
        ctx.shapes = [f.shape for f in features]
        stacked = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features])
        return matrix @ stacked

    @staticmethod
    def backward(ctx, grad: Tensor):
        (matrix,) = ctx.saved_tensors
        stacked = matrix.t().to_sparse_csr() @ grad.contiguous()
        grads, start = [], 0
        for n, c, h, w in ctx.shapes:
            grads.append(stacked[start:start + n * h * w].reshape(n, h, w, c).permute(0, 3, 1, 2))
            start += n * h * w
        return (None, *grads)


def set_levels(pool: MultiScaleRoIAlign, x: dict[str, Tensor], image_shapes: list[tuple[int, int]]) -> None:
    """The pooler's scales and FPN level mapper from these features and image sizes, as its first
    forward sets them; a pooler that has them keeps them."""
    if pool.scales is None or pool.map_levels is None:
        pool.scales, pool.map_levels = _setup_scales([x[name] for name in pool.featmap_names], image_shapes,
                                                     pool.canonical_scale, pool.canonical_level)


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign (same arguments, no parameters, the same state dict) that pools on the
    CPU as one sparse product per batch (module docstring)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        first = features[0]
        if not (first.device.type == "cpu" and first.dtype == torch.float32 and self.sampling_ratio > 0
                and self.output_size[0] == self.output_size[1] and sum(len(b) for b in boxes)):
            return super().forward(x, boxes, image_shapes)
        set_levels(self, x, image_shapes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)  # all 0 with a single level (C4)
        shapes = [(f.shape[0], f.shape[2], f.shape[3]) for f in features]
        out = self.output_size[0]
        matrix = sampling_matrix(rois.detach(), levels.to(rois.device), shapes, self.scales, out, self.sampling_ratio)
        pooled = _SparseRoIAlign.apply(matrix, *features)
        return pooled.reshape(len(rois), out, out, -1).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _one_box_matrix(box: tuple[float, float, float, float], height: int, width: int, output_size: int,
                    spatial_scale: float, sampling_ratio: int) -> Tensor:
    """The dense (output_size**2, height * width) sampling matrix of one box on one map (CPU,
    float32). D's read pools the same box from maps of the same size at every step and image, so
    it is built once per patch geometry, not on every call."""
    roi = torch.tensor([[0.0, *box]])
    return sampling_matrix(roi, torch.zeros(1, dtype=torch.long), [(1, height, width)], [spatial_scale], output_size,
                           sampling_ratio).to_dense()


def roi_align_one_box(features: Tensor, box: Tensor, output_size: int, spatial_scale: float,
                      sampling_ratio: int) -> Tensor:
    """torchvision's roi_align of the same ``box`` (x1, y1, x2, y2) in each of the maps ``features``
    [N, C, H, W] (D's read: each patch's object box), as one dense product with the box's sampling
    matrix: forward and backward multithreaded, where the CPU kernel's backward runs on one thread."""
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_one_box: sampling_ratio must be positive, got {sampling_ratio}")
    n, c, h, w = features.shape
    matrix = _one_box_matrix(tuple(box.reshape(4).float().tolist()), h, w, output_size, float(spatial_scale),
                             sampling_ratio).to(features.device, features.dtype)
    return (features.flatten(2) @ matrix.T).view(n, c, output_size, output_size)

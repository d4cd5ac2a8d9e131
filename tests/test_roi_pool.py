"""The sparse-product RoI pooling gives torchvision's numbers, forward and backward."""
import copy
from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, roi_align

from sodlab.models.detector import build_detector, preset
from sodlab.models.roi_pool import SparseMultiScaleRoIAlign, roi_align_one_box


def _boxes(generator, count, size=256):
    """Boxes of every kind RPN proposals come in: sub-pixel, tiny, large, and off the image's edges,
    with some for every FPN level (the coarsest takes boxes over 448 px across)."""
    xy = torch.rand(count, 2, generator=generator) * (size + 20) - 10
    wh = torch.rand(count, 2, generator=generator) ** 3 * size + 0.05
    large = torch.tensor([[-120.0, -100.0, 400.0, 420.0], [0.0, 0.0, 300.0, 260.0], [30.0, 10.0, 200.0, 250.0]])
    return torch.cat([torch.cat([xy, xy + wh], dim=1), large])


def _pool_both_ways(names, map_sizes, boxes, channels=8, images=2):
    generator = torch.Generator().manual_seed(0)
    features = OrderedDict((name, torch.randn(images, channels, s, s, generator=generator, requires_grad=True))
                           for name, s in zip(names, map_sizes))
    features["pool"] = torch.randn(images, channels, 2, 2)  # a level the pooler must ignore
    upstream = torch.randn(sum(len(b) for b in boxes), channels, 7, 7, generator=generator)
    results = []
    for pooler in (MultiScaleRoIAlign(names, 7, 2), SparseMultiScaleRoIAlign(names, 7, 2)):
        for feature in features.values():
            feature.grad = None
        pooled = pooler(features, boxes, [(256, 256)] * images)
        pooled.backward(upstream)
        results.append((pooled.detach(), [features[name].grad.clone() for name in names]))
    return results


@pytest.mark.parametrize("names,map_sizes", [(["0", "1", "2", "3"], [64, 32, 16, 8]), (["0"], [16])],
                         ids=["fpn", "c4"])
def test_pooled_features_and_their_gradients_are_torchvisions(names, map_sizes):
    generator = torch.Generator().manual_seed(1)
    boxes = [_boxes(generator, 60), _boxes(generator, 45)]
    (reference, reference_grads), (pooled, grads) = _pool_both_ways(names, map_sizes, boxes)
    assert pooled.shape == reference.shape == (111, 8, 7, 7)
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        assert reference_grad.abs().sum() > 0
        torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-5)


def test_inference_pools_as_torchvision_without_its_kernel(monkeypatch):
    """Without gradients (inference, the frozen detector's proposals) the product pools too:
    torchvision's numbers, and its single-threaded kernel is never called."""
    generator = torch.Generator().manual_seed(4)
    names = ["0", "1", "2", "3"]
    features = OrderedDict((name, torch.randn(1, 8, s, s, generator=generator)) for name, s in zip(names, [64, 32, 16, 8]))
    features["0"] = features["0"].contiguous(memory_format=torch.channels_last)  # as inference runs the detector
    boxes = [_boxes(generator, 300)]
    with torch.no_grad():
        reference = MultiScaleRoIAlign(names, 7, 2)(features, boxes, [(256, 256)])

        def no_kernel(*args, **kwargs):
            raise AssertionError("torchvision's roi_align kernel was called")

        monkeypatch.setattr(torchvision.ops.poolers, "roi_align", no_kernel)
        pooled = SparseMultiScaleRoIAlign(names, 7, 2)(features, boxes, [(256, 256)])
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-5)


def test_images_without_boxes_pool_nothing():
    generator = torch.Generator().manual_seed(2)
    boxes = [torch.zeros(0, 4), _boxes(generator, 10)]
    (reference, reference_grads), (pooled, grads) = _pool_both_ways(["0", "1"], [64, 32], boxes)
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-5)
    assert grads[0][0].abs().sum() == 0  # image 0 had no box: no gradient reaches it
    (empty, _), (empty_sparse, _) = _pool_both_ways(["0"], [16], [torch.zeros(0, 4)] * 2)
    assert empty.shape == empty_sparse.shape == (0, 8, 7, 7)


def test_a_detector_trains_with_the_same_gradients_as_with_torchvisions_pooler():
    torch.manual_seed(0)
    model = build_detector(preset("cpu", min_size=128, max_size=128, box_batch_size_per_image=32), num_classes=3)
    assert isinstance(model.roi_heads.box_roi_pool, SparseMultiScaleRoIAlign)
    reference = copy.deepcopy(model)
    reference.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0], [60.0, 60.0, 70.0, 75.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 80.0, 50.0, 120.0]]), "labels": torch.tensor([1])}]
    gradients = []
    for detector in (reference, model):
        detector.train()
        torch.manual_seed(1)  # the same RPN and RoI sampling for both
        losses = detector(images, targets)
        sum(losses.values()).backward()
        gradients.append({n: p.grad for n, p in detector.named_parameters()})
    for name, grad in gradients[1].items():
        torch.testing.assert_close(grad, gradients[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("size,channels_last", [((8, 8), False), ((6, 10), False), ((8, 8), True)],
                         ids=["square", "oblong", "channels-last"])
def test_one_box_in_every_map_pools_as_torchvisions_roi_align(size, channels_last):
    """D's read pools the same object box from each patch's map: torchvision's numbers, both ways."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(5, 4, *size, generator=generator)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_(True)
    box = torch.tensor([2.7, 1.3, 29.3, 22.0])  # partly off the oblong map's 24 px height
    reference = roi_align(features, [box[None]] * 5, 7, spatial_scale=0.25, sampling_ratio=2)
    pooled = roi_align_one_box(features, box, 7, 0.25, 2)
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-5)
    upstream = torch.randn(reference.shape, generator=generator)
    (reference_grad,) = torch.autograd.grad(reference, features, upstream)
    (grad,) = torch.autograd.grad(pooled, features, upstream)
    assert reference_grad.abs().sum() > 0
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_one_box(features, box, 7, 0.25, 0)

"""G, D and RoI patches: shapes, exact patch values, LR/HR pairs, gradient flow, a toy D."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from sodlab.losses import GANLossWeights, classification_loss, generator_objective, regression_loss
from sodlab.models.discriminator import MultiTaskDiscriminator, _resnet_stages, small_map_matrix
from sodlab.models.generator import SRGenerator
from sodlab.patches import expand_boxes, extract_patches, lr_hr_pairs, lr_patches


# ---------------------------------------------------------------- G and D


def test_generator_shapes_and_scale_check():
    torch.manual_seed(0)
    lr = torch.rand(2, 3, 16, 16)
    assert SRGenerator(channels=8, num_blocks=2)(lr).shape == (2, 3, 64, 64)
    assert SRGenerator(channels=8, num_blocks=1, scale=2)(lr).shape == (2, 3, 32, 32)
    # x3 (data converted with --twins 3): EDSR's x3 stage, or the recipe's one sub-pixel step
    assert SRGenerator(channels=8, num_blocks=1, scale=3)(lr).shape == (2, 3, 48, 48)
    assert SRGenerator(channels=8, num_blocks=1, scale=6)(lr).shape == (2, 3, 96, 96)
    assert SRGenerator(channels=8, num_blocks=1, scale=5, upsample_channels=4)(lr).shape == (2, 3, 80, 80)
    with pytest.raises(ValueError, match="no x2 / x3 upsampling stages"):
        SRGenerator(scale=5)
    with pytest.raises(ValueError, match="integer >= 2"):
        SRGenerator(scale=1)


@pytest.mark.parametrize("upsample_channels", [0, 8])
def test_untrained_generator_is_almost_bicubic(upsample_channels):
    torch.manual_seed(0)
    lr = torch.rand(2, 3, 16, 16)
    sr = SRGenerator(upsample_channels=upsample_channels)(lr)
    bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    assert (sr - bicubic).abs().max().item() < 0.02


def test_sub_pixel_tail_has_the_shapes_and_costs_less_than_half_the_x2_stages():
    from torch.utils.flop_counter import FlopCounterMode

    lr = torch.rand(1, 3, 16, 16)
    flops = {}
    for upsample_channels in (0, 8):
        generator = SRGenerator(channels=32, num_blocks=4, scale=4, upsample_channels=upsample_channels)
        assert generator.arch["upsample_channels"] == upsample_channels
        with FlopCounterMode(display=False) as counter:
            assert generator(lr).shape == (1, 3, 64, 64)
        flops[upsample_channels] = counter.get_total_flops()
    assert flops[8] < 0.5 * flops[0], flops
    assert SRGenerator(channels=8, num_blocks=1, scale=2, upsample_channels=4)(lr).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("trunk", ["compact", "resnet50", "resnet101"])
def test_discriminator_output_shapes(trunk):
    torch.manual_seed(0)
    out = MultiTaskDiscriminator(num_classes=4, trunk=trunk)(torch.rand(2, 3, 64, 64))
    assert out["adv"].shape == (2,)
    assert out["cls"].shape == (2, 4)
    assert out["box"].shape == (2, 16)


def test_discriminator_answer_does_not_depend_on_batch_or_mode():
    # GroupNorm (default): a patch gets the same outputs alone or among others, train or eval.
    torch.manual_seed(0)
    discriminator = MultiTaskDiscriminator(num_classes=3)
    patches = torch.rand(5, 3, 64, 64)
    together = discriminator(patches)
    alone = discriminator(patches[:1])
    discriminator.eval()
    evaluated = discriminator(patches[:1])
    for key in ("adv", "cls", "box"):
        assert torch.allclose(together[key][:1], alone[key], atol=1e-5)
        assert torch.allclose(alone[key], evaluated[key], atol=1e-6)


def _resnet_body(depth: str) -> IntermediateLayerGetter:
    """A random torchvision ResNet's stages as the detector's FPN backbone reads them, in eval mode."""
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, depth)(norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    for module in resnet.modules():  # FrozenBatchNorm2d starts as the identity: give it statistics
        if isinstance(module, torchvision.ops.misc.FrozenBatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.normal_(1, 0.1)
    return IntermediateLayerGetter(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}).eval()


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
def test_resnet_stages_of_a_patch_are_torchvisions_with_its_single_pixel_convolutions_as_products(depth):
    """D's read runs the detector's ResNet stages itself: at G's 32 px patch the last stage is a
    single pixel, where a padded 3x3 convolution is its centre tap's product. The stage outputs
    and the gradient that reaches the patch (and so G) are torchvision's."""
    body = _resnet_body(depth)
    convolutions = []
    body.layer4[-1].conv2.register_forward_hook(lambda *args: convolutions.append(1))  # a 3x3 conv
    for side, single_pixel in ((32, True), (64, False)):
        patches = torch.rand(3, 3, side, side, requires_grad=True)
        convolutions.clear()
        stages = _resnet_stages(body, patches)
        assert bool(convolutions) != single_pixel
        reference = list(body(patches).values())
        assert [s.shape for s in stages] == [r.shape for r in reference]
        assert reference[-1].shape[-1] == side // 32
        upstream = [torch.randn(r.shape) for r in reference]
        grad = torch.autograd.grad(stages, patches, upstream)[0]
        reference_grad = torch.autograd.grad(reference, patches, upstream)[0]
        for stage, expected in zip(stages, reference):
            torch.testing.assert_close(stage, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_resnet_stages_at_inference_take_the_2x2_stage_convolutions_as_dense_products(depth):
    """Without autograd, the 3x3 convolutions on the third stage's 2 x 2 maps of a 32 px patch run
    as products with their dense matrices (and with autograd as convolutions): the same stage
    outputs as torchvision's, and a matrix rebuilt when the weights change."""
    body = _resnet_body(depth)
    conv, convolutions = body.layer3[-1].conv2, []  # a 3x3 conv on 2 x 2 maps
    conv.register_forward_hook(lambda *args: convolutions.append(1))
    patches = torch.rand(3, 3, 32, 32)
    updates = [lambda: conv.weight.mul_(-1.5),  # in place, as an optimizer step or a loaded checkpoint
               lambda: setattr(conv, "weight", torch.nn.Parameter(conv.weight.flip(-1)))]  # a new tensor
    for update in [None, *updates]:
        if update is not None:
            with torch.no_grad():
                update()
        with torch.no_grad():
            stages = _resnet_stages(body, patches)
            reference = list(body(patches).values())  # torchvision's forward: every layer a convolution
        assert reference[2].shape[-2:] == (2, 2) and len(convolutions) == 1  # the reference's call alone
        for stage, expected in zip(stages, reference):
            # float rounding, which depends on the thread count: on one thread ResNet-50's last
            # stages differ by up to 1.3e-5; a wrong tap would differ by the features' own size
            torch.testing.assert_close(stage, expected, rtol=1e-4, atol=1e-4)
        convolutions.clear()
    _resnet_stages(body, patches)  # with autograd
    assert len(convolutions) == 1


@pytest.mark.parametrize("kernel, stride, padding, size, bias", [
    (3, 1, 1, (2, 2), False), (3, 2, 1, (2, 2), True), (3, 1, 1, (1, 2), True), (5, 1, 2, (2, 3), True)])
def test_small_map_matrix_is_the_convolution(kernel, stride, padding, size, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, kernel, stride, padding, bias=bias)
    x = torch.randn(5, 4, *size)
    matrix, offset, out_size = small_map_matrix(conv, *size)
    with torch.no_grad():
        expected = conv(x)
        product = x.flatten(1) @ matrix + (0 if offset is None else offset)
    assert out_size == tuple(expected.shape[-2:])
    torch.testing.assert_close(product.view(expected.shape), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- patches


def test_expand_boxes_by_hand():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # w 20, h 40, centre (20, 40)
    # 0.1 of the side on each side: w 24, h 48
    assert expand_boxes(box, 0.1)[0].tolist() == pytest.approx([8.0, 16.0, 32.0, 64.0])
    # square: both sides 40 first, then 48 -> half 24 about the centre
    assert expand_boxes(box, 0.1, square=True)[0].tolist() == pytest.approx([-4.0, 16.0, 44.0, 64.0])
    assert expand_boxes(box, 0.0).tolist() == box.tolist()


def test_extract_patches_shapes_and_constant_colour():
    colour = torch.tensor([0.2, 0.5, 0.8])
    images = colour[None, :, None, None].expand(2, 3, 40, 50).contiguous()
    boxes = [torch.tensor([[5.0, 5.0, 9.0, 8.0], [0.0, 0.0, 50.0, 40.0]]), torch.tensor([[10.0, 12.0, 30.0, 30.0]])]
    patches = extract_patches(images, boxes, size=16, context=0.0)
    assert patches.shape == (3, 3, 16, 16)
    assert torch.allclose(patches, colour[None, :, None, None].expand_as(patches), atol=1e-6)
    # a list of differently sized images works the same way (default context 0.1, boxes inside)
    inner = [torch.tensor([[5.0, 5.0, 9.0, 8.0], [10.0, 10.0, 40.0, 30.0]]), torch.tensor([[10.0, 12.0, 30.0, 30.0]])]
    listed = extract_patches([images[0], images[1, :, :35, :35]], inner, size=8)
    assert listed.shape == (3, 3, 8, 8)
    assert torch.allclose(listed, colour[None, :, None, None].expand_as(listed), atol=1e-6)
    # context that reaches more than a pixel beyond the image reads 0 there, as roi_align does.
    # The whole-image box grows to [-5, -4, 55, 44]: 12 bins of 5 px across with 5 samples each;
    # in the outer bins at most the one sample within a pixel of the image is clamped onto it, the
    # others read 0, so the outer columns hold at most colour / 5.
    whole = extract_patches(images[:1], [torch.tensor([[0.0, 0.0, 50.0, 40.0]])], size=12)[0]
    assert (whole[:, 6, [0, 11]] <= colour[:, None] / 5 + 1e-6).all()
    assert torch.allclose(whole[:, 6, 6], colour, atol=1e-6)


def test_extract_patches_of_a_horizontal_ramp():
    # pixel column p holds p / 100; its centre is at x = p + 0.5, so the image at continuous x is
    # (x - 0.5) / 100 (bilinear interpolation of a linear ramp is exact).
    ramp = (torch.arange(100.0) / 100).expand(1, 3, 60, 100).contiguous()
    box = torch.tensor([[20.0, 10.0, 60.0, 50.0]])  # 40 px wide -> 8 bins of 5 px
    patch = extract_patches(ramp, [box], size=8, context=0.0)[0]
    # bin j spans x in [20 + 5j, 25 + 5j); the mean of a linear function over it is its centre
    # value ((22.5 + 5j) - 0.5) / 100 = (22 + 5j) / 100
    expected = (22 + 5 * torch.arange(8.0)) / 100
    assert torch.allclose(patch, expected.expand(3, 8, 8), atol=1e-6)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="image 0 box 1"):
        extract_patches(torch.rand(1, 3, 8, 8), [torch.tensor([[0.0, 0.0, 4.0, 4.0], [3.0, 0.0, 3.0, 4.0]])], 4)
    with pytest.raises(ValueError, match="dtype"):
        extract_patches(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [torch.zeros(0, 4)], 4)


# ---------------------------------------------------------------- LR/HR pairs

# boxes with context 0.1 cover 1.2x their side; HR at 64 px is real when 1.2 * side >= 64
PAIR_BOXES = torch.tensor(
    [
        [20.0, 20.0, 80.0, 80.0],  # 72 px expanded -> valid
        [30.0, 30.0, 70.0, 120.0],  # 48 px wide expanded -> invalid
        [100.0, 100.0, 154.0, 154.0],  # 64.8 px -> valid
        [150.0, 20.0, 203.0, 73.0],  # 63.6 px -> invalid
        [200.0, 200.0, 206.0, 208.0],  # tiny -> invalid
    ]
)


def _smooth_image(seed: int, size: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 16, size // 16, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_lr_hr_pairs_from_image():
    image = _smooth_image(0)
    lr, hr, valid = lr_hr_pairs(image, [PAIR_BOXES], lr_size=16, scale=4)
    assert lr.shape == (5, 3, 16, 16) and hr.shape == (5, 3, 64, 64)
    assert valid.tolist() == [True, False, True, False, False]
    # valid: LR is exactly the area average of HR
    assert torch.equal(lr[valid], F.avg_pool2d(hr[valid], 4))
    # invalid: LR is exactly what inference gives G
    assert torch.equal(lr[~valid], lr_patches(image, [PAIR_BOXES])[~valid])
    # ... and close to it for valid RoIs too (both are area averages of the same region; measured
    # max difference 0.0021 on random interior boxes of this smooth image)
    assert (lr[valid] - lr_patches(image, [PAIR_BOXES])[valid]).abs().max().item() < 0.005
    # the literal protocol pools every HR patch
    lr_pooled, _, _ = lr_hr_pairs(image, [PAIR_BOXES], small_lr="pooled")
    assert torch.equal(lr_pooled, F.avg_pool2d(hr, 4))


def test_lr_equals_inference_lr_on_a_grid_aligned_box():
    # a 64 px box on the pixel grid: roi_align at 64 hits pixel centres (1 sample / bin), at 16 it
    # averages 4x4 pixel centres per bin: both are the exact 4x4 block means of the image.
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    box = [torch.tensor([[32.0, 32.0, 96.0, 96.0]])]
    lr, hr, valid = lr_hr_pairs(image, box, context=0.0)
    assert valid.tolist() == [True]
    assert torch.allclose(hr[0], image[0, :, 32:96, 32:96], atol=1e-6)
    assert torch.allclose(lr, lr_patches(image, box, context=0.0), atol=1e-6)
    assert torch.allclose(lr[0], F.avg_pool2d(image[:, :, 32:96, 32:96], 4)[0], atol=1e-6)


def test_lr_hr_pairs_from_exact_twin():
    generator = torch.Generator().manual_seed(2)
    twin = torch.rand(1, 3, 256, 256, generator=generator)  # x4 twin
    image = F.avg_pool2d(twin, 4)  # the 64x64 image is the twin's area average
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0], [30.0, 30.0, 42.0, 42.0]])]  # 16 px, 12 px
    lr, hr, valid = lr_hr_pairs(image, boxes, context=0.0, hr_images=twin)  # hr_scale inferred: 4
    # 16 LR px = 64 twin px >= hr_size -> real HR target; 12 LR px = 48 twin px -> not
    assert valid.tolist() == [True, False]
    # the HR target is the twin's own pixels (64 px box at 64: one sample on each pixel centre)
    assert torch.allclose(hr[0], twin[0, :, 32:96, 32:96], atol=1e-6)
    assert torch.equal(lr[0], F.avg_pool2d(hr[:1], 4)[0])
    # and its area average is exactly the LR image, i.e. what inference cuts from the image
    assert torch.allclose(lr[0], image[0, :, 8:24, 8:24], atol=1e-6)
    assert torch.allclose(lr, lr_patches(image, boxes, context=0.0), atol=1e-6)
    # the same box is not valid without the twin (16 px < 64 px)
    assert lr_hr_pairs(image, boxes, context=0.0)[2].tolist() == [False, False]
    with pytest.raises(ValueError, match="twin"):
        lr_hr_pairs(image, boxes, hr_images=twin[:, :, :200], hr_scale=4)


# ---------------------------------------------------------------- gradient flow


def _tiny_gan(seed: int = 0):
    torch.manual_seed(seed)
    generator = SRGenerator(channels=8, num_blocks=2)
    discriminator = MultiTaskDiscriminator(num_classes=3)
    lr = torch.rand(4, 3, 16, 16)
    hr = torch.rand(4, 3, 64, 64)
    labels = torch.tensor([1, 2, 0, 1])
    t_star = torch.randn(4, 4) * 0.1
    return generator, discriminator, lr, hr, labels, t_star


def test_cls_and_reg_gradients_reach_every_generator_parameter():
    generator, discriminator, lr, _, labels, t_star = _tiny_gan()
    for loss_fn in (
        lambda d: classification_loss(d["cls"], None, labels),
        lambda d: regression_loss(d["box"], t_star, labels),
    ):
        generator.zero_grad()
        loss_fn(discriminator(generator(lr))).backward()
        for name, param in generator.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def _generator_grads(generator, discriminator, lr, hr, labels, t_star, weights):
    generator.zero_grad()
    discriminator.zero_grad()
    sr = generator(lr)
    valid = torch.tensor([True, True, False, True])
    generator_objective(discriminator(sr), sr, hr, valid, labels, t_star, weights)["total"].backward()
    return torch.cat([p.grad.flatten() for p in generator.parameters()])


def test_adversarial_head_takes_no_part_when_alpha_is_zero():
    generator, discriminator, lr, hr, labels, t_star = _tiny_gan()
    discriminator.eval()  # fixed BN statistics, so two forwards see the same D
    for alpha, should_differ in ((0.0, False), (1.0, True)):
        weights = GANLossWeights(adv=alpha)
        grads = _generator_grads(generator, discriminator, lr, hr, labels, t_star, weights)
        if alpha == 0.0:
            assert discriminator.adv_head.weight.grad is None
        # Change only the adversarial head: G's gradient must not move unless alpha > 0.
        saved = [p.detach().clone() for p in discriminator.adv_head.parameters()]
        with torch.no_grad():
            for p in discriminator.adv_head.parameters():
                p.add_(torch.randn_like(p))
        grads_changed_head = _generator_grads(generator, discriminator, lr, hr, labels, t_star, weights)
        with torch.no_grad():
            for p, s in zip(discriminator.adv_head.parameters(), saved):
                p.copy_(s)
        assert (not torch.allclose(grads, grads_changed_head)) == should_differ


# ---------------------------------------------------------------- toy adversarial training


def test_discriminator_learns_real_vs_fake_on_a_toy():
    torch.manual_seed(0)
    discriminator = MultiTaskDiscriminator(num_classes=2)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        real = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)  # smooth
        fake = torch.rand(n, 3, 64, 64, generator=g)  # noise
        return torch.cat([real, fake]), torch.cat([torch.ones(n), torch.zeros(n)])

    for step in range(50):
        patches, target = batch(16, seed=step)  # real and fake in one batch (BN, see D's docstring)
        loss = F.binary_cross_entropy_with_logits(discriminator(patches)["adv"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    discriminator.eval()
    patches, target = batch(64, seed=1000)  # unseen patches
    with torch.no_grad():
        accuracy = ((discriminator(patches)["adv"] > 0).float() == target).float().mean().item()
    assert accuracy > 0.9

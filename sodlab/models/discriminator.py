"""D: the multi-task discriminator of the reconstruction module.

D looks at one RoI patch (a real HR patch z_HR or an SR patch G(z_LR)) and answers three questions
at once, as in SOD-MTGAN and the paper's objective:

    "adv": is the patch a real HR patch?            D_thetaD   -> [B] logit
    "cls": which class is in it (0 = background)?   D_cls      -> [B, num_classes] logits
    "box": how must the proposal move?              t_SR       -> [B, 4 * num_classes] deltas

The box deltas are class-specific and use torchvision's BoxCoder encoding relative to the proposal
the patch was cut from, exactly like FastRCNNPredictor.bbox_pred, so the detector's own BoxCoder
(weights (10, 10, 5, 5)) decodes them and the class and box heads can stand in for the detector's
box head on small RoIs.
"""
from __future__ import annotations

import copy
import math
import weakref

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.ops.poolers import _infer_scale, initLevelMapper

from sodlab.models.roi_pool import roi_align_one_box


def norm_layer(kind: str, channels: int) -> nn.Module:
    """GroupNorm(32 groups or fewer) or BatchNorm2d, see MultiTaskDiscriminator's ``norm``."""
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"MultiTaskDiscriminator: unknown norm {kind!r}, expected 'group' or 'batch'")


def compact_trunk(widths: tuple[int, ...] = (32, 64, 128, 256), norm: str = "group") -> nn.Sequential:
    """Strided conv-norm-LeakyReLU stages 3 -> 32 -> 64 -> 128 -> 256 (each halves the size).

    Like the SRGAN discriminator, the first stage has no normalisation (normalising raw pixels
    would discard the absolute intensity statistics that tell real from fake) and LeakyReLU(0.2)
    keeps gradients flowing to G for negative pre-activations.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for i, width in enumerate(widths):
        layers.append(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=i == 0))
        if i > 0:
            layers.append(norm_layer(norm, width))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        in_channels = width
    return nn.Sequential(*layers)


def resnet_trunk(name: str, norm: str = "group") -> nn.Sequential:
    """torchvision ResNet-50/101 up to layer4 + global average pool (the paper's backbone scale).

    Randomly initialised (weights=None): this project never downloads weights. With norm="group"
    every BatchNorm becomes GroupNorm (32 groups, 16 on 64 channels), the setting known to train ResNets from scratch
    (He et al., "Rethinking ImageNet Pre-training").
    """
    builders = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}
    resnet = builders[name](weights=None, norm_layer=lambda channels: norm_layer(norm, channels))
    return nn.Sequential(
        resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
        resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        resnet.avgpool, nn.Flatten(1),
    )


class MultiTaskDiscriminator(nn.Module):
    """Patch [B, 3, hr, hr] -> {"adv": [B], "cls": [B, num_classes], "box": [B, 4 * num_classes]}.

    Args:
        num_classes: number of classes *including* background (torchvision's convention, so
            C + 1 for C object classes; label 0 is background).
        trunk: "compact" (CPU preset), "resnet50" or "resnet101".
        norm: "group" (default) or "batch". GroupNorm makes D's answer for a patch independent of
            the other patches in its batch and identical in train and eval mode. That matters
            here: D's batches mix real and fake patches in varying numbers, and D's class and box
            heads are used at inference (eval mode) on batches of small RoIs only. With BatchNorm,
            a D trained to 100% real/fake accuracy in train mode scored 50% in eval mode on the toy of
            tests/test_gan_parts.py, because running statistics lag a fast-moving D. If you pick
            "batch", feed real and fake patches through D as *one* batch.
        hidden: width of the shared fully connected layer in front of the three heads.
    """

    def __init__(self, num_classes: int, trunk: str = "compact", norm: str = "group", hidden: int = 256) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"MultiTaskDiscriminator: num_classes counts background too, need >= 2, got {num_classes}")
        self.num_classes = num_classes
        if trunk == "compact":
            widths = (32, 64, 128, 256)
            # Keep a 4x4 grid instead of pooling to 1x1: box regression needs to know *where* the
            # object's edges are inside the patch, which a global average throws away.
            self.trunk = nn.Sequential(compact_trunk(widths, norm), nn.AdaptiveAvgPool2d(4), nn.Flatten(1))
            trunk_features = widths[-1] * 4 * 4
        elif trunk in ("resnet50", "resnet101"):
            self.trunk = resnet_trunk(trunk, norm)
            trunk_features = 2048
        else:
            raise ValueError(f"MultiTaskDiscriminator: unknown trunk {trunk!r}, expected compact, resnet50 or resnet101")
        self.shared = nn.Sequential(nn.Linear(trunk_features, hidden), nn.LeakyReLU(0.2, inplace=True))
        self.adv_head = nn.Linear(hidden, 1)
        self.cls_head = nn.Linear(hidden, num_classes)
        self.box_head = nn.Linear(hidden, 4 * num_classes)
        # Detectron/torchvision-style small init for the box deltas: proposals start un-moved.
        nn.init.normal_(self.box_head.weight, std=0.001)
        nn.init.zeros_(self.box_head.bias)

    read_trains = False  # every layer of this D is in ``judge``

    def read(self, patches: torch.Tensor) -> torch.Tensor:
        """D's frozen part: none, every layer of this D trains, so it reads the patches as they are
        (DetectorTrunkDiscriminator.read has one)."""
        if patches.dim() != 4 or patches.shape[1] != 3:
            raise ValueError(f"MultiTaskDiscriminator: expected patches [B, 3, h, w], got {tuple(patches.shape)}")
        return patches

    def judge(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """D's answers on what ``read`` gave."""
        features = self.shared(self.trunk(patches))
        return {
            "adv": self.adv_head(features).squeeze(-1),
            "cls": self.cls_head(features),
            "box": self.box_head(features),
        }

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.judge(self.read(patches))


def _single_pixel_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """conv(x) as one matrix product when x is a single pixel (and so is the output); else None.

    G's patch is a single pixel at the ResNet's last stage (stride 32). A 3x3 convolution with
    padding 1 meets that pixel with its centre tap alone and multiplies the other eight by the zero
    padding, yet the convolution kernel computes all nine. The centre tap's matrix times the pixel
    is the same sum without the zeros (equal up to float rounding), in a fraction of the time.
    """
    if not _plain(conv):
        return None
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    # one output pixel ((1 + 2p - k) // s == 0), whose tap p meets the input pixel
    if (x.shape[-2:] != (1, 1) or not (0 <= 1 + 2 * ph - kh < sh and 0 <= 1 + 2 * pw - kw < sw)
            or ph >= kh or pw >= kw):
        return None
    return F.linear(x.flatten(1), conv.weight[:, :, ph, pw], conv.bias).view(len(x), -1, 1, 1)


def _plain(conv: nn.Conv2d) -> bool:
    """A convolution that is a sum of taps over zero padding: no groups, dilation or other padding."""
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def small_map_matrix(conv: nn.Conv2d, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """``conv`` on a ``height`` x ``width`` map as a dense linear map: the matrix
    [C_in * H * W, C_out * H_out * W_out], its bias and (H_out, W_out), so that
    conv(x) = (x.flatten(1) @ matrix + bias).view(N, C_out, H_out, W_out).

    Entry (input channel i at input pixel p, output channel o at output pixel q) is the tap of
    the kernel that meets p when the kernel sits at q, or zero where none does. The matrix is
    stored in the product's order: F.linear's transposed weight multiplied slower at the batches
    of G's patches (README: "D's read on 2 x 2 maps as dense products").
    """
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    device = conv.weight.device
    oy, ox = (t.reshape(-1, 1) for t in torch.meshgrid(torch.arange(out_h, device=device),
                                                       torch.arange(out_w, device=device), indexing="ij"))
    iy, ix = (t.reshape(1, -1) for t in torch.meshgrid(torch.arange(height, device=device),
                                                       torch.arange(width, device=device), indexing="ij"))
    ky, kx = iy - oy * sh + ph, ix - ox * sw + pw  # [output pixels, input pixels]
    meets = (ky >= 0) & (ky < kh) & (kx >= 0) & (kx < kw)
    taps = conv.weight[:, :, ky.clamp(0, kh - 1), kx.clamp(0, kw - 1)] * meets  # [C_out, C_in, out px, in px]
    matrix = taps.permute(1, 3, 0, 2).reshape(conv.in_channels * height * width, conv.out_channels * out_h * out_w)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(out_h * out_w)
    return matrix.contiguous(), bias, (out_h, out_w)


# Each convolution's dense matrix on its small map (``_small_map_conv``): (key, matrix, bias, output
# size), the key holding the weight tensor itself, its version and the map size, so that other or
# updated weights (a moved model, an optimizer step, a loaded state dict) build a new matrix.
_SMALL_MAP_MATRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _small_map_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """conv(x) as one product with the convolution's dense matrix when x has fewer pixels than
    the kernel has taps, at inference; else None.

    At G's 32 px patch the ResNet's third stage is 2 x 2. A padded 3x3 convolution there meets 4
    input pixels at each output pixel, yet computes all 9 taps; its dense matrix holds the 4 x 4
    taps that meet, 2.25x fewer multiply-adds, as one matrix product. Building the matrix costs
    more than the convolution it replaces, so it is built once per weights and map size and kept.
    A kept matrix is outside autograd's graph, so this runs only without autograd (inference); in
    training the convolution runs as before, and training is bitwise what it was.
    """
    (kh, kw), (height, width) = conv.kernel_size, x.shape[-2:]
    if torch.is_grad_enabled() or not _plain(conv) or height * width >= kh * kw:
        return None
    key = (conv.weight, conv.weight._version, height, width)
    cached = _SMALL_MAP_MATRICES.get(conv)
    if cached is None or not (cached[0][0] is key[0] and cached[0][1:] == key[1:]):
        cached = (key, *small_map_matrix(conv, height, width))
        _SMALL_MAP_MATRICES[conv] = cached
    _, matrix, bias, out_size = cached
    flat = x.flatten(1)
    out = flat @ matrix if bias is None else torch.addmm(bias, flat, matrix)
    return out.view(len(x), conv.out_channels, *out_size)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    out = _single_pixel_conv(conv, x)
    if out is None:
        out = _small_map_conv(conv, x)
    return conv(x) if out is None else out


def _resnet_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock or Bottleneck forward, each convolution through ``_conv``."""
    if isinstance(block, torchvision.models.resnet.BasicBlock):
        out = block.relu(block.bn1(_conv(block.conv1, x)))
        out = block.bn2(_conv(block.conv2, out))
    elif isinstance(block, torchvision.models.resnet.Bottleneck):
        out = block.relu(block.bn1(_conv(block.conv1, x)))
        out = block.relu(block.bn2(_conv(block.conv2, out)))
        out = block.bn3(_conv(block.conv3, out))
    else:
        return block(x)
    downsample = block.downsample
    if downsample is None:
        identity = x
    elif isinstance(downsample, nn.Sequential) and len(downsample) == 2 and isinstance(downsample[0], nn.Conv2d):
        identity = downsample[1](_conv(downsample[0], x))  # torchvision's conv1x1 and norm
    else:
        identity = downsample(x)
    return block.relu(out + identity)


def _resnet_stages(body: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The ResNet stage outputs the FPN reads (torchvision's IntermediateLayerGetter), in order,
    with each residual block through ``_resnet_block``: the same maps, with the convolutions of a
    single pixel, and at inference those of maps smaller than their kernel, computed as matrix
    products (``_single_pixel_conv``, ``_small_map_conv``)."""
    outputs = []
    for name, module in body.items():
        if isinstance(module, nn.Sequential):
            for block in module:
                x = _resnet_block(block, x)
        else:
            x = module(x)
        if name in body.return_layers:
            outputs.append(x)
    return outputs


# A torchvision ResNet's stages in order; conv1 comes with its bn1.
RESNET_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def finest_level_scale(pool, box: torch.Tensor, finest: torch.Tensor, size: tuple[int, int]) -> float | None:
    """The spatial scale of ``finest`` (the FPN's finest map of an image of ``size``) if ``pool``
    (torchvision's MultiScaleRoIAlign) pools ``box`` from that level, else None.

    Decided the way the pooler decides, but from the map itself: the pooler sets its scales and
    level mapper on its first forward only, so reading them would make a D that reads before its
    detector has pooled (a model scoring with another's shared ``detect``, the RoI inspector on a
    freshly loaded model) take the whole pyramid's path on its first batch, and in bf16 round
    otherwise. Like torchvision, this assumes that each coarser level halves the map.
    """
    scale = _infer_scale(finest, list(size))
    k_min = round(-math.log2(scale))
    mapper = initLevelMapper(k_min, k_min + len(pool.featmap_names) - 1, pool.canonical_scale, pool.canonical_level)
    return scale if int(mapper([box.reshape(1, 4)])[0]) == 0 else None


class DetectorTrunkDiscriminator(nn.Module):
    """D whose trunk is the seed's trained detector, and whose heads start as its box head.

    SOD-MTGAN's D is an ImageNet-pretrained ResNet; this project downloads no weights, and the one
    trained network it has is the detector the SR branch serves (the staged schedule). So D reads
    a patch as the detector reads an image: the detector's backbone and FPN (frozen, shared, never
    copied: its weights are saved once, as the detector's), then its RoI pooling of the patch's
    object box (the patch less its context margin), then D's own box head and predictor, copies of
    the detector's trained ones that D fine-tunes, and an adversarial head on the same features.
    A super-resolved small object is then judged by a network that already knows medium objects
    (README: "D built on the detector").

    Only the staged schedule can use it: there the detector is finished and frozen, so D's losses
    never reach the detector's weights.

    With ``tune_from`` (a ResNet stage: conv1, layer1, ..., layer4) D reads with its own copy of
    the detector's backbone and FPN instead, and fine-tunes the copy from that stage on with its
    heads, as SOD-MTGAN's D trains its ResNet: the features the detector learned on whole images
    adapt to small objects seen at G's scale. The earlier stages stay the detector's weights: tuned
    too, they learn to read bilinear patches nearly as well as G's, and G's share of the gain
    falls by a third (README: "D fine-tunes a copy of the detector's backbone"). The copy's BatchNorm keeps
    the detector's statistics (eval mode): D's batches are a few dozen patches of one size, half
    of them fake. It costs D's checkpoint the backbone's weights and the training step a read
    with gradients for D's own step, but nothing at inference, which reads with the copy.
    """

    def __init__(self, detector: nn.Module, context: float, tune_from: str | None = None) -> None:
        super().__init__()
        # a plain list, not a submodule: the detector belongs to SRDetector, which saves and moves it
        self._detector = [detector]
        self.context = context
        heads = detector.roi_heads
        self.trunk = copy.deepcopy(detector.backbone) if tune_from else None
        self.tune_from = tune_from
        self.box_head = copy.deepcopy(heads.box_head)
        self.box_predictor = copy.deepcopy(heads.box_predictor)
        self.adv_head = nn.Linear(heads.box_predictor.cls_score.in_features, 1)

    @property
    def read_trains(self) -> bool:
        """Whether ``read`` has weights that D's step trains (its tuned copy of the backbone)."""
        return self.trunk is not None

    def init_from_detector(self) -> None:
        """Copy the detector's trained box head and predictor (and backbone, for a tuned trunk)
        into D's, after the detector's weights load."""
        detector = self._detector[0]
        self.box_head.load_state_dict(detector.roi_heads.box_head.state_dict())
        self.box_predictor.load_state_dict(detector.roi_heads.box_predictor.state_dict())
        if self.trunk is not None:
            self.trunk.load_state_dict(detector.backbone.state_dict())
            kept = RESNET_STAGES[:RESNET_STAGES.index(self.tune_from)]
            for name, parameter in self.trunk.named_parameters():
                # body.<stage>.* are the ResNet's; fpn.* tune with the late stages
                parameter.requires_grad_(not (name.startswith("body.") and name.split(".")[1] in kept))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.trunk is not None:
            self.trunk.eval()  # BatchNorm keeps the detector's statistics (see the class docstring)
        return self

    def object_box(self, height: int, width: int, device) -> torch.Tensor:
        """The RoI's own box inside its patch: the patch less the context margin on each side."""
        c = self.context
        lo, hi = c / (1 + 2 * c), (1 + c) / (1 + 2 * c)
        return torch.tensor([[lo * width, lo * height, hi * width, hi * height]], device=device)

    def _finest_fpn_level(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The finest FPN map (P2) of ``x`` by the detector's ``backbone``, and nothing coarser.

        FPN's level mapper sends every box under 112 px across to P2 (a 224 px box reads P4), so
        for G's patches RoI pooling reads P2 alone, and the FPN's outputs at the coarser levels
        would never be read. So this is torchvision's FeaturePyramidNetwork.forward down to
        P2 without the 3x3 convs and extra block of P3 and up, on the ResNet's stages as
        ``_resnet_stages`` runs them: the same P2, at less cost.
        """
        fpn, c = backbone.fpn, _resnet_stages(backbone.body, x)
        inner = fpn.get_result_from_inner_blocks(c[-1], -1)
        for idx in range(len(c) - 2, -1, -1):
            lateral = fpn.get_result_from_inner_blocks(c[idx], idx)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
        return fpn.get_result_from_layer_blocks(inner, 0)

    def read(self, patches: torch.Tensor) -> torch.Tensor:
        """The detector's features (or the tuned copy's) of each patch's object box, RoI-pooled [B, C, 7, 7].

        With the detector's own backbone this is D's frozen part, with no weights of D's own: a
        training step reads G's patches once for D's step and G's (detached for D's), and the
        branches of a pass read the same real patches once (``train.sr_step``). With the
        detector's parameters frozen, gradients still flow through it to the patches, and so to G.
        """
        if patches.dim() != 4 or patches.shape[1] != 3:
            raise ValueError(f"DetectorTrunkDiscriminator: expected patches [B, 3, h, w], got {tuple(patches.shape)}")
        detector = self._detector[0]
        backbone = self.trunk if self.trunk is not None else detector.backbone
        if backbone.training:  # its BatchNorm would normalise by the patches' batch and move its running statistics
            raise RuntimeError("DetectorTrunkDiscriminator: the backbone D reads with (the detector's, or D's tuned "
                               "copy) must be in eval mode, as the staged schedule keeps it")
        n, _, h, w = patches.shape
        # the detector's own input normalisation, at the patch's size (no resize: the object stays
        # as large as G made it)
        normalized = detector.transform.normalize(patches)
        box = self.object_box(h, w, patches.device).to(patches.dtype)
        pool, fpn = detector.roi_heads.box_roi_pool, getattr(backbone, "fpn", None)
        if fpn is not None:
            finest = self._finest_fpn_level(backbone, normalized)
            scale = finest_level_scale(pool, box, finest, (h, w))
            if scale is not None:
                return roi_align_one_box(finest, box, pool.output_size[0], scale, pool.sampling_ratio)
        features = backbone(normalized)
        if isinstance(features, torch.Tensor):  # a single C4 map (non-FPN presets)
            features = {"0": features}
        return pool(features, [box] * n, [(h, w)] * n)

    def judge(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """D's trained part: its box head, predictor and adversarial head on ``read``'s features."""
        x = self.box_head(pooled)
        logits, deltas = self.box_predictor(x)
        return {"adv": self.adv_head(x).squeeze(-1), "cls": logits, "box": deltas}

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.judge(self.read(patches))

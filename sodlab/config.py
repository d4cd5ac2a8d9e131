"""The config of a training run: frozen dataclasses, every knob a visible field, saved as json.

``TrainConfig`` holds the data, the method, the detector (``DetectorConfig``, a preset), the SR
branch's model (``SRConfig``: what the module is and how inference uses it) and its training
(``SRTrainConfig``: RoI sampling, learning rates, loss weights), then the optimisation. Configs
are never mutated: derive a new one with ``dataclasses.replace``. The model builders map a config
to explicit constructor arguments (sodlab.models.build_model); no module reads a config object.
This module imports nothing heavy, so the command line's --help is instant.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


DEFAULT_CONTEXT = 0.1  # relative margin on each side of a RoI; sodlab/patches.py says why

# The numeric fields' valid ranges (lowest, highest; None: no bound; an Open bound is excluded). A
# config outside them is refused when it is made, before a run writes anything or fails halfway.
class Open(float):
    """A bound the value must not reach: Open(0) as the lowest means above 0."""


_AT_LEAST_ONE = (1, None)
_NOT_NEGATIVE = (0, None)
_POSITIVE = (Open(0), None)  # a learning rate of 0 trains nothing
_FRACTION = (0, 1)
RANGES = {
    "DetectorConfig": {
        "fpn_channels": _AT_LEAST_ONE, "min_size": _AT_LEAST_ONE, "max_size": _AT_LEAST_ONE,
        "rpn_batch_size_per_image": _AT_LEAST_ONE, "rpn_pre_nms_top_n_train": _AT_LEAST_ONE,
        "rpn_post_nms_top_n_train": _AT_LEAST_ONE, "rpn_pre_nms_top_n_test": _AT_LEAST_ONE,
        "rpn_post_nms_top_n_test": _AT_LEAST_ONE, "box_batch_size_per_image": _AT_LEAST_ONE,
        "box_representation_size": _AT_LEAST_ONE, "box_detections_per_img": _AT_LEAST_ONE,
        "box_score_thresh": _FRACTION, "trainable_layers": (0, 5)},
    "GANLossWeights": {name: _NOT_NEGATIVE for name in ("adv", "cls", "reg", "mse", "tv", "d_adv", "d_cls", "d_reg")},
    "SRConfig": {"lr_size": _AT_LEAST_ONE, "scale": (2, None), "context": _NOT_NEGATIVE,
                 "area_threshold": _NOT_NEGATIVE, "gate_top_k": _NOT_NEGATIVE, "gate_share_iou": (0, Open(1)),
                 "generator_channels": _AT_LEAST_ONE,
                 "generator_blocks": _NOT_NEGATIVE, "generator_upsample_channels": _NOT_NEGATIVE},
    "SRTrainConfig": {"rois_per_image": _AT_LEAST_ONE, "hr_rois_per_image": _NOT_NEGATIVE, "fg_fraction": _FRACTION,
                      "gt_jitter": _NOT_NEGATIVE, "jitters_per_gt": _NOT_NEGATIVE, "lr_generator": _POSITIVE,
                      "lr_discriminator": _POSITIVE, "pretrain_iters": _AT_LEAST_ONE, "pretrain_lr": _POSITIVE},
    "TrainConfig": {"iters": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE, "lr": _POSITIVE, "momentum": _FRACTION,
                    "weight_decay": _NOT_NEGATIVE, "warmup_iters": _NOT_NEGATIVE, "grad_clip": _POSITIVE,
                    "hflip_prob": _FRACTION, "seed": _NOT_NEGATIVE, "workers": _NOT_NEGATIVE,
                    "ckpt_every": _AT_LEAST_ONE, "eval_batch_size": _AT_LEAST_ONE, "tile": _NOT_NEGATIVE,
                    "tile_overlap": (0, Open(1)), "crop": _NOT_NEGATIVE, "restart_lr": _NOT_NEGATIVE},
}


def _check_ranges(config) -> None:
    """Refuse a numeric field outside RANGES, naming the class, the field and the range."""
    owner = type(config).__name__
    for name, (low, high) in RANGES[owner].items():
        value = getattr(config, name)
        excluded = {bound for bound in (low, high) if isinstance(bound, Open)}
        if value < low or (high is not None and value > high) or value in excluded:
            opening, closing = "(" if isinstance(low, Open) else "[", ")" if isinstance(high, Open) else "]"
            wanted = (f"{'above' if isinstance(low, Open) else 'at least'} {low:g}" if high is None else
                      f"in {opening}{low:g}, {high:g}{closing}")
            raise ValueError(f"{owner}.{name} must be {wanted}; got {value!r}")
    if owner == "DetectorConfig" and not (all(size > 0 for level in config.anchor_sizes for size in level)
                                          and all(ratio > 0 for ratio in config.aspect_ratios)):
        raise ValueError(f"DetectorConfig: anchor sizes and aspect ratios must be above 0; got "
                         f"{config.anchor_sizes}, {config.aspect_ratios}")


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "resnet18"  # resnet18 | resnet50 | resnet101
    fpn: bool = True  # False: a single C4 feature map (stride 16), as in the paper's non-FPN rows
    fpn_channels: int = 128
    # Anchor sizes per FPN level (strides 4..64), the same count on every level; without FPN all
    # sizes sit on the C4 map. Two octave scales per level (s, s*sqrt 2) reach 181 px, so a
    # 150-250 px object still has an anchor with IoU > 0.5.
    anchor_sizes: tuple[tuple[int, ...], ...] = ((8, 11), (16, 23), (32, 45), (64, 91), (128, 181))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # GeneralizedRCNNTransform resizes so the short side is min_size (long side at most max_size).
    min_size: int = 256
    max_size: int = 256
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 300
    box_batch_size_per_image: int = 128
    box_representation_size: int = 512
    # "2mlp": torchvision's TwoMLPHead. "4conv1fc": four 3x3 convs with GroupNorm and one fc, as in
    # fasterrcnn_resnet50_fpn_v2 and "Rethinking ImageNet Pre-training" (He et al. 2019), with
    # GroupNorm in the FPN too (fpn_norm). On the embedded benchmark it did not learn faster than
    # 2mlp in the first 200 SGD iterations and costs ~20% more per step, so it is an option only.
    box_head: str = "2mlp"
    fpn_norm: bool = False
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    pretrained: bool = False  # ImageNet weights for the backbone, from the torch cache only
    trainable_layers: int = 3  # used only with pretrained weights; from scratch all layers train

    def __post_init__(self):
        _check_ranges(self)


# The paper's four baselines at COCO scale (torchvision's defaults: 800/1333 px, 512 RoIs per
# image, 32-512 px anchors), and the CPU preset that learns the embedded benchmark in minutes.
_COCO_SCALE = dict(
    fpn_channels=256,
    anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
    min_size=800,
    max_size=1333,
    rpn_pre_nms_top_n_train=2000,
    rpn_post_nms_top_n_train=2000,
    rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_test=1000,
    box_batch_size_per_image=512,
    box_representation_size=1024,
    pretrained=True,
)
PRESETS: dict[str, DetectorConfig] = {
    "cpu": DetectorConfig(),
    "r50": DetectorConfig(backbone="resnet50", fpn=False, **_COCO_SCALE),
    "r50-fpn": DetectorConfig(backbone="resnet50", fpn=True, **_COCO_SCALE),
    "r101": DetectorConfig(backbone="resnet101", fpn=False, **_COCO_SCALE),
    "r101-fpn": DetectorConfig(backbone="resnet101", fpn=True, **_COCO_SCALE),
}


def preset(name: str, **overrides) -> DetectorConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown detector preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class GANLossWeights:
    """Weights of the loss terms, with where each default comes from."""

    # alpha, L_adv in G's objective: 1e-3 is SRGAN's adversarial weight (Ledig et al. CVPR'17),
    # which SOD-MTGAN (Bai et al. ECCV'18) builds on. The SOD-MTGAN text could not be opened here to
    # check its own value.
    adv: float = 1e-3
    # beta, L_cls in G's objective; gamma, L_reg in G's objective: 0.01 each, the values given for
    # SOD-MTGAN (NOT verified against its text, which was not reachable here).
    cls: float = 0.01
    reg: float = 0.01
    # L_MSE: weight 1, as in the paper's objective (and SRGAN's content loss). The SR recipe
    # (sodlab.recipes) weighs it 10, where its gradient on G is no longer drowned by the class term's.
    mse: float = 1.0
    # L_TV: the paper writes weight 1, but its L_TV is a per-pixel mean of |grad|, about 0.05-0.1 on
    # natural patches: with weight 1 it would outweigh L_MSE (~1e-3) and flatten every SR patch.
    # SRGAN (arXiv v1) used 2e-8 on the TV *sum* over the patch; the same gradient scale on our
    # per-pixel mean at hr_size 64 is 2e-8 * 64 * 64 = 8.2e-5. Set tv=1.0 for the paper's literal weight.
    tv: float = 2e-8 * 64 * 64
    # D's own terms: weight 1 each, Fast R-CNN's multi-task loss (lambda = 1) and the standard GAN D.
    d_adv: float = 1.0
    d_cls: float = 1.0
    d_reg: float = 1.0

    def __post_init__(self):
        _check_ranges(self)


DETECTOR_METHODS = ("baseline", "upscale", "hr-oracle")
SR_METHODS = ("sr", "sr-no-recon", "sr-no-adv", "sr-no-cls", "sr-cls-only")
METHODS = DETECTOR_METHODS + SR_METHODS

# Fields with a fixed set of values: validated here, listed by the CLI's --help.
CHOICES = {
    "method": METHODS,
    "optimizer": ("adamw", "sgd"),
    "schedule": ("cosine", "step"),
    "hr_source": ("image", "twin"),
    "sr_scope": ("small", "all"),
    "fusion": ("replace", "mean"),
    "patches": ("generator", "bilinear", "twin"),
    "large_rois": ("generator", "native"),
    "gate_rank": ("foreground", "objectness", "both"),
    "boxes_from": ("discriminator", "detector"),
    "sr_schedule": ("joint", "staged"),
    "backbone": ("resnet18", "resnet50", "resnet101"),
    "box_head": ("2mlp", "4conv1fc"),
    "mse_reduction": ("mean", "sum"),
    "discriminator_trunk": ("compact", "resnet50", "resnet101", "detector", "detector-tuned"),
    "discriminator_tune_from": ("conv1", "layer1", "layer2", "layer3", "layer4"),
}
# The D trunks built on the staged schedule's trained detector (DetectorTrunkDiscriminator).
DETECTOR_TRUNKS = ("detector", "detector-tuned")


def _check_choice(owner: str, name: str, value, choices_key: str | None = None) -> None:
    allowed = CHOICES[choices_key or name]
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class SRConfig:
    """The reconstruction module as a model: patch geometry, G and D, and where inference uses them."""

    # patches: z_LR is lr_size px across; G outputs lr_size * scale
    lr_size: int = 16
    scale: int = 4
    context: float = DEFAULT_CONTEXT  # relative margin around each RoI
    # which proposals go through G and D at inference
    area_threshold: float = 32.0**2  # input-image px^2 (COCO's "small")
    sr_scope: str = "small"  # small | all
    # RoIs in scope whose context box is wider or taller than lr_size (patches.fits_lr_patch):
    # generator: cut at lr_size like the others, so downsampled before G, and super-resolved;
    # native: cut from the image at D's patch size (lr_size * scale) and judged by D as they are,
    # G skipped: they are not low-resolution, and an LR cut would discard pixels that G then
    # guesses back. "generator" is what every run before this field did.
    large_rois: str = "generator"
    # Gated inference: only gate_top_k small proposals per image go through G and D (0: every small
    # proposal). G and D on every small proposal cost several times the detector itself.
    gate_top_k: int = 0
    # Which ones, by their rank among the image's proposals: foreground: the box head's foreground
    # probability; objectness: the RPN's objectness; both: the sum of the two ranks (a Borda count).
    # The box head alone sends many overlapping proposals of the objects it is already sure of;
    # the RPN's rank adds the objects the box head underrates (README: "The gate ranks by both").
    gate_rank: str = "foreground"
    # t > 0: the gate's k patches go to k distinct objects, and D's answers stand for the proposals
    # that overlap them. In rank order, a proposal that overlaps one already sent at IoU above t is
    # skipped (NMS), and every small proposal not sent that overlaps a sent one above t takes the
    # answers of the one it overlaps most: D's class logits, and D's box, decoded at that
    # proposal. Without it the ranks send the likeliest objects' near-duplicates, so k patches
    # reach fewer than k objects, and the duplicates past the gate keep the box head's answers
    # (README: "The gate shares D's answers"). 0: the plain top k.
    gate_share_iou: float = 0.0
    # replace: D's class scores and boxes stand in for the box head's (the paper's literal choice)
    # mean: D's and the head's class probabilities and box deltas are averaged
    fusion: str = "replace"
    # G and D at inference under autocast where the hardware runs it natively: bfloat16 on a CPU
    # with AVX-512 BF16 / AMX, float16 on CUDA; float32 elsewhere, so a CPU without bf16 runs
    # exactly what False runs. G is most of the SR branch's added latency, and bf16 cuts it with
    # the scores unchanged (README: "G and D in bfloat16 at inference"). The detector stays float32.
    amp: bool = True
    # What D judges at inference, to measure how much G's reconstruction matters to detection:
    # generator: G(z_LR) (bilinear for sr-no-recon, which has no G); bilinear: z_LR upsampled
    # bilinearly, G bypassed; twin: the same box cut from the image's exact xk twin, an oracle G
    # that bounds what any G could give (it needs the data's twins; `sodlab eval --sr-patches`).
    patches: str = "generator"
    # the variant switches (one field per ablation row)
    use_generator: bool = True  # False = sr-no-recon: D sees bilinear-upsampled patches, there is no G
    boxes_from: str = "discriminator"  # detector = sr-cls-only: SR serves classification only
    # model size (compact for the cpu preset; the paper's scale is a ResNet-50/101 trunk for D)
    generator_channels: int = 32
    generator_blocks: int = 4
    # G's upsampling tail: 0 is SRGAN's x2 stages; u > 0 one sub-pixel step to u channels
    # (sodlab/models/generator.py), for a cheaper G at inference
    generator_upsample_channels: int = 0
    # D's trunk: compact (four strided convs, from scratch), resnet50 / resnet101 (from scratch),
    # detector: the staged schedule's trained detector reads the patch, and D's heads start as its
    # box head (sodlab/models/discriminator.py, DetectorTrunkDiscriminator), or detector-tuned: the
    # same, but D reads with its own copy of the detector's backbone and FPN, which it fine-tunes
    # with its heads (the detector itself stays frozen)
    discriminator_trunk: str = "compact"

    def __post_init__(self):
        _check_ranges(self)
        for name in ("sr_scope", "large_rois", "gate_rank", "fusion", "boxes_from", "patches", "discriminator_trunk"):
            _check_choice("SRConfig", name, getattr(self, name))


@dataclass(frozen=True)
class SRTrainConfig:
    """How the SR branch trains: its HR targets, its RoI sample, its optimisers and loss weights."""

    # image: SOD-MTGAN's protocol (HR = the RoI at hr_size from the image, LR = HR reduced)
    # twin: HR patches cut from the data's exact xk twins ({split}_x{scale}/)
    hr_source: str = "image"
    # joint: detector, D and G step on every batch | staged: the detector of init_from, frozen
    schedule: str = "joint"
    rois_per_image: int = 16
    # RoIs large enough for a real HR target (jittered ground truth, any size): with
    # hr_source="image" small RoIs never have one, so without these L_MSE, L_TV and D's real term
    # would get no data. Their LR patch is their HR patch reduced: SOD-MTGAN's protocol.
    hr_rois_per_image: int = 4
    # Fast R-CNN's 25% foreground, closer to what D scores at inference (every small proposal,
    # nearly all background). The recipe of D built on the detector takes 0.5 (sodlab.recipes).
    fg_fraction: float = 0.25
    gt_jitter: float = 0.15  # relative shift/scale of the jittered ground-truth RoIs
    jitters_per_gt: int = 2
    lr_generator: float = 1e-4  # Adam, SRGAN's learning rate
    # D learns a classifier and a box regressor from scratch besides real/fake, so it gets a
    # higher rate than SRGAN's 1e-4 (README: the from-scratch recipe).
    lr_discriminator: float = 5e-4
    weights: GANLossWeights = field(default_factory=GANLossWeights)  # alpha, beta, gamma and the rest
    # D's trunk "detector-tuned" fine-tunes its copy of the detector's backbone from this ResNet
    # stage on (and the FPN); the earlier stages keep the detector's weights. From layer3, G's share
    # of the gain over bilinear patches holds; from conv1, the early layers learn to read bilinear
    # patches, and `sr` - `sr-no-recon` falls by a third (README: "D fine-tunes a copy of the
    # detector's backbone").
    discriminator_tune_from: str = "layer3"
    # G's starting point: "" its bicubic-residual initialisation; "pretrain" a PSNR-oriented G
    # pretrained on this data's small RoIs (sodlab.pretrain: L1, pretrain_iters iterations at
    # pretrain_lr, cached per dataset and config, so every seed and bench variant reuses it), as
    # SRGAN and ESRGAN start their adversarial stage; or the path of a pretrained G file.
    generator_init: str = ""
    pretrain_iters: int = 1000
    pretrain_lr: float = 2e-4  # Adam; ESRGAN's PSNR stage, which runs far longer than ours
    # L_MSE per patch: "mean" over its pixels (SRGAN's normalisation; the weights above assume it)
    # or "sum", the paper's literal squared norm
    mse_reduction: str = "mean"

    def __post_init__(self):
        _check_ranges(self)
        _check_choice("SRTrainConfig", "hr_source", self.hr_source)
        _check_choice("SRTrainConfig", "schedule", self.schedule, "sr_schedule")
        _check_choice("SRTrainConfig", "mse_reduction", self.mse_reduction)
        _check_choice("SRTrainConfig", "discriminator_tune_from", self.discriminator_tune_from)


def method_variant(method: str, sr: SRConfig, sr_train: SRTrainConfig) -> tuple[SRConfig, SRTrainConfig]:
    """The (SRConfig, SRTrainConfig) of an SR --method: each ablation changes exactly one switch.

    Idempotent: a variant sets absolute values, so applying it to its own output changes nothing.
    """
    w = sr_train.weights
    variants = {
        "sr": ({}, {}),
        "sr-no-recon": ({"use_generator": False}, {}),
        "sr-no-adv": ({}, {"weights": dataclasses.replace(w, adv=0.0, d_adv=0.0)}),
        "sr-no-cls": ({}, {"weights": dataclasses.replace(w, cls=0.0, d_cls=0.0)}),
        "sr-cls-only": ({"boxes_from": "detector"}, {"weights": dataclasses.replace(w, reg=0.0, d_reg=0.0)}),
    }
    if method not in variants:
        raise ValueError(f"{method!r} is not an SR method; choose one of {', '.join(variants)}")
    model_changes, train_changes = variants[method]
    return dataclasses.replace(sr, **model_changes), dataclasses.replace(sr_train, **train_changes)


@dataclass(frozen=True)
class TrainConfig:
    # data: a COCO-format directory (DIR/annotations/instances_{split}.json + DIR/{split}/)
    data: str = "data/synth"
    train_split: str = "train"
    val_split: str = "val"
    # method and model
    method: str = "baseline"
    preset: str = "cpu"
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    # the reconstruction module (SR methods only); the method's ablation switch is applied to both
    sr: SRConfig = field(default_factory=SRConfig)
    sr_train: SRTrainConfig = field(default_factory=SRTrainConfig)
    # a finished run whose detector weights start this one: frozen under the SR branch's staged
    # schedule; fine-tuned by a detector method, on a schedule of its own (a warm restart; to
    # continue the run's own schedule instead: continue_from below)
    init_from: str = ""
    # Detectors that finish another run's schedule at their own input (the bench's upscale and HR
    # oracle branch off the baseline's run, recipes.Budget.hires_branch_iters). A run with
    # keep_checkpoint_at N also keeps its checkpoint of iteration N (checkpoints/iter-N.pt); a new
    # run with continue_from DIR and continue_at N starts from that checkpoint (weights, optimizer
    # moments, RNG) and trains iterations N+1..iters on the same batches at the same learning rates.
    # Both have then had one budget, and the N shared iterations are trained once.
    keep_checkpoint_at: int = 0
    continue_from: str = ""
    continue_at: int = 0
    # Native-resolution tiles (SAHI's slicing-aided fine-tuning), for large images of small
    # objects: training samples one tile x tile crop per image and visit, evaluation slices each
    # image into overlapping tiles plus a full-image pass, merged by class-wise NMS
    # (sodlab/data/tiles.py). 0: whole images, resized by the preset. The detector's
    # min_size = max_size = tile, so a tile is never resized.
    tile: int = 0
    tile_overlap: float = 0.2
    # Random-crop training at the detector's own input scale: each visit takes one crop x crop
    # window of the image as the method sees it (x2 for upscale), boxes cut as tiles cut them, and
    # the detector's transform does not resize it in training (torchvision's _skip_resize, which its
    # reference scripts use for large-scale jitter); evaluation sees whole images, resized as ever.
    # For upscale and the HR oracle a crop of the baseline's image size keeps their step (xK
    # inputs, K^2 the pixels) at the baseline's cost, but each step then sees 1/K^2 of the objects:
    # at the default budget's 600 iterations they had not learned (README: "Crops of the x2
    # input"). 0: whole images.
    crop: int = 0
    # optimisation. From scratch (the cpu preset) AdamW at lr 1e-3, weight decay 0.05 learns the
    # embedded benchmark several times faster than SGD (README: the from-scratch recipe). With
    # ImageNet weights (the paper's presets on COCO) use torchvision's reference recipe instead:
    # --optimizer sgd --lr 0.02 --weight-decay 1e-4.
    optimizer: str = "adamw"  # adamw | sgd
    iters: int = 600
    batch_size: int = 4
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05
    warmup_iters: int = 50
    schedule: str = "cosine"  # cosine | step (x0.1 at 2/3 and 8/9 of the run, the 1x schedule's shape)
    # SGDR's warm restart (Loshchilov & Hutter) of the cosine schedule: at iteration restart_at the
    # learning rate jumps back to restart_lr x lr and decays by cosine to 0 at iters. The bench's
    # detectors restart where upscale and the HR oracle branch off the baseline's run, so that the
    # x2 detectors learn their new input at a useful rate, and the baseline has the same schedule
    # (recipes.Budget.hires_branch_lr_restart). 0 and 0: one cosine for the whole run.
    restart_at: int = 0
    restart_lr: float = 0.0
    grad_clip: float = 10.0  # max global grad norm; from-scratch detectors spike early without it
    hflip_prob: float = 0.5
    # Mixed precision for the detector step: float16 + GradScaler on CUDA; bfloat16 on a CPU with
    # native bf16 (AVX-512 BF16 / AMX); float32 on other CPUs, where bf16 would be emulated.
    amp: bool = True
    # bookkeeping
    seed: int = 0
    workers: int = 0  # data loading is a small part of a CPU step; 0 keeps runs bitwise reproducible
    ckpt_every: int = 200
    eval_batch_size: int = 4
    out: str = "runs/baseline"

    def __post_init__(self):
        _check_ranges(self)
        for name in ("method", "optimizer", "schedule"):
            _check_choice("TrainConfig", name, getattr(self, name))
        # Checked before anything is written: a NaN learning rate would train NaN weights.
        for name, value in (("lr", self.lr), ("sr_train.lr_generator", self.sr_train.lr_generator),
                            ("sr_train.lr_discriminator", self.sr_train.lr_discriminator)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number above 0, got {value}")
        for name in ("iters", "batch_size", "eval_batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_iters < 0 or self.tile < 0:
            raise ValueError(f"warmup_iters and tile must not be negative, got {self.warmup_iters} and {self.tile}")
        if self.is_sr:
            # Construction, not mutation: a frozen config normalises its own fields once.
            sr, sr_train = method_variant(self.method, self.sr, self.sr_train)
            object.__setattr__(self, "sr", sr)
            object.__setattr__(self, "sr_train", sr_train)
            if sr_train.schedule == "staged" and not self.init_from:
                raise ValueError("the staged schedule trains the SR branch on a finished detector: set init_from")
            if sr.discriminator_trunk in DETECTOR_TRUNKS and sr_train.schedule != "staged":
                raise ValueError(f"sr.discriminator_trunk {sr.discriminator_trunk!r} reads patches with the detector's "
                                 "trained backbone, which only the staged schedule keeps frozen and finished: set "
                                 "sr_train.schedule 'staged'")
        if bool(self.restart_at) != bool(self.restart_lr) or (self.restart_at and self.schedule != "cosine"):
            raise ValueError(f"restart_at {self.restart_at} with restart_lr {self.restart_lr}: a warm restart of the "
                             f"cosine schedule (not {self.schedule!r}) needs both, or neither")
        for name in ("keep_checkpoint_at", "continue_at", "restart_at"):
            if not 0 <= getattr(self, name) < self.iters:
                raise ValueError(f"{name} must be in 0..iters-1 ({self.iters - 1}), got {getattr(self, name)}")
        if bool(self.continue_from) != bool(self.continue_at) or (
                self.continue_from and (self.method not in DETECTOR_METHODS or self.init_from)):
            raise ValueError(f"continue_from {self.continue_from!r} at iteration {self.continue_at}: a new detector "
                             f"run (not {self.method}, and without init_from) continues another run from an "
                             "iteration above 0; give both or neither")
        if self.tile and self.crop:
            raise ValueError(f"tile {self.tile} and crop {self.crop}: tiles train and evaluate at native resolution, "
                             "crops train at the detector's input scale and evaluate whole images; choose one")
        if self.tile and (self.detector.min_size, self.detector.max_size) != (self.tile, self.tile):
            raise ValueError(f"tile {self.tile}: the detector must not resize its tiles; set its min_size and "
                             f"max_size to {self.tile} (the command line does so when --tile is given alone)")

    @property
    def is_sr(self) -> bool:
        return self.method in SR_METHODS

    @property
    def input_scale(self) -> float:
        """The "upscale" baseline trains and runs on input upsampled x2 (the paper's up-scale line)."""
        return 2.0 if self.method == "upscale" else 1.0

    @property
    def hr_twin_scale(self) -> int | None:
        """The xk of the twins an SR run reads, or None when its HR patches come from the image."""
        return self.sr.scale if self.is_sr and self.sr_train.hr_source == "twin" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from its json form (config.json); unknown keys (git, versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        if isinstance(values.get("detector"), dict):
            det = values["detector"]
            values["detector"] = DetectorConfig(**{
                **det, "anchor_sizes": tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,)
                                             for s in det["anchor_sizes"]),
                "aspect_ratios": tuple(det["aspect_ratios"])})
        sr = dict(values.get("sr") or {})
        sr_train = dict(values.get("sr_train") or {})
        # Runs written before the split kept the training fields inside "sr": move them over.
        train_fields = {f.name for f in dataclasses.fields(SRTrainConfig)}
        sr_train |= {k: sr.pop(k) for k in list(sr) if k in train_fields}
        if isinstance(sr_train.get("weights"), dict):
            sr_train["weights"] = GANLossWeights(**sr_train["weights"])
        values["sr"], values["sr_train"] = SRConfig(**sr), SRTrainConfig(**sr_train)
        return cls(**values)


def make_config(preset_name: str = "cpu", detector: dict | None = None, **overrides) -> TrainConfig:
    """A TrainConfig whose detector is the named preset, with ``detector`` overriding its fields
    (e.g. recipes.SMALL_DETECTOR); ``overrides`` go to TrainConfig fields."""
    return TrainConfig(preset=preset_name, detector=preset(preset_name, **(detector or {})), **overrides)

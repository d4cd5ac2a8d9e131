"""The one home of sodlab's recipes: budgets, the small-detector preset, the SR recipe, the data check.

A ``Budget`` is everything the demo, the notebooks and the bench hold equal across methods: the
embedded benchmark's size, the detector's and the SR branch's training lengths, the optimiser,
and (for the bench) how it measures. ``train_config`` turns (budget, method) into the
TrainConfig of a run, the same way for every caller:

* detector methods (baseline, upscale, hr-oracle) train ``iters`` iterations from scratch; with
  ``hires_branch_iters`` N, upscale and hr-oracle branch off the seed's baseline run at iteration
  ``iters`` - N and train its last N iterations at their xK input (TrainConfig.continue_from);
* SR methods train the reconstruction module for ``sr_iters`` iterations on a finished
  detector run (the staged schedule, the detector frozen), so every SR row of a seed shares
  the very same detector, and a difference between rows is the SR branch's doing. HR targets
  come from the data's exact xk twins, and D's answers are averaged with the box head's
  (fusion "mean": README, the 3-seed comparison).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from sodlab.config import DETECTOR_TRUNKS, SR_METHODS, GANLossWeights, SRConfig, SRTrainConfig, TrainConfig, make_config

# The cpu preset at 128 px with fewer RoIs: what the tests, the notebooks' quick budget and the
# bench's quick budget train (128 px images are seen at their own size, not upsampled to 256).
SMALL_DETECTOR = dict(min_size=128, max_size=128, rpn_post_nms_top_n_train=200, box_batch_size_per_image=64,
                      rpn_post_nms_top_n_test=100)

# The detector methods whose input is K times larger than the baseline's (x2 upsampled, xK twins).
HIRES_METHODS = ("upscale", "hr-oracle")

# The SR recipe on top of SRConfig's and SRTrainConfig's defaults (the paper's literal choices).
# D is built on the detector (SRConfig.discriminator_trunk "detector"): the seed's finished detector
# reads each SR patch and D fine-tunes a copy of its box head. The compact D, trained from scratch
# in the staged phase, could not see what reconstruction adds: with it held fixed, even the exact
# twins' patches gave only +0.2 APs over bilinear ones, and `sr` - `sr-no-recon` was +0.2 APs over
# three seeds; with this D, +0.8 (README: "D built on the detector, with G at x2").
# G super-resolves x2, not x4: the detector's backbone on the gate's patches is most of this D's
# cost at inference, and it falls with their pixels (32 px instead of 64: 1.4x the baseline's
# latency instead of 1.9x at k=24, with APs nearly equal to D reading G's x4 patches averaged to
# 32 px). G still beats bicubic by more than 1 dB in every size bin.
# L_MSE weighs 100, not the paper's 1: D's class and box terms reach G through the detector's
# backbone with a far larger gradient than the pixel term's, and at 10 the staged phase wore G's
# gain over bicubic at 16-32 px below 1 dB (README: "D built on the detector", with the gradients).
# The compact D keeps its own recipe (`--sr-discriminator-trunk compact`): G at x4, L_MSE x10,
# which is where its pixel term's gradient was about 0.6 of its class term's (README: "The pixel
# term's weight"). The ResNet Ds of the paper budget, trained from scratch as the compact D is,
# take the compact D's recipe.
# Gated inference: G and D on every small proposal cost several times the detector itself, so only
# the gate's k small proposals go through them. k is the largest gate at about 1.3x the baseline's
# latency on a CPU without bf16: 24 for the compact D (README: "The gate on a CPU without bf16"),
# 16 for this D, whose k=24 costs 1.39x and adds 0.5 APs more (README: "D built on the detector,
# with G at x2"). This D's gate sends the best by the sum of each proposal's rank by the box head's
# foreground probability and by the RPN's objectness (gate_rank "both"), not the box head's
# likeliest alone, which are mostly overlapping proposals of the objects it is already sure of: at
# the same k and no more cost, +0.7 APs over three seeds, significant, and G's share over
# bilinear patches grows from +0.97 to +1.21 (README: "The gate ranks by both"). The compact D
# keeps the box head's rank, with which it was measured.
# The gate's k patches go to k distinct objects, and the proposals that overlap a sent one at IoU
# above 0.5 take its answers (gate_share_iou): the ranks otherwise spend patches on near-duplicates
# of the likeliest objects, and the duplicates past the gate keep the box head's answers. At the
# same k and cost, `sr` gained APs at every seed and came closer to the ungated model (README:
# "The gate shares D's answers").
# The SR scope is proposals under 24^2 px (area_threshold 576), for training and inference, and a
# RoI whose context box is larger than the 16 px LR patch reaches D cut at D's own patch size, G
# skipped (large_rois "native"): no RoI is downsampled before G, which serves the truly
# low-resolution ones. 24^2 is the widest scope whose square RoIs fit D's 32 px patch with their
# context. Trained at it, `sr` gained 0.5 APs over the 16^2 scope, significant over three seeds,
# at the same gate and latency (README: "The SR scope, swept again on D built on the detector").
# G starts from a PSNR-oriented G pretrained on the data's small RoIs (sodlab.pretrain, cached per
# dataset), as SRGAN and ESRGAN start their adversarial stage: from its bicubic start G stayed
# bicubic through the staged branch, and only the pretrained G beats bicubic (README).
# G pretrains for 3,000 iterations, not 1,000: only then does it stay more than 1 dB above bicubic
# at 8-16 px through the staged phase, with APs unchanged (README: "How long G pretrains"); the
# longer pretraining is paid once per dataset, since the pretrained G is cached.
# With D built on the detector G pretrains at 8e-4, not ESRGAN's 2e-4: ESRGAN's rate suits its
# far longer PSNR stage, and in our 3,000 iterations 8e-4 lifts G over bicubic from +1.7 to +3.5
# dB under 8 px and from +1.2 to +2.5 at 16-32 px at the same cost, which D's read turns into APs
# that G adds over bilinear patches (README: "G's pretraining rate"). 3.2e-3 collapsed G to its
# bicubic start, so the rate keeps a factor of 4 from it.
# With D built on the detector, half of its small RoIs per image are foreground, not Fast R-CNN's
# quarter: D's class and box heads, copies of the detector's, learn the small objects from more of
# them at the same cost per step, and `sr` and G's share over `sr-no-recon` both grew at every
# seed (README: "Half of D's RoIs foreground").
# G upsamples in one sub-pixel step to 8 channels, not SRGAN's x2 stages: G is a large part of the
# SR branch's added latency (README: "A cheaper G"). The paper budget keeps SRGAN's stages and the
# paper's x4: it runs on a GPU, at the paper's G size.
# D fine-tuning its own copy of the detector's backbone (detector-tuned) takes the same recipe. It
# is not the recipe's D: from layer3 on it adds 0.8 APs, but the SR branch trains 2.4x to 3.5x
# longer, about 17 more minutes per bench seed (README: "D fine-tunes a copy of the detector's backbone").
DISCRIMINATOR_RECIPES: dict[str, tuple[dict, dict]] = {  # trunk: (SRConfig fields, SRTrainConfig fields)
    trunk: (dict(discriminator_trunk=trunk, scale=2, gate_top_k=16, gate_rank="both", gate_share_iou=0.5),
            dict(weights=GANLossWeights(mse=100.0), pretrain_lr=8e-4, fg_fraction=0.5))
    for trunk in DETECTOR_TRUNKS
} | {
    "compact": (dict(discriminator_trunk="compact", scale=4, gate_top_k=24), dict(weights=GANLossWeights(mse=10.0))),
}
# What every D shares; sr_settings and train_config add the named D's recipe.
SR_RECIPE = dict(fusion="mean", area_threshold=24.0 ** 2, large_rois="native", generator_upsample_channels=8,
                 discriminator_trunk="detector")
SR_TRAIN_RECIPE = dict(schedule="staged", hr_source="twin", generator_init="pretrain", pretrain_iters=3000)


@dataclass(frozen=True)
class Budget:
    """How much data, training and measurement a demo, notebook session or bench gets."""

    name: str
    # data: the embedded benchmark at `data` (relative to the project root), with xk twins
    data: str = "data/synth"
    synth_train: int = 1200
    synth_val: int = 200
    synth_size: int = 256
    synth_hr_scale: int = 4
    train_split: str = "train"
    val_split: str = "val"
    runs: str = "runs/demo"  # where the demo and the notebooks keep this budget's runs
    # training: the detector, then the SR branch on it (staged)
    presets: tuple[str, ...] = ("cpu",)
    iters: int = 600
    sr_iters: int = 300
    # The SR variants of a seed train in one pass over the same batches (train.train_branches), sharing
    # each batch's loading and the frozen detector's forward; each run is bitwise what it is alone.
    # False trains each in a pass of its own (to measure what the one pass saves).
    sr_one_pass: bool = True
    batch_size: int = 4
    optimizer: str = TrainConfig.optimizer
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    warmup_iters: int = TrainConfig.warmup_iters
    schedule: str = TrainConfig.schedule
    # bfloat16 autocast for the detector's step and for G and D at inference where the CPU has
    # native bf16 (TrainConfig.amp, SRConfig.amp); False runs float32 everywhere, which is what a
    # CPU without bf16 runs (`--no-amp`), so a machine with bf16 can measure the budget a machine
    # without it will see.
    amp: bool = TrainConfig.amp
    pretrained: bool | None = None  # None: the preset's own choice
    detector: dict = field(default_factory=dict)  # DetectorConfig overrides, for every preset
    sr: dict = field(default_factory=dict)  # SRConfig fields on top of SR_RECIPE
    sr_train: dict = field(default_factory=dict)  # SRTrainConfig fields on top of SR_TRAIN_RECIPE
    workers: int = 0
    eval_batch_size: int = 4
    # bench only: seeds, the HR oracle's twins (xK images cost K^2 per step), SAHI's slices and
    # the timing protocol
    seeds: int = 1
    oracle_scale: int = 2
    # upscale and the HR oracle see oracle_scale^2 times the pixels, so each of their steps costs
    # that many of the baseline's. With N > 0 they share the seed's baseline run up to iteration
    # iters - N (weights, optimizer, batches) and train only its last N iterations at their xK
    # input, on the same schedule: one budget for the three detectors, the shared part trained
    # once. 0 trains them from scratch for `iters`.
    hires_branch_iters: int = 0
    # f > 0: every detector's cosine schedule restarts at the branch point from f x lr
    # (TrainConfig.restart_at, restart_lr), the baseline's too, so that the three detectors still
    # share one schedule; 0: one cosine, which the branches continue.
    hires_branch_lr_restart: float = 0.0
    sahi_slice: int = 128
    sahi_overlap: float = 0.2
    max_eval_images: int | None = None  # evaluate on the first N val images only (dry runs)
    # The baseline AP (percent) on this budget's own data at which its detectors count as learned;
    # bench.md and the demo say when their baseline falls short (None: the budget claims nothing). Only
    # a report: a bench with another value here is still the same bench (open_bench_dir).
    learned_ap: float | None = None
    bootstrap_resamples: int = 1000  # paired bootstrap over val images for the intervals
    timing_images: int = 50
    timing_warmup: int = 5
    threads: int = 2  # torch.set_num_threads for every bench training and inference
    isolate: bool = True  # a fresh process per bench training / inference, so peak RSS is per method

    def data_dir(self, root: str | os.PathLike | None = None) -> Path:
        return Path(root or project_root()) / self.data

    def runs_dir(self, root: str | os.PathLike | None = None) -> Path:
        return Path(root or project_root()) / self.runs

    def describe(self) -> str:
        return (f"budget {self.name!r}: data {self.data} ({self.synth_train} train / {self.synth_val} val images of "
                f"{self.synth_size} px), {self.iters} detector + {self.sr_iters} SR iterations at batch "
                f"{self.batch_size}" + ("" if self.amp else ", float32 (no bf16 autocast)"))


# `sodlab bench`'s default: the embedded benchmark at 600 iterations, the shortest at which the
# baseline has learned (README: the convergence table); 200 iterations left every row an
# untrained snapshot.
# Learned, not converged: the detector is still on the steep part of its curve, so the SR rows
# measure the branch on an under-trained detector (README: "far from converged"). There, where a
# run ends moves with the CPU's kernels, by up to 10 AP for one seed (README: "All nine methods of
# the default bench in one invocation"), so bench.md says when its baseline is under learned_ap.
# From scratch, upscale and the HR oracle took 54 of the nine methods' 91 minutes; fine-tuned
# from the finished baseline they gained 4 APs from their extra iterations alone (README:
# "Fine-tuned x2 detectors"). So they share the baseline's run up to iteration 500 and train
# its last 100 iterations at their x2 input: the same 600 iterations and schedule as every
# detector (README: "The x2 detectors branch off the baseline's run"). Continuing the cosine's
# tail (8% of lr at 500), they missed the large objects that x2 makes larger than the 1x
# detector ever saw, unless they branched at 400, at more minutes per seed; so every detector's
# cosine restarts at 500 from half the peak (SGDR's warm restart), the baseline's too, which
# also gains by it (README: "A warm restart at the branch point", with the figures).
# AdamW at 7e-4 rather than 1e-3: the baseline ends higher at every seed (README: "A learning rate
# of 7e-4 at 600 iterations").
DEFAULT_BUDGET = Budget(name="default", runs="runs/default", learned_ap=20.0, lr=7e-4, hires_branch_iters=100,
                        hires_branch_lr_restart=0.5)


BUDGETS: dict[str, Budget] = {
    # What the tests and `make test`'s notebooks run: a minute or two on 2 busy CPU cores.
    "quick": Budget(name="quick", data="data/synth-quick", runs="runs/notebooks/quick", synth_train=40, synth_val=12, synth_size=128,
                    iters=25, sr_iters=25, warmup_iters=5, detector=SMALL_DETECTOR,
                    sr_train=dict(rois_per_image=8, pretrain_iters=20),
                    sahi_slice=64, timing_images=5, timing_warmup=1),
    # `sodlab demo`, and the notebooks' real-use budget (they reuse the demo's runs): the default
    # bench's settings, so the demo's two rows are the bench's seed-0 baseline and `sr`. At AdamW
    # 1e-3 without the warm restart, its earlier setting, the baseline had not learned on one CPU's
    # kernels (README: "The demo on the default bench's settings"). 300 detector iterations would
    # halve its time, but the detector has not learned by then (README).
    "demo": dataclasses.replace(DEFAULT_BUDGET, name="demo", runs="runs/demo"),
    "default": DEFAULT_BUDGET,
    # The paper's setting, for a GPU and COCO 2017: R50/R101 +- FPN at 800 px, the 1x schedule
    # (90k iterations at batch 16, lr 0.02, x0.1 at 60k and 80k), the SR branch at the paper's scale.
    "paper": Budget(name="paper", data="data/coco", train_split="train2017", val_split="val2017",
                    presets=("r50", "r50-fpn", "r101", "r101-fpn"), iters=90_000, sr_iters=30_000, batch_size=16,
                    optimizer="sgd", lr=0.02, weight_decay=1e-4, warmup_iters=1000, schedule="step", workers=8,
                    eval_batch_size=8,
                    sr=dict(generator_channels=64, generator_blocks=16, generator_upsample_channels=0,
                            discriminator_trunk="resnet50"),
                    sahi_slice=320),
}


def get_budget(name: str | None = None) -> Budget:
    """The named budget (default: $SODLAB_BUDGET, else "quick")."""
    name = name or os.environ.get("SODLAB_BUDGET", "quick")
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)} (SODLAB_BUDGET)")
    return BUDGETS[name]


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The sodlab checkout: the first folder at or above ``start`` (default: the working
    directory) holding both pyproject.toml and sodlab/; else the folder this package was
    imported from (an editable install); else ``start`` itself."""
    start = Path(start or os.getcwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "sodlab").is_dir():
            return folder
    package_parent = Path(__file__).resolve().parent.parent
    return package_parent if (package_parent / "pyproject.toml").is_file() else start


def detector_overrides(budget: Budget, twins_scale: int = 1, preset_name: str = "cpu") -> dict:
    """The budget's DetectorConfig overrides; the HR oracle's images are K x larger, so its
    detector resizes them as the upscale baseline does (min_size x K)."""
    from sodlab.models.detector import preset

    overrides = dict(budget.detector)
    if budget.pretrained is not None:
        overrides["pretrained"] = budget.pretrained
    if twins_scale != 1:
        base = preset(preset_name, **overrides)
        overrides |= dict(min_size=base.min_size * twins_scale, max_size=base.max_size * twins_scale)
    return overrides


def _discriminator_recipe(budget: Budget) -> tuple[dict, dict]:
    """The recipe of the D the budget's SR methods use (the budget may name another trunk)."""
    trunk = budget.sr.get("discriminator_trunk", SR_RECIPE["discriminator_trunk"])
    return DISCRIMINATOR_RECIPES.get(trunk, DISCRIMINATOR_RECIPES["compact"])


def sr_settings(budget: Budget) -> dict:
    """The SRConfig fields of the budget's SR methods: the recipe (with its D's), G's and D's
    precision, the budget's own."""
    return {**SR_RECIPE, **_discriminator_recipe(budget)[0], "amp": budget.amp, **budget.sr}


def train_config(budget: Budget, method: str, out: str | os.PathLike, data: str | os.PathLike | None = None,
                 seed: int = 0, preset_name: str = "cpu", detector_run: str | os.PathLike | None = None,
                 hr_source: str = "twin", **overrides) -> TrainConfig:
    """The TrainConfig of ``method`` at this budget (see the module docstring).

    ``data`` defaults to the budget's embedded benchmark; ``detector_run`` is the finished
    detector an SR method trains on (required for SR methods), and the baseline run upscale and
    hr-oracle branch off when the budget sets ``hires_branch_iters``; ``overrides`` go to TrainConfig.
    """
    data = str(data or budget.data_dir())
    values = dict(data=data, train_split=budget.train_split, val_split=budget.val_split, method=method,
                  iters=budget.iters, batch_size=budget.batch_size, optimizer=budget.optimizer, lr=budget.lr,
                  weight_decay=budget.weight_decay, warmup_iters=budget.warmup_iters, schedule=budget.schedule,
                  amp=budget.amp,
                  seed=seed, workers=budget.workers, eval_batch_size=budget.eval_batch_size, out=str(out))
    twins_scale = budget.oracle_scale if method == "hr-oracle" else 1
    if budget.hires_branch_iters and method in ("baseline", *HIRES_METHODS):
        point = budget.iters - budget.hires_branch_iters
        if method == "baseline":
            values["keep_checkpoint_at"] = point
        elif detector_run is None:
            raise ValueError(f"{method}: budget {budget.name!r} branches it off the seed's baseline run; pass "
                             "detector_run")
        else:
            values |= dict(continue_from=str(detector_run), continue_at=point)
        if budget.hires_branch_lr_restart:
            values |= dict(restart_at=point, restart_lr=budget.hires_branch_lr_restart)
    if method in SR_METHODS:
        if detector_run is None:
            raise ValueError(f"{method}: the SR recipe trains on a finished detector run; pass detector_run")
        values |= dict(iters=budget.sr_iters, init_from=str(detector_run), sr=SRConfig(**sr_settings(budget)),
                       sr_train=SRTrainConfig(**{**SR_TRAIN_RECIPE, **_discriminator_recipe(budget)[1],
                                                 "hr_source": hr_source, **budget.sr_train}))
    values |= overrides
    values["ckpt_every"] = values.get("ckpt_every", values["iters"])
    return make_config(preset_name, detector=detector_overrides(budget, twins_scale, preset_name), **values)


def with_iters(budget: Budget, iters: int | None = None, sr_iters: int | None = None,
               hires_branch_iters: int | None = None, **changes) -> Budget:
    """The budget with other training lengths (``sodlab bench --iters``, ``sodlab demo --iters``);
    ``hires_branch_iters`` 0 trains upscale and the HR oracle from scratch."""
    lengths = {k: v for k, v in (("iters", iters), ("sr_iters", sr_iters),
                                 ("hires_branch_iters", hires_branch_iters)) if v is not None}
    for key, value in lengths.items():
        least = 0 if key == "hires_branch_iters" else 1
        if value < least:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {least}, got {value}")
    budget = dataclasses.replace(budget, **lengths, **changes)
    if budget.hires_branch_iters >= budget.iters:
        raise ValueError(f"--hires-branch-iters {budget.hires_branch_iters} must be below the detectors' "
                         f"{budget.iters} iterations (upscale and the HR oracle branch off the baseline's run); "
                         "pass a smaller one, or 0 to train them from scratch")
    return budget


def learned_ap_on(budget: Budget, data_dir: str | os.PathLike) -> float | None:
    """The budget's learned_ap where its claim holds, on the budget's own data; None elsewhere."""
    return budget.learned_ap if Path(data_dir).resolve() == budget.data_dir().resolve() else None


def learned_note(claim: float | None, baseline_ap: float, budget_name: str) -> str | None:
    """One sentence when the baseline (AP in percent) ended under a budget's claim (``learned_ap_on``);
    the demo prints it and bench.md's verdict opens with it."""
    if claim is None or not 0 <= baseline_ap < claim:
        return None
    return (f"The baseline reached AP {baseline_ap:.1f}, under the {claim:g} at which the {budget_name} budget counts "
            "its detectors as learned: on this machine its iterations end earlier on the detector's learning curve, "
            "so every row is an earlier snapshot than the budget intends (README: \"All nine methods of the default "
            "bench in one invocation\"); --iters trains longer.")


def ensure_data(budget: Budget, data_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The budget's embedded benchmark, generated (with its xk twins) unless it is there already.

    The one data check of the demo, the notebooks and the bench. A complete dataset has both
    instances jsons (generation writes them last) and the twins; an existing one made with other
    parameters (image size, twin scale) is an error naming the way out, never silently reused.
    A folder without both jsons is an interrupted generation and is written again.
    """
    from sodlab.data.synth import generate, reduced_twin_scales
    from sodlab.io import read_json

    data_dir = Path(data_dir or budget.data_dir())
    splits = (budget.train_split, budget.val_split)
    annotations = [data_dir / "annotations" / f"instances_{split}.json" for split in splits]
    wanted = {"size": [budget.synth_size, budget.synth_size], "hr_scale": budget.synth_hr_scale}
    if all(path.is_file() for path in annotations):
        params = read_json(annotations[1]).get("info", {}).get("sodlab_synth", {})
        found = {k: params.get(k) for k in wanted}
        missing_twins = [s for s in splits if not (data_dir / f"{s}_x{budget.synth_hr_scale}").is_dir()]
        if found != wanted or missing_twins:
            raise ValueError(f"{data_dir}: holds a benchmark with {found}, but budget {budget.name!r} needs {wanted}; "
                             f"write it again with `sodlab synth --out {data_dir} --size {budget.synth_size} "
                             f"--hr-scale {budget.synth_hr_scale} --force`, or pass another data folder")
        if progress:
            print(f"using the embedded benchmark at {data_dir}")
        return data_dir
    if progress:
        print(f"synthesizing {budget.synth_train} train / {budget.synth_val} val images ({budget.synth_size} px, "
              f"x{budget.synth_hr_scale} twins) into {data_dir}", flush=True)
    # Only an interrupted generation is written over: a folder holding anything else is refused.
    scales = [budget.synth_hr_scale, *reduced_twin_scales(budget.synth_hr_scale)]
    ours = {*splits, *(f"{s}_x{k}" for s in splits for k in scales), "annotations"}
    interrupted = data_dir.is_dir() and all(p.name in ours for p in data_dir.iterdir())
    generate(data_dir, n_train=budget.synth_train, n_val=budget.synth_val, seed=0, size=budget.synth_size,
             hr_scale=budget.synth_hr_scale, progress=progress, overwrite=interrupted)
    return data_dir


# A dry run keeps every architectural choice and shrinks only sizes: 128 px inputs and few RoIs
# (the C4 presets' box head is a 50M-parameter fc layer, slow on a CPU at 512 RoIs x 2 images),
# 4 SR RoIs per image (D is a ResNet-50 at the paper's scale).
DRY_RUN_DETECTOR = dict(min_size=128, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
                        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                        box_detections_per_img=20)


def dry_run(budget: Budget) -> Budget:
    """The same configuration on a handful of images: 2 iterations, 4 eval images, 128 px, few RoIs."""
    return dataclasses.replace(
        budget, name=f"{budget.name}-dry-run", data=f"data/synth-{budget.name}-dry-run", iters=2, sr_iters=2,
        hires_branch_iters=min(budget.hires_branch_iters, 1), batch_size=2,
        warmup_iters=1, workers=0, eval_batch_size=2, detector={**budget.detector, **DRY_RUN_DETECTOR},
        sr_train={**budget.sr_train, "rois_per_image": 4, "pretrain_iters": 2}, synth_train=4, synth_val=4, synth_size=128,
        max_eval_images=4, timing_images=2, timing_warmup=1, isolate=False)

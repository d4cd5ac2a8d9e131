"""sodlab bench: every method at an equal training budget -> bench.json, bench.md and two plots.

Rows (``METHODS``): the baseline Faster R-CNN; ``upscale`` (trained and run on input upsampled
x2); ``sahi``, sliced inference (the ``sahi`` package) on the baseline's weights; the SR methods
``sr-cls-only`` and ``sr`` and the ablations ``sr-no-recon``, ``sr-no-adv``, ``sr-no-cls``; and
the HR oracle, the baseline trained and evaluated on the embedded benchmark's exact xk twins.

Equal budget: every trained method uses the same detector preset and sees the same training
images in the same order (iters x batch size, same seed). The SR methods use the *joint* schedule
(detector, D and G step on every batch), so they see exactly the baseline's images; the staged
schedule would train the SR branch for extra iterations on top of a finished baseline, i.e. more
images and more compute than the baseline had. Wall time is not equalised: it is measured.

Measurements per method (one function each): COCO AP/AP50/AP75/APs/APm/APl and AP per fine size
bin (``coco_eval``), training images/s, inference ms/image (median at batch 1 after warm-up, a
fixed torch thread count), peak RSS of training and of inference, parameter count; each also as
a ratio to the baseline of the same bench, and the fraction of the baseline-to-oracle APs gap
closed (``gap_closed``). Training and inference each run in a fresh process (multiprocessing
spawn), so a peak RSS belongs to one method.

Layout::

    runs/bench-NAME/bench.json, bench.md, ap_by_size.png, speed_accuracy.png
    runs/bench-NAME/runs/METHOD-seedS/        a normal run directory (``sodlab eval`` works on it)
    runs/bench-NAME/oracle-data-xK/           the oracle's COCO view of the twins (annotations x K)
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from sodlab.config import SR_METHODS, TrainConfig
from sodlab.data.coco import load_coco_json, load_split
from sodlab.data.synth import generate, render_twin
from sodlab.evaluate import (FINE_BIN_LABELS, PAPER_COLUMNS, STAT_NAMES, coco_eval, evaluate_model,
                             format_fine_bins_table, format_table, predictions_to_coco_results)
from sodlab.io import atomic_write_bytes, atomic_write_json, read_json
from sodlab.models.detector import DetectorConfig, preset
from sodlab.models.sr_detector import SRConfig
from sodlab.train import git_revision, load_trained_model, train


# --- budgets ------------------------------------------------------------------------------------

@dataclass
class Budget:
    """Everything a bench holds equal across methods, plus what and how it measures."""

    name: str
    # detector and optimisation: identical for every trained method
    presets: tuple[str, ...] = ("cpu",)
    iters: int = 200
    batch_size: int = 4
    # TrainConfig's from-scratch recipe unless a budget says otherwise (the paper budget: SGD)
    optimizer: str = TrainConfig.optimizer
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    warmup_iters: int = TrainConfig.warmup_iters
    schedule: str = "cosine"
    pretrained: bool | None = None  # None: the preset's own choice
    detector_overrides: dict = field(default_factory=dict)  # DetectorConfig fields, for every preset
    sr_overrides: dict = field(default_factory=dict)  # SRConfig fields; the schedule is always joint
    # Where the SR methods' HR patches come from. "image" (SRConfig's default) cuts them from the
    # training image, which holds a real HR patch only for RoIs >= hr_size (64) px across: never a
    # small RoI, so L_MSE, L_TV and D's real term would get no data. "twin" cuts them from the exact
    # xK twins (valid for RoIs >= 64/K px). auto: twin when DIR/{train_split}_x{scale}/ exists.
    sr_hr_source: str = "auto"
    workers: int = 0
    eval_batch_size: int = 4
    seeds: int = 1
    # data: --data DIR, or the embedded benchmark generated at data/synth-bench-NAME
    data: str = ""
    train_split: str = "train"
    val_split: str = "val"
    synth_train: int = 600
    synth_val: int = 100
    synth_size: int = 256
    max_eval_images: int | None = None  # evaluate on the first N val images only (dry runs)
    # methods
    oracle_scale: int = 2  # the HR oracle's twins: xK images cost K^2 per step
    sahi_slice: int = 128  # square slices (px of the input image), upsampled by the detector to min_size
    sahi_overlap: float = 0.2
    # measurement
    timing_images: int = 50  # timed batch-1 inferences (val images reused cyclically if fewer)
    timing_warmup: int = 5
    threads: int = 2  # torch.set_num_threads for every training and inference
    isolate: bool = True  # a fresh process per training / inference, so peak RSS is per method

    @property
    def images_seen(self) -> int:
        return self.iters * self.batch_size


# default, planned on this machine (2 cores) from measured step costs at batch 4, 256 px, cpu preset
# with bf16 autocast: baseline 0.48 s/step; SR joint ~2.4x (measured 1.7 s against 0.72 s on one
# thread: G and D on 16 RoIs/image in float32, plus reading the x4 twins); upscale and the x2
# oracle 4x (4x the pixels). The 8 trained methods cost ~20.6 baseline steps per iteration:
# 200 iters ~ 200 * 20.6 * 0.48 s = 33 min. Inference (100 val + 55 timed images each) at
# baseline 0.07 s/image: SR methods ~6x (G and D run on every small proposal), SAHI ~10x (9 slices
# + 1 full pass), upscale/oracle 4x: ~8.5 min. Process start-up ~1 min, synthesis with x4 twins
# ~45 s (700 images at 17 img/s): ~44 min in all. 200 iterations (800 images) is a third of the
# 600 the README's results use (baseline AP 22 over 3 seeds): at this budget every row is an
# early-training snapshot, and `--iters` raises it when the time is there.
# quick: 128 px images and batch 2 (~1/8 the cost per step), 30 iters: ~1 min of training, ~1 min
# of inference, ~1 min of process start-up: ~3 min.
_SMALL_DETECTOR = dict(min_size=128, max_size=128, rpn_post_nms_top_n_train=200,
                       box_batch_size_per_image=64, rpn_post_nms_top_n_test=100)
# On the embedded benchmark, averaging D's answers with the box head's beat the seed's literal
# replacement by 6 APs points over 3 seeds (README: 23.7 against 17.9); the paper budget keeps
# the seed's "replace".
_MEAN_FUSION = dict(fusion="mean")
BUDGETS: dict[str, Budget] = {
    "quick": Budget(name="quick", iters=30, batch_size=2, warmup_iters=5, detector_overrides=_SMALL_DETECTOR,
                    synth_train=60, synth_val=20, synth_size=128, sahi_slice=64, sr_overrides=_MEAN_FUSION),
    "default": Budget(name="default", sr_overrides=_MEAN_FUSION),
    # The paper's setting, for a GPU and COCO 2017: R50/R101 +- FPN at 800 px, the 1x schedule
    # (90k iterations at batch 16, lr 0.02, x0.1 at 60k and 80k), SR branch at the paper's scale.
    "paper": Budget(name="paper", presets=("r50", "r50-fpn", "r101", "r101-fpn"), iters=90_000, batch_size=16,
                    optimizer="sgd", lr=0.02, weight_decay=1e-4, warmup_iters=1000, schedule="step", workers=8,
                    eval_batch_size=8,
                    sr_overrides=dict(generator_channels=64, generator_blocks=16, discriminator_trunk="resnet50"),
                    data="data/coco", train_split="train2017", val_split="val2017", sahi_slice=320),
}


# A dry run keeps every architectural choice and shrinks only sizes: 128 px inputs and few RoIs
# (the C4 presets' box head is a 50M-parameter fc layer: at 512 RoIs x 2 images a CPU step takes
# ~10 s), 4 SR RoIs per image (D is a ResNet-50 at the paper's scale).
_DRY_RUN_DETECTOR = dict(min_size=128, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
                         rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                         box_detections_per_img=20)


def dry_run(budget: Budget) -> Budget:
    """The same configuration on a handful of images: 2 iterations, 4 eval images, 128 px, few RoIs."""
    return dataclasses.replace(
        budget, name=f"{budget.name}-dry-run", iters=2, batch_size=2, warmup_iters=1, workers=0, eval_batch_size=2,
        detector_overrides={**budget.detector_overrides, **_DRY_RUN_DETECTOR},
        sr_overrides={**budget.sr_overrides, "rois_per_image": 4},
        synth_train=4, synth_val=4, synth_size=128, max_eval_images=4, timing_images=2, timing_warmup=1,
        isolate=False)


# --- methods ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str  # the row, and the prefix of its run directory
    description: str
    train_as: str | None  # the TrainConfig.method trained; None: reuses the run of `reuse`
    reuse: str | None = None
    inference: str = "model"  # model: the trained model on each image | sahi: sliced inference
    twins: bool = False  # the HR oracle: trained and evaluated on xK twins, boxes mapped back to LR


METHODS: tuple[Method, ...] = (
    Method("baseline", "Faster R-CNN", "baseline"),
    Method("upscale", "Faster R-CNN trained and run on input upsampled x2", "upscale"),
    Method("sahi", "SAHI sliced inference with the baseline's weights", None, reuse="baseline", inference="sahi"),
    Method("sr-cls-only", "SR on small RoIs, D's class scores only (boxes from the box head)", "sr-cls-only"),
    Method("sr", "generative + discriminative reconstruction (the paper)", "sr"),
    Method("sr-no-recon", "sr without G: D sees bilinear-upsampled patches", "sr-no-recon"),
    Method("sr-no-adv", "sr without the adversarial loss", "sr-no-adv"),
    Method("sr-no-cls", "sr without the classification loss", "sr-no-cls"),
    Method("hr-oracle", "Faster R-CNN trained and evaluated on the exact HR twins (scale above)",
           "hr-oracle", twins=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)

# The seed's published COCO numbers (percent): context only, a different dataset and scale.
# "cf." names the nearest row of this bench, not the same method.
PUBLISHED_MAIN = (
    ("Faster R-CNN (cf. baseline)", "ResNet-50", (31.8, 52.1, 33.7, 15.5, 36.9, 43.3)),
    ("Faster R-CNN (cf. baseline)", "ResNet-50-FPN", (34.2, 55.0, 36.4, 20.0, 37.5, 43.9)),
    ("Faster R-CNN (cf. baseline)", "ResNet-101", (35.0, 55.1, 37.7, 17.3, 39.8, 48.4)),
    ("Faster R-CNN (cf. baseline)", "ResNet-101-FPN", (36.2, 57.3, 39.2, 21.3, 39.8, 46.6)),
    ("SOD-MTGAN (cf. sr-cls-only)", "ResNet-101", (41.4, 63.2, 45.4, 24.7, 44.2, 52.6)),
    ("Ours (cf. sr)", "ResNet-50", (34.8, 55.2, 37.6, 23.5, 44.2, 35.7)),
    ("Ours (cf. sr)", "ResNet-50-FPN", (37.3, 58.0, 40.6, 28.4, 44.2, 36.4)),
    ("Ours (cf. sr)", "ResNet-101", (37.9, 58.0, 40.7, 26.3, 47.5, 40.4)),
    ("Ours (cf. sr)", "ResNet-101-FPN", (39.2, 59.7, 43.0, 28.8, 46.8, 38.8)),
)
PUBLISHED_ABLATION = (
    ("w/o reconstruction module (cf. sr-no-recon)", "ResNet-50", (33.2, 53.8, 35.7, 12.0, 30.2, 34.9)),
    ("w/o reconstruction module (cf. sr-no-recon)", "ResNet-50-FPN", (35.7, 56.8, 38.4, 15.1, 30.0, 35.3)),
    ("w/o advloss (cf. sr-no-adv)", "ResNet-50", (32.5, 52.6, 34.6, 19.8, 40.1, 28.6)),
    ("w/o advloss (cf. sr-no-adv)", "ResNet-50-FPN", (35.2, 56.2, 37.9, 23.9, 39.1, 28.5)),
    ("w/o clsloss (cf. sr-no-cls)", "ResNet-50", (32.5, 52.8, 34.5, 1.9, 11.5, 29.9)),
    ("w/o clsloss (cf. sr-no-cls)", "ResNet-50-FPN", (35.1, 55.9, 38.0, 5.2, 14.6, 31.0)),
    ("Ours (cf. sr)", "ResNet-50", (32.5, 52.8, 34.5, 19.8, 39.8, 28.9)),
    ("Ours (cf. sr)", "ResNet-50-FPN", (35.1, 55.9, 38.0, 23.7, 38.7, 28.6)),
)

SAHI_POSTPROCESS = dict(postprocess_type="NMS", postprocess_match_metric="IOU", postprocess_match_threshold=0.5)


def gap_closed(aps_method: float | None, aps_baseline: float | None, aps_oracle: float | None) -> float | None:
    """(APs_method - APs_baseline) / (APs_oracle - APs_baseline): 0 at the baseline, 1 at the oracle.

    None without an oracle, when oracle and baseline tie (nothing to close), or when a value is
    missing or COCO's -1 (no small ground truth).
    """
    values = (aps_method, aps_baseline, aps_oracle)
    if any(v is None or v < 0 for v in values):
        return None
    denominator = aps_oracle - aps_baseline
    if denominator == 0:
        return None
    return (aps_method - aps_baseline) / denominator


# --- measurements (each runs where its caller puts it: this process or a fresh one) --------------

def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB: Linux's VmHWM (since start or the last
    ``reset_peak_rss``). ru_maxrss is the fallback elsewhere; on Linux it would be wrong for a
    spawned child, which inherits its parent's ru_maxrss across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if platform.system() == "Darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so an in-process measurement is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inference_ms_per_image(predict, images: list, count: int, warmup: int) -> dict:
    """Median wall time of ``predict(image)`` over ``count`` calls after ``warmup`` untimed ones
    (images reused cyclically). The image is already decoded (and resized, for upscale)."""
    for i in range(warmup):
        predict(images[i % len(images)])
    times = []
    for i in range(count):
        tic = time.perf_counter()
        predict(images[i % len(images)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # CUDA kernels run asynchronously: wait for them
        times.append(1000 * (time.perf_counter() - tic))
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90)), "images": count,
            "warmup": warmup}


def sahi_detection_model(model: torch.nn.Module, class_names: list[str], device: torch.device):
    """SAHI's torchvision wrapper around our detector (labels 1..C are its category ids).

    No ``image_size``: the detector's own transform resizes each slice to its min_size, which is
    SAHI's point (a 128 px slice of a 256 px image is seen at 256 px: small objects at x2).
    The confidence threshold is 0: the detector's own box_score_thresh already applies.
    """
    from sahi.models.torchvision import TorchVisionDetectionModel

    mapping = {str(label): name for label, name in enumerate(class_names) if label > 0}
    return TorchVisionDetectionModel(model=model, device=str(device), confidence_threshold=0.0,
                                     category_mapping=mapping, load_at_init=True)


def sahi_predict(detection_model, image: np.ndarray, slice_size: int, overlap: float) -> dict[str, torch.Tensor]:
    """Sliced prediction on one HWC uint8 image -> torchvision detection format, image pixels.

    Slices plus one full-image pass (SAHI's standard prediction, for the large objects), merged
    by class-wise NMS at IoU 0.5: NMS, not SAHI's default GREEDYNMM, because merging boxes
    enlarges them, which costs AP at strict IoU; SAHI itself switches to NMS/IOU at the low
    confidence thresholds AP needs.
    """
    from sahi.predict import get_sliced_prediction

    with torch.no_grad():  # SAHI's torchvision wrapper calls the model with autograd on
        result = get_sliced_prediction(image, detection_model, slice_height=slice_size, slice_width=slice_size,
                                       overlap_height_ratio=overlap, overlap_width_ratio=overlap,
                                       perform_standard_pred=True, postprocess_class_agnostic=False, verbose=0,
                                       force_postprocess_type=True, **SAHI_POSTPROCESS)
    predictions = result.object_prediction_list
    return {"boxes": torch.tensor([p.bbox.to_xyxy() for p in predictions], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([p.category.id for p in predictions], dtype=torch.int64),
            "scores": torch.tensor([p.score.value for p in predictions], dtype=torch.float32)}


def evaluate_sahi(detection_model, dataset, slice_size: int, overlap: float) -> tuple[list[dict], dict]:
    """Like ``evaluate_model``, with SAHI's sliced prediction on each original image."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    indices = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
    outputs = {}
    for index in indices:
        image_id = base.ids[index]
        outputs[image_id] = sahi_predict(detection_model, _hwc_uint8(base, image_id), slice_size, overlap)
    return predictions_to_coco_results(outputs, base.label_to_cat_id), outputs


def _hwc_uint8(dataset, image_id: int) -> np.ndarray:
    return dataset.load_image(image_id).permute(1, 2, 0).contiguous().numpy()


def scale_results(results: list[dict], factor: float) -> list[dict]:
    """COCO results with every box multiplied by ``factor`` (the oracle's twin frame -> LR frame)."""
    if factor == 1:
        return results
    return [dict(r, bbox=[round(v * factor, 2) for v in r["bbox"]]) for r in results]


@dataclass
class TrainJob:
    cfg: TrainConfig
    threads: int


def measure_training(job: TrainJob) -> dict:
    """Train one method (no evaluation): wall time, images/s and the peak RSS of training."""
    torch.set_num_threads(job.threads)
    reset_peak_rss()
    tic = time.perf_counter()
    run_dir = train(job.cfg, progress=False, evaluate=False)
    seconds = time.perf_counter() - tic
    done = sum(1 for line in open(run_dir / "metrics.jsonl") if line.strip())
    if done != job.cfg.iters:
        raise RuntimeError(f"{run_dir}: training stopped at iteration {done} of {job.cfg.iters}")
    images = job.cfg.iters * job.cfg.batch_size
    return {"iters": job.cfg.iters, "batch_size": job.cfg.batch_size, "images_seen": images,
            "seconds": seconds, "images_per_s": images / seconds, "peak_rss_mb": peak_rss_mb(),
            "torch_threads": torch.get_num_threads()}


@dataclass
class InferenceJob:
    run_dir: str  # where eval.json and detections_val.json are written
    model_run: str  # the trained run whose model is evaluated
    inference: str  # model | sahi
    data: str  # the images the model sees (the oracle's twin view for hr-oracle)
    val_split: str
    eval_ann_file: str  # the ground truth: always the LR val json, so size buckets are the LR objects'
    box_scale: float  # model frame -> evaluation frame (1/K for the oracle)
    threads: int
    timing_images: int
    timing_warmup: int
    eval_batch_size: int
    max_eval_images: int | None
    sahi_slice: int
    sahi_overlap: float


def measure_inference(job: InferenceJob) -> dict:
    """Speed (batch 1), peak RSS and parameters of one method, then its COCO evaluation."""
    torch.set_num_threads(job.threads)
    reset_peak_rss()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model = load_trained_model(job.model_run, device)
    val = load_split(job.data, job.val_split, train=False, scale=cfg.input_scale)
    eval_set = val if job.max_eval_images is None else Subset(val, range(min(job.max_eval_images, len(val))))
    some = range(min(len(val), job.timing_images))
    if job.inference == "sahi":
        sahi_model = sahi_detection_model(model, val.class_names, device)
        images = [_hwc_uint8(val, val.ids[i]) for i in some]
        speed = inference_ms_per_image(lambda im: sahi_predict(sahi_model, im, job.sahi_slice, job.sahi_overlap),
                                       images, job.timing_images, job.timing_warmup)
    else:
        images = [val[i][0].to(device) for i in some]
        with torch.no_grad():
            speed = inference_ms_per_image(lambda im: model([im]), images, job.timing_images, job.timing_warmup)
    rss = peak_rss_mb()  # before the batched evaluation below, so it is batch-1 inference's peak

    if job.inference == "sahi":
        results, outputs = evaluate_sahi(sahi_model, eval_set, job.sahi_slice, job.sahi_overlap)
    else:
        results, outputs = evaluate_model(model, eval_set, device, job.eval_batch_size, progress=False)
    results = scale_results(results, job.box_scale)
    stats = coco_eval(job.eval_ann_file, results, image_ids=outputs.keys())
    run_dir = Path(job.run_dir)
    atomic_write_json(run_dir / "detections_val.json", results, indent=None)
    atomic_write_json(run_dir / "eval.json", stats)
    return {"ms_per_image": speed["median"], "timing": speed, "peak_rss_mb": rss,
            "parameters": count_parameters(model), "torch_threads": torch.get_num_threads(), "eval": stats}


def run_measurement(fn, job, isolate: bool):
    """fn(job) in a fresh spawned process (isolate) or here; the thread count is restored here."""
    if isolate:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, job).result()
    threads = torch.get_num_threads()
    try:
        return fn(job)
    finally:
        torch.set_num_threads(threads)


# --- data -----------------------------------------------------------------------------------------

def twin_scale(budget: Budget) -> int:
    """The SR methods' super-resolution factor: the embedded benchmark is written with these twins."""
    return SRConfig(**budget.sr_overrides).scale


def ensure_embedded_data(data_dir: Path, budget: Budget, progress: bool = True) -> Path:
    """The embedded benchmark for ``budget`` at data_dir, generated (with the SR scale's twins) if absent."""
    ann = data_dir / "annotations" / f"instances_{budget.val_split}.json"
    wanted = {"size": [budget.synth_size, budget.synth_size], "hr_scale": twin_scale(budget)}
    if ann.exists():
        params = read_json(ann).get("info", {}).get("sodlab_synth", {})
        found = {k: params.get(k) for k in wanted}
        if found != wanted:
            raise ValueError(f"{data_dir}: holds an embedded benchmark with {found}, but budget {budget.name!r} "
                             f"needs {wanted}; remove it or pass --data")
        return data_dir
    if progress:
        print(f"bench: synthesizing {budget.synth_train} train / {budget.synth_val} val images "
              f"({budget.synth_size} px, x{wanted['hr_scale']} twins) into {data_dir}", flush=True)
    generate(data_dir, n_train=budget.synth_train, n_val=budget.synth_val, size=budget.synth_size,
             hr_scale=wanted["hr_scale"], progress=progress)
    return data_dir


def _twin_source(data_dir: Path, split: str, k: int) -> tuple[str, int] | None:
    """How to get the xk twins of a split: ("written", k), ("reduce", m) from written xm twins
    (m a multiple of k, area-averaged by m/k), ("render", k) from the scene file, or None."""
    if (data_dir / f"{split}_x{k}").is_dir():
        return "written", k
    for m in sorted(int(p.name.rsplit("_x", 1)[1]) for p in data_dir.glob(f"{split}_x*")
                    if p.is_dir() and p.name.rsplit("_x", 1)[1].isdigit()):
        if m > k and m % k == 0:
            return "reduce", m
    if (data_dir / "annotations" / f"scenes_{split}.json").is_file():
        return "render", k
    return None


def prepare_oracle_data(data_dir: str | Path, k: int, out_dir: Path,
                        splits: tuple[str, ...]) -> tuple[Path | None, str]:
    """The HR oracle's COCO dataset: the xk twins as images, every annotation scaled by k.

    Images: DIR/{split}_xk/ linked; or DIR/{split}_xm/ (m = 2k, 4k, ...) area-averaged down to xk,
    which keeps the LR image exactly the area average of the twin, as the generator makes it; or
    rendered from DIR/annotations/scenes_{split}.json. Returns (dataset dir, note), or (None, why
    not) when the data has no twins and no scene files.
    """
    from PIL import Image

    from sodlab.data.synth import area_downsample

    data_dir = Path(data_dir)
    sources = {split: _twin_source(data_dir, split, k) for split in splits}
    for split, source in sources.items():
        if source is None:
            return None, (f"HR oracle skipped: {data_dir} has no twins ({split}_x*/) and no scene file "
                          f"(annotations/scenes_{split}.json) for split {split!r}")
    for split, (how, m) in sources.items():
        coco = load_coco_json(data_dir / "annotations" / f"instances_{split}.json")
        for image in coco["images"]:
            image["width"], image["height"] = image["width"] * k, image["height"] * k
        for ann in coco["annotations"]:
            ann["bbox"] = [v * k for v in ann["bbox"]]
            if ann.get("area") is not None:
                ann["area"] = ann["area"] * k * k
        coco.setdefault("info", {})["hr_oracle"] = {"scale": k, "lr_data": str(data_dir), "twins": how}
        images_dir = out_dir / split
        images_dir.parent.mkdir(parents=True, exist_ok=True)
        if how == "written":
            images_dir.symlink_to((data_dir / f"{split}_x{k}").resolve(), target_is_directory=True)
        else:
            images_dir.mkdir()
            for image in coco["images"]:
                if how == "reduce":
                    with Image.open(data_dir / f"{split}_x{m}" / image["file_name"]) as twin:
                        pixels = area_downsample(np.asarray(twin.convert("RGB")), m // k)
                else:
                    pixels = render_twin(data_dir, split, image["id"], k)
                Image.fromarray(pixels).save(images_dir / image["file_name"])
        atomic_write_json(out_dir / "annotations" / f"instances_{split}.json", coco, indent=None)
    how = {"written": "the written twins", "reduce": "the x{m} twins area-averaged by {r}",
           "render": "rendered from the scene files"}
    used = "; ".join(f"{split}: " + how[h].format(m=m, r=m // k) for split, (h, m) in sources.items())
    return out_dir, f"HR oracle at x{k} ({used}); its boxes are scaled by 1/{k} and evaluated against the LR val json"


def resolve_hr_source(budget: Budget, data_dir: Path) -> tuple[str, str]:
    """The SR methods' HR patch source and a note saying why."""
    scale = twin_scale(budget)
    has_twins = (data_dir / f"{budget.train_split}_x{scale}").is_dir()
    if budget.sr_hr_source != "auto":
        return budget.sr_hr_source, f"SR methods: HR patches from the {budget.sr_hr_source} (set by the budget)"
    if has_twins:
        return "twin", f"SR methods: HR patches cut from the exact x{scale} twins ({budget.train_split}_x{scale}/)"
    return "image", (f"SR methods: no x{scale} twins in {data_dir}, so HR patches come from the image itself, which "
                     f"has a real HR patch only for RoIs >= {SRConfig().lr_size * scale} px: small RoIs get none")


# --- one bench ------------------------------------------------------------------------------------

def backbone_label(detector: DetectorConfig) -> str:
    return f"ResNet-{detector.backbone.removeprefix('resnet')}" + ("-FPN" if detector.fpn else "")


def detector_config(budget: Budget, preset_name: str, twins_scale: int = 1) -> DetectorConfig:
    overrides = dict(budget.detector_overrides)
    if budget.pretrained is not None:
        overrides["pretrained"] = budget.pretrained
    detector = preset(preset_name, **overrides)
    # The oracle's images are K times larger: resize them as the upscale baseline's (min_size x K).
    return dataclasses.replace(detector, min_size=detector.min_size * twins_scale,
                               max_size=detector.max_size * twins_scale)


def train_config(budget: Budget, preset_name: str, method: Method, seed: int, data: str, run_dir: Path,
                 hr_source: str = "image") -> TrainConfig:
    return TrainConfig(
        data=data, train_split=budget.train_split, val_split=budget.val_split, method=method.train_as,
        preset=preset_name, detector=detector_config(budget, preset_name, budget.oracle_scale if method.twins else 1),
        sr=SRConfig(**{**budget.sr_overrides, "schedule": "joint", "hr_source": hr_source}),
        iters=budget.iters, batch_size=budget.batch_size, optimizer=budget.optimizer, lr=budget.lr,
        weight_decay=budget.weight_decay, warmup_iters=budget.warmup_iters,
        schedule=budget.schedule, seed=seed, workers=budget.workers, ckpt_every=budget.iters,
        eval_batch_size=budget.eval_batch_size, out=str(run_dir))


def run_name(method: Method, preset_name: str, seed: int, budget: Budget) -> str:
    return f"{method.name}-{preset_name}-seed{seed}" if len(budget.presets) > 1 else f"{method.name}-seed{seed}"


def select_methods(names: list[str] | None) -> list[Method]:
    if not names:
        return list(METHODS)
    unknown = sorted(set(names) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"unknown bench method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    if "baseline" not in names:
        raise ValueError("the bench needs the baseline: every ratio and the gap closed are relative to it")
    return [m for m in METHODS if m.name in names]


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing bench directory (nothing in it is touched) unless force replaces it."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not force:
            raise FileExistsError(f"{out_dir} already holds a bench; choose another --name or pass --force "
                                  "to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def run_bench(budget: Budget, out_dir: str | Path, data: str | None = None, methods: list[str] | None = None,
              force: bool = False, synth_root: str | Path = "data", progress: bool = True) -> Path:
    """Train, measure and evaluate every method; write bench.json, bench.md and the plots.

    ``data`` is a COCO-format directory; by default the budget's own ``data``, else the embedded
    benchmark at synth_root/synth-bench-BUDGET (generated if absent).
    """
    out_dir = Path(out_dir)
    chosen = select_methods(methods)
    for preset_name in budget.presets:
        preset(preset_name)  # an unknown preset fails here, before anything is written
    prepare_out_dir(out_dir, force)
    started = time.perf_counter()
    if data is None and not budget.data:
        data_dir = ensure_embedded_data(Path(synth_root) / f"synth-bench-{budget.name}", budget, progress)
    else:
        data_dir = Path(data or budget.data)
    lr_val = load_split(data_dir, budget.val_split, train=False)  # fail early on a missing split
    hr_source, note = resolve_hr_source(budget, data_dir)
    notes = [note] if any(m.train_as in SR_METHODS for m in chosen) else []
    oracle_dir = None
    if any(m.twins for m in chosen):
        oracle_dir, note = prepare_oracle_data(data_dir, budget.oracle_scale,
                                               out_dir / f"oracle-data-x{budget.oracle_scale}",
                                               (budget.train_split, budget.val_split))
        notes.append(note)
        if oracle_dir is None:
            chosen = [m for m in chosen if not m.twins]
    header = bench_header(out_dir, budget, chosen, data_dir, lr_val, hr_source, oracle_dir, notes)

    records: list[dict] = []
    jobs = [(p, s, m) for p in budget.presets for s in range(budget.seeds) for m in chosen]
    for number, (preset_name, seed, method) in enumerate(jobs, start=1):
        if progress:
            print(f"bench [{number}/{len(jobs)}] {method.name} ({preset_name}, seed {seed})", flush=True)
        run_dir = out_dir / "runs" / run_name(method, preset_name, seed, budget)
        method_data = oracle_dir if method.twins else data_dir
        if method.train_as:
            cfg = train_config(budget, preset_name, method, seed, str(method_data), run_dir, hr_source)
            training = run_measurement(measure_training, TrainJob(cfg, budget.threads), budget.isolate)
            model_run = run_dir
        else:  # SAHI: the baseline's weights, and so its training
            reused = next(r for r in records
                          if (r["method"], r["preset"], r["seed"]) == (method.reuse, preset_name, seed))
            training, model_run = {**reused["training"], "reused_from": reused["run_dir"]}, Path(reused["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "sahi.json", {"model_run": str(model_run), **header["sahi"]})
        job = InferenceJob(
            run_dir=str(run_dir), model_run=str(model_run), inference=method.inference, data=str(method_data),
            val_split=budget.val_split, eval_ann_file=str(lr_val.ann_file),
            box_scale=1 / budget.oracle_scale if method.twins else 1.0, threads=budget.threads,
            timing_images=budget.timing_images, timing_warmup=budget.timing_warmup,
            eval_batch_size=budget.eval_batch_size, max_eval_images=budget.max_eval_images,
            sahi_slice=budget.sahi_slice, sahi_overlap=budget.sahi_overlap)
        inference = run_measurement(measure_inference, job, budget.isolate)
        records.append({"method": method.name, "preset": preset_name, "seed": seed, "run_dir": str(run_dir),
                        "backbone": backbone_label(detector_config(budget, preset_name)),
                        "training": training, "eval": inference.pop("eval"), "inference": inference})
        if progress:
            print("  " + record_summary(records[-1]), flush=True)
        atomic_write_json(out_dir / "bench.json", {**header, "complete": False, "records": records})

    rows = summarize(records, chosen, budget.presets)
    header["seconds"] = time.perf_counter() - started
    atomic_write_json(out_dir / "bench.json", {**header, "complete": True, "records": records, "rows": rows})
    atomic_write_bytes(out_dir / "bench.md", format_bench_markdown(header, rows).encode())
    atomic_write_bytes(out_dir / "ap_by_size.png", plot_ap_by_size(rows))
    atomic_write_bytes(out_dir / "speed_accuracy.png", plot_speed_accuracy(rows))
    return out_dir


def bench_header(out_dir: Path, budget: Budget, methods: list[Method], data_dir: Path, lr_val, hr_source: str,
                 oracle_dir: Path | None, notes: list[str]) -> dict:
    """What bench.json says about the whole bench, before its records."""
    evaluated = len(lr_val) if budget.max_eval_images is None else min(len(lr_val), budget.max_eval_images)
    return {
        "name": out_dir.name, "budget": dataclasses.asdict(budget), "methods": [m.name for m in methods],
        "data": str(data_dir), "val_images": len(lr_val), "evaluated_images": evaluated,
        "images_seen_per_method": budget.images_seen, "schedule": "joint", "sr_hr_source": hr_source,
        "sr_fusion": SRConfig(**budget.sr_overrides).fusion,
        "oracle": {"scale": budget.oracle_scale, "data": str(oracle_dir) if oracle_dir else None},
        "sahi": {"slice": budget.sahi_slice, "overlap": budget.sahi_overlap, "standard_pred": True,
                 **SAHI_POSTPROCESS, "package_version": _sahi_version()},
        "torch_threads": budget.threads, "isolated_processes": budget.isolate, "peak_rss": "VmHWM",
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "device": "cuda" if torch.cuda.is_available() else "cpu", "git": git_revision()},
        "notes": notes,
    }


def record_summary(record: dict) -> str:
    t, i, e = record["training"], record["inference"], record["eval"]
    return (f"AP {100 * e['AP']:.1f}  APs {100 * e['APs']:.1f}  train {t['seconds']:.0f} s "
            f"({t['images_per_s']:.1f} img/s)  infer {i['ms_per_image']:.0f} ms/img")


def _sahi_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sahi")
    except PackageNotFoundError:  # the sahi row then fails with the import error
        return None


# --- aggregation over seeds and relative to the baseline ---------------------------------------------

COST_KEYS = ("train_seconds", "train_images_per_s", "train_peak_rss_mb", "infer_ms_per_image",
             "infer_peak_rss_mb", "parameters")


def _cost(record: dict) -> dict:
    t, i = record["training"], record["inference"]
    return {"train_seconds": t["seconds"], "train_images_per_s": t["images_per_s"],
            "train_peak_rss_mb": t["peak_rss_mb"], "infer_ms_per_image": i["ms_per_image"],
            "infer_peak_rss_mb": i["peak_rss_mb"], "parameters": i["parameters"]}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds (None for one seed); COCO's -1 (no ground truth) stays -1."""
    if any(v < 0 for v in values):
        return -1.0, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _aggregate_eval(stats: list[dict]) -> tuple[dict, dict | None]:
    mean, std = {}, {}
    for name in STAT_NAMES:
        mean[name], std[name] = _mean_std([s[name] for s in stats])
    mean["fine_bins"], std["fine_bins"] = {}, {}
    for label in FINE_BIN_LABELS:
        bins = [s["fine_bins"][label] for s in stats]
        mean["fine_bins"][label] = {"num_gt": bins[0]["num_gt"]}
        std["fine_bins"][label] = {}
        for metric in ("AP", "AP50", "AR100"):
            mean["fine_bins"][label][metric], std["fine_bins"][label][metric] = _mean_std([b[metric] for b in bins])
    return mean, (std if len(stats) > 1 else None)


def summarize(records: list[dict], methods: list[Method], presets: tuple[str, ...]) -> list[dict]:
    """One row per (preset, method): eval mean (+ std), cost means, ratios to the baseline, gap closed."""
    rows = []
    for preset_name in presets:
        by_method = {m.name: [r for r in records if r["method"] == m.name and r["preset"] == preset_name]
                     for m in methods}
        preset_rows = {}
        for method in methods:
            group = by_method[method.name]
            if not group:
                continue
            eval_mean, eval_std = _aggregate_eval([r["eval"] for r in group])
            costs = [_cost(r) for r in group]
            cost = {k: statistics.fmean(c[k] for c in costs) for k in COST_KEYS}
            cost["parameters"] = round(cost["parameters"])
            training = group[0]["training"]
            preset_rows[method.name] = {
                "method": method.name, "description": method.description, "preset": preset_name,
                "backbone": group[0]["backbone"], "seeds": len(group), "eval": eval_mean, "eval_std": eval_std,
                "budget": {"iters": training["iters"], "batch_size": training["batch_size"],
                           "images_seen": training["images_seen"], "train_seconds": cost["train_seconds"],
                           "reused_from": "baseline" if method.reuse else None},
                "cost": cost,
            }
        base, oracle = preset_rows.get("baseline"), preset_rows.get("hr-oracle")
        for row in preset_rows.values():
            row["vs_baseline"] = {k: _ratio(row["cost"][k], base["cost"][k]) for k in COST_KEYS}
            row["gap_closed"] = gap_closed(row["eval"]["APs"], base["eval"]["APs"],
                                           oracle["eval"]["APs"] if oracle else None)
        rows.extend(preset_rows.values())
    return rows


def _ratio(value: float, base: float) -> float | None:
    return value / base if base else None


# --- report ---------------------------------------------------------------------------------------

def _published(rows) -> list[tuple[str, str, dict]]:
    return [(name, backbone, {c: v / 100 for c, v in zip(PAPER_COLUMNS, values)}) for name, backbone, values in rows]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def cost_table(rows: list[dict]) -> str:
    headers = ["Methods", "Backbone", "iters", "images seen", "train s", "train img/s", "x", "infer ms/img", "x",
               "train peak RSS MB", "x", "infer peak RSS MB", "x", "params M", "x", "gap closed (APs)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        c, r, b = row["cost"], row["vs_baseline"], row["budget"]
        reused = " (baseline's)" if b["reused_from"] else ""
        cells = [row["method"], row["backbone"], str(b["iters"]) + reused, str(b["images_seen"]),
                 _fmt(c["train_seconds"], 0), _fmt(c["train_images_per_s"], 2), _fmt(r["train_images_per_s"], 2),
                 _fmt(c["infer_ms_per_image"]), _fmt(r["infer_ms_per_image"], 2),
                 _fmt(c["train_peak_rss_mb"], 0), _fmt(r["train_peak_rss_mb"], 2),
                 _fmt(c["infer_peak_rss_mb"], 0), _fmt(r["infer_peak_rss_mb"], 2),
                 _fmt(c["parameters"] / 1e6, 2), _fmt(r["parameters"], 2), _fmt(row["gap_closed"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_bench_markdown(header: dict, rows: list[dict]) -> str:
    budget = header["budget"]
    seeds = budget["seeds"]
    table_rows = [(row["method"], row["backbone"], row["eval"]) for row in rows]
    sahi = header["sahi"]
    parts = [
        f"# sodlab bench: {header['name']}",
        "",
        f"- budget `{budget['name']}`: {budget['iters']} iterations x batch {budget['batch_size']} = "
        f"**{header['images_seen_per_method']} training images seen by every trained method** (same images, same "
        f"order, same detector preset); SR methods train on the joint schedule (detector, D and G step on every "
        f"batch); {budget['optimizer']} lr {budget['lr']}, {budget['schedule']} schedule, "
        f"{budget['warmup_iters']} warm-up iterations",
        f"- SR methods: HR patches from the {header['sr_hr_source']}; D's class scores and boxes on small "
        f"proposals {'are averaged with' if header.get('sr_fusion') == 'mean' else 'replace'} the box head's "
        f"(fusion `{header.get('sr_fusion', 'replace')}`)",
        f"- data: `{header['data']}` ({header['evaluated_images']} of {header['val_images']} val images evaluated); "
        f"seeds: {seeds}" + (" (mean; std in the second table)" if seeds > 1 else ""),
        f"- SAHI {sahi['package_version']}: {sahi['slice']}x{sahi['slice']} px slices, overlap {sahi['overlap']}, "
        f"each resized by the detector to its min_size, plus one full-image pass; merged by class-wise "
        f"{sahi['postprocess_type']} at {sahi['postprocess_match_metric']} {sahi['postprocess_match_threshold']}",
        f"- inference: batch 1, median over {budget['timing_images']} images after {budget['timing_warmup']} "
        f"warm-up; torch threads {header['torch_threads']}; peak RSS is VmHWM of "
        + ("a fresh process per training / inference" if header["isolated_processes"]
           else "this process, reset before each measurement"),
        f"- {header['environment']['device']}, {header['environment']['cpus']} CPUs, torch "
        f"{header['environment']['torch']}, git {header['environment']['git']}; bench took "
        f"{header.get('seconds', 0) / 60:.1f} min",
        *[f"- {note}" for note in header["notes"]],
        "",
        "## Accuracy (COCO AP, percent): this bench",
        "",
        format_table(table_rows),
    ]
    if seeds > 1:
        parts += ["", f"Standard deviation over {seeds} seeds:", "",
                  format_table([(row["method"], row["backbone"], row["eval_std"]) for row in rows])]
    parts += [
        "",
        "## Published on COCO (Gu et al.), not comparable",
        "",
        "COCO at 800 px with ImageNet-pretrained ResNets, from the paper; a different dataset, scale and "
        "budget from this bench. `cf.` names the nearest row above, not the same method.",
        "",
        format_table(_published(PUBLISHED_MAIN)),
        "",
        "Ablation (published on COCO (Gu et al.), not comparable):",
        "",
        format_table(_published(PUBLISHED_ABLATION)),
        "",
        "## AP by object size (fine bins of sqrt(area), percent)",
        "",
        format_fine_bins_table(table_rows),
        "",
        "## Cost, as ratios (x) to the baseline of this bench",
        "",
        "gap closed = (APs - APs baseline) / (APs oracle - APs baseline). SAHI reuses the baseline's training.",
        "",
        cost_table(rows),
        "",
        "## Methods",
        "",
        *[f"- `{row['method']}`: {row['description']}" for row in rows if row["preset"] == rows[0]["preset"]],
        "",
    ]
    return "\n".join(parts)


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percent_or_nan(value: float | None) -> float:
    return math.nan if value is None or value < 0 else 100 * value


def plot_ap_by_size(rows: list[dict]) -> bytes:
    """AP per fine size bin, one line per method, one panel per preset."""
    plt = _pyplot()
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5), squeeze=False)
    x = np.arange(len(FINE_BIN_LABELS))
    for ax, preset_name in zip(axes[0], presets):
        for row in (r for r in rows if r["preset"] == preset_name):
            bins = row["eval"]["fine_bins"]
            y = [_percent_or_nan(bins[b]["AP"]) for b in FINE_BIN_LABELS]
            err = None
            if row["eval_std"]:
                err = [100 * (row["eval_std"]["fine_bins"][b]["AP"] or 0) for b in FINE_BIN_LABELS]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=row["method"])
        counts = rows[0]["eval"]["fine_bins"]
        ax.set_xticks(x, [f"{b}\n(n={counts[b]['num_gt']})" for b in FINE_BIN_LABELS])
        ax.set_xlabel("object side sqrt(area), px")
        ax.set_ylabel("AP 0.5:0.95 (%)")
        ax.set_title(f"AP by object size ({preset_name})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _figure_png(fig)


def plot_speed_accuracy(rows: list[dict]) -> bytes:
    """APs against inference ms/image (log scale), one point per method and preset."""
    plt = _pyplot()
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = dict(zip(dict.fromkeys(row["preset"] for row in rows), "osD^v<>"))
    for row in rows:
        aps = _percent_or_nan(row["eval"]["APs"])
        err = 100 * row["eval_std"]["APs"] if row["eval_std"] and row["eval_std"]["APs"] is not None else None
        ax.errorbar(row["cost"]["infer_ms_per_image"], aps, yerr=err, marker=markers[row["preset"]], capsize=3)
        ax.annotate(row["method"] if len(markers) == 1 else f"{row['method']} ({row['preset']})",
                    (row["cost"]["infer_ms_per_image"], aps), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("inference ms/image (batch 1, log scale)")
    ax.set_ylabel("APs (%)")
    ax.set_title("Speed / accuracy on small objects")
    ax.grid(alpha=0.3, which="both")
    return _figure_png(fig)


# --- command line (wired into sodlab/cli.py as `sodlab bench`) ---------------------------------------

def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default",
                        help="quick (~3 min, CI/notebooks), default (~41 min on 2 CPU cores), paper (GPU + COCO 2017)")
    parser.add_argument("--paper", action="store_true", help="the paper's configuration (same as --budget paper)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the budget's configuration on a handful of images: 2 iterations, 4 eval images, 128 px")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (mean +- std); budget's default 1")
    parser.add_argument("--iters", type=int, default=None,
                        help="training iterations of every trained method (default: the budget's)")
    parser.add_argument("--data", default=None,
                        help="COCO-format directory (default: the embedded benchmark, generated if absent)")
    parser.add_argument("--train-split", default=None, help="default: the budget's (train / train2017)")
    parser.add_argument("--val-split", default=None, help="default: the budget's (val / val2017)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHOD_NAMES)}")
    parser.add_argument("--presets", default=None, help="comma-separated detector presets (default: the budget's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every measurement (default 2)")
    parser.add_argument("--pretrained", default=None, action=argparse.BooleanOptionalAction,
                        help="ImageNet backbone weights (default: the preset's; --no-pretrained where none exist)")
    parser.add_argument("--name", default=None, help="output runs/bench-NAME (default: the budget's name)")
    parser.add_argument("--runs", default="runs", help="parent directory of bench-NAME")
    parser.add_argument("--force", action="store_true", help="replace an existing runs/bench-NAME")


def budget_from_args(args) -> Budget:
    budget = BUDGETS["paper" if args.paper else args.budget]
    if args.dry_run:
        budget = dry_run(budget)
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip()) if args.presets else None
    changes = {k: v for k, v in {"seeds": args.seeds, "iters": args.iters, "threads": args.threads,
                                 "pretrained": args.pretrained, "train_split": args.train_split,
                                 "val_split": args.val_split, "presets": presets}.items()
               if v is not None}
    if changes.get("seeds", 1) < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if changes.get("iters", 1) < 1:
        raise ValueError(f"--iters must be at least 1, got {args.iters}")
    return dataclasses.replace(budget, **changes)


def run_from_args(args) -> Path:
    budget = budget_from_args(args)
    out_dir = Path(args.runs) / f"bench-{args.name or budget.name}"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out_dir = run_bench(budget, out_dir, data=args.data, methods=methods, force=args.force)
    rows = json.loads((out_dir / "bench.json").read_text())["rows"]
    print()
    print(format_table([(row["method"], row["backbone"], row["eval"]) for row in rows]))
    print(f"\nbench written to {out_dir}/ (bench.md, bench.json, ap_by_size.png, speed_accuracy.png)")
    return out_dir

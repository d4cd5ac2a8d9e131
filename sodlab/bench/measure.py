"""The bench's measurements: training time and memory, inference latency and memory, COCO AP.

Each measurement runs where its caller puts it: in this process, or in a fresh spawned one
(``run_measurement``), so that a peak RSS belongs to one method.
"""
from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from sodlab.config import TrainConfig
from sodlab.data.coco import load_split
from sodlab.evaluate import coco_eval, evaluate_model, predictions_to_coco_results
from sodlab.io import atomic_write_json, read_metrics_log
from sodlab.models.sahi_adapter import sahi_detection_model, sahi_predict
from sodlab.train import load_trained_model, train


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
    run_dir = train(job.cfg, progress=False, force=True)  # the bench checked its config
    seconds = time.perf_counter() - tic
    done = len(read_metrics_log(run_dir / "metrics.jsonl"))
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

    tic = time.perf_counter()
    if job.inference == "sahi":
        results, outputs = evaluate_sahi(sahi_model, eval_set, job.sahi_slice, job.sahi_overlap)
    else:
        results, outputs = evaluate_model(model, eval_set, device, job.eval_batch_size, progress=False)
    throughput = len(outputs) / (time.perf_counter() - tic)  # images/s over the batched evaluation
    results = scale_results(results, job.box_scale)
    stats = coco_eval(job.eval_ann_file, results, image_ids=outputs.keys())
    run_dir = Path(job.run_dir)
    atomic_write_json(run_dir / "detections_val.json", results, indent=None)
    atomic_write_json(run_dir / "eval.json", stats)
    slices = None
    if job.inference == "sahi":  # SAHI's cost: slices per image (plus the full-image pass) x time per slice
        from sodlab.data.tiles import tile_windows

        height, width = val.original_size(val.ids[0])
        slices = len(tile_windows(height, width, job.sahi_slice, job.sahi_overlap)) + 1
    return {"ms_per_image": speed["median"], "timing": speed, "peak_rss_mb": rss, "images_per_s": throughput,
            "slices_per_image": slices,
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

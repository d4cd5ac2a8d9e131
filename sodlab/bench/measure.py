"""The bench's measurements: training time and memory, inference latency and memory, COCO AP.

Each measurement runs where its caller puts it: in this process, or in a fresh spawned one
(``run_measurement``), so that a peak RSS belongs to one method.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from sodlab.config import TrainConfig
from sodlab.data.coco import load_split
from sodlab.data.coco import twin_source
from sodlab.evaluate import coco_eval, evaluate_model, evaluate_models, predictions_to_coco_results
from sodlab.io import atomic_write_json, read_json, read_metrics_log
from sodlab.models.sahi_adapter import sahi_detection_model, sahi_predict
from sodlab.runs import OTHER_PATCH_SOURCES, evaluation_dir, load_eval_split, write_sr_qualities
from sodlab.train import load_trained_model, train_branches


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


def batch1_speed_and_peak(predict, images: list, count: int, warmup: int) -> tuple[dict, float]:
    """``inference_ms_per_image`` and the peak RSS (MiB) while it ran: the peak restarts from the
    current RSS first, so it is inference's at batch 1 (the loaded model, the decoded images and one
    image's activations), not loading's transients (a checkpoint holds the optimizer's moments
    beside the weights and is read whole, so loading peaked at the same RSS for every detector)."""
    reset_peak_rss()
    speed = inference_ms_per_image(predict, images, count, warmup)
    return speed, peak_rss_mb()


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
    cfgs: list[TrainConfig]  # one run, or SR variants that train in one pass (train.train_branches)
    threads: int


def measure_training(job: TrainJob) -> list[dict]:
    """Train one run, or several in one pass (no evaluation): per run, wall time, images/s and the
    peak RSS of training. A pass's wall time is split between its runs: each gets its logged steps
    (its own step plus its share of each batch's transfer, frozen detector forward and D's read of
    the real patches) and an equal share of the rest (building, G's pretraining, checkpoints); its
    record names the pass. A run branching off another (upscale and the HR oracle,
    TrainConfig.continue_from) trains only the iterations after its branch point, and its record
    says so."""
    torch.set_num_threads(job.threads)
    reset_peak_rss()
    tic = time.perf_counter()
    run_dirs = train_branches(job.cfgs, progress=False, force=True)  # the bench checked their configs
    seconds = time.perf_counter() - tic
    logs = [read_metrics_log(run_dir / "metrics.jsonl") for run_dir in run_dirs]
    own_iters = [cfg.iters - cfg.continue_at for cfg in job.cfgs]
    for run_dir, log, iters in zip(run_dirs, logs, own_iters):
        if len(log) != iters:
            raise RuntimeError(f"{run_dir}: training stopped after {len(log)} of its {iters} iterations")
    steps = [sum(record["sec"] for record in log) for log in logs]
    rest, peak = (seconds - sum(steps)) / len(steps), peak_rss_mb()
    records = []
    for cfg, step_seconds, iters in zip(job.cfgs, steps, own_iters):
        own = step_seconds + rest
        records.append({"iters": cfg.iters, "batch_size": cfg.batch_size, "images_seen": cfg.iters * cfg.batch_size,
                        "seconds": own, "images_per_s": iters * cfg.batch_size / own, "peak_rss_mb": peak,
                        "torch_threads": torch.get_num_threads()})
        if cfg.continue_from:  # its first continue_at iterations are the run it branches off
            records[-1]["branched_from"] = {"run": cfg.continue_from, "iteration": cfg.continue_at,
                                            "own_iters": iters}
        if len(job.cfgs) > 1:
            records[-1]["one_pass"] = {"runs": [str(run_dir) for run_dir in run_dirs], "seconds": seconds}
    return records


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
    evaluate: bool = True  # False: batch-1 speed and peak RSS only (SR runs: ``measure_sr_evaluation``)


def batch1_predictor(model_run: str, inference: str, data: str, val_split: str, count: int, sahi_slice: int,
                     sahi_overlap: float, device: torch.device):
    """A method's batch-1 prediction, with the first ``count`` val images decoded (and resized, for
    upscale) for it: (predict, images, model, val set, SAHI model or None)."""
    cfg, model = load_trained_model(model_run, device)
    val = load_split(data, val_split, train=False, scale=cfg.input_scale)
    some = range(min(len(val), count))
    if inference == "sahi":
        sahi_model = sahi_detection_model(model, val.class_names, device)
        images = [_hwc_uint8(val, val.ids[i]) for i in some]
        return (lambda im: sahi_predict(sahi_model, im, sahi_slice, sahi_overlap)), images, model, val, sahi_model
    images = [val[i][0].to(device) for i in some]

    def predict(image):
        with torch.no_grad():
            return model([image])

    return predict, images, model, val, None


def measure_inference(job: InferenceJob) -> dict:
    """Speed (batch 1), peak RSS and parameters of one method, then (``job.evaluate``) its COCO
    evaluation."""
    torch.set_num_threads(job.threads)
    reset_peak_rss()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predict, images, model, val, sahi_model = batch1_predictor(
        job.model_run, job.inference, job.data, job.val_split, job.timing_images, job.sahi_slice, job.sahi_overlap,
        device)
    speed, rss = batch1_speed_and_peak(predict, images, job.timing_images, job.timing_warmup)  # before evaluating
    measured = {"ms_per_image": speed["median"], "timing": speed, "peak_rss_mb": rss,
                "parameters": count_parameters(model), "torch_threads": torch.get_num_threads()}
    if not job.evaluate:
        return measured

    eval_set = val if job.max_eval_images is None else Subset(val, range(min(job.max_eval_images, len(val))))
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
    return {**measured, "images_per_s": throughput, "slices_per_image": slices, "sr_quality": None, "eval": stats}


@dataclass
class SREvaluationJob:
    run_dirs: list[str]  # SR runs on one detector (a seed's variants), evaluated in one pass
    patch_sources_of: str | None  # one of them, also evaluated with D held fixed on OTHER_PATCH_SOURCES
    data: str
    val_split: str
    threads: int
    eval_batch_size: int
    max_eval_images: int | None


def measure_sr_evaluation(job: SREvaluationJob) -> dict:
    """The COCO evaluation of SR runs on one detector, in one pass over the val images whose
    detector part they share (``evaluate.evaluate_models``), with each run's reconstruction against
    bicubic (sr_quality.json). ``patch_sources_of`` is also evaluated with its D held fixed on each
    of OTHER_PATCH_SOURCES (the twins' only when the val split has twins) in the same pass, into its
    evals/ folder as ``sodlab eval --sr-patches P`` writes it: not timed, the twins are an oracle.
    Returns {"runs": {run_dir: {"eval", "images_per_s", "sr_quality"}}, "patch_sources": {P: {"dir",
    "eval"}}}."""
    torch.set_num_threads(job.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluations = []  # (out_dir, config, model, what eval.json records beside the stats, or None)
    for run_dir in job.run_dirs:
        evaluations.append((Path(run_dir), *load_trained_model(run_dir, device), None))
    if job.patch_sources_of:
        cfg = TrainConfig.from_dict(read_json(Path(job.patch_sources_of) / "config.json"))
        for patches in OTHER_PATCH_SOURCES:
            if patches == "twin" and twin_source(job.data, job.val_split, cfg.sr.scale) is None:
                continue
            overrides = {"sr.patches": patches}
            out = evaluation_dir(Path(job.patch_sources_of), cfg.data, cfg.val_split, cfg.data, cfg.val_split,
                                 overrides)
            out.mkdir(parents=True, exist_ok=True)
            record = {"inference": {"mode": "whole image"}, "inference_overrides": overrides, "data": str(cfg.data),
                      "split": cfg.val_split}
            evaluations.append((out, *load_trained_model(job.patch_sources_of, device, inference=overrides), record))
    # the val split with the exact twins when some D judges theirs; the others never read them
    twin_cfg = next((cfg for _, cfg, _, _ in evaluations if cfg.sr.patches == "twin"), evaluations[0][1])
    val = load_eval_split(twin_cfg, job.data, job.val_split)
    eval_set = val if job.max_eval_images is None else Subset(val, range(min(job.max_eval_images, len(val))))
    evaluated = evaluate_models([model for _, _, model, _ in evaluations], eval_set, device, job.eval_batch_size,
                                progress=False)
    measured = {"runs": {}, "patch_sources": {}}
    for (out, cfg, model, record), (results, outputs, seconds) in zip(evaluations, evaluated):
        stats = coco_eval(val.ann_file, results, image_ids=outputs.keys())
        atomic_write_json(out / "detections_val.json", results, indent=None)
        atomic_write_json(out / "eval.json", {**stats, **(record or {})})
        if record is None:
            measured["runs"][str(out)] = {"eval": stats, "images_per_s": len(outputs) / seconds}
        else:
            measured["patch_sources"][cfg.sr.patches] = {"dir": str(out), "eval": {**stats, **record}}
    # each run's reconstruction against bicubic, in one pass over the val images and their twins
    runs = [(out, cfg, model) for out, cfg, model, record in evaluations if record is None]
    for (out, _, _), quality in zip(runs, write_sr_qualities(runs)):
        measured["runs"][str(out)]["sr_quality"] = quality
    return measured


def interleaved_latency(predictors: dict, rounds: int, per_round: int, warmup: int, clock=time.perf_counter) -> dict:
    """Batch-1 latency of several methods timed in turns, so that they share the machine's speed.

    ``predictors`` maps a name to (predict, images); the first name is the reference. A machine
    whose speed drifts by tens of percent over an hour (measured here) makes latencies timed one
    method after another incomparable; timed in ``rounds`` rounds, each timing ``per_round`` images
    of every method in a rotating order, the methods of a round run at nearly the same speed.
    Returns per name the median ms over all its timed calls and ``ratio``: the median over rounds of
    its round median over the reference's.
    """
    names = list(predictors)
    for name in names:
        predict, images = predictors[name]
        for i in range(warmup):
            predict(images[i % len(images)])
    per_call = {name: [] for name in names}
    round_medians = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            predict, images = predictors[name]
            times = []
            for i in range(per_round):
                tic = clock()
                predict(images[(r * per_round + i) % len(images)])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(1000 * (clock() - tic))
            per_call[name] += times
            round_medians[name].append(statistics.median(times))
    reference = round_medians[names[0]]
    return {name: {"median_ms": statistics.median(per_call[name]),
                   "ratio": statistics.median(m / ref for m, ref in zip(round_medians[name], reference)),
                   "rounds": rounds, "per_round": per_round, "warmup": warmup} for name in names}


@dataclass
class LatencyJob:
    methods: dict  # name -> {"model_run", "inference", "data", "val_split"}; the first is the reference
    threads: int
    rounds: int
    per_round: int
    warmup: int
    sahi_slice: int
    sahi_overlap: float


def measure_paired_latency(job: LatencyJob) -> dict:
    """``interleaved_latency`` of trained methods, all loaded in one process."""
    torch.set_num_threads(job.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictors = {}
    for name, m in job.methods.items():
        predict, images, *_ = batch1_predictor(m["model_run"], m["inference"], m["data"], m["val_split"],
                                               job.rounds * job.per_round, job.sahi_slice, job.sahi_overlap, device)
        predictors[name] = (predict, images)
    return interleaved_latency(predictors, job.rounds, job.per_round, job.warmup)


def _exit_with(parent_pid: int, poll_s: float = 1.0) -> None:
    """In a measurement's process: exit as soon as the bench that started it is gone.

    A bench killed outright (kill, SIGKILL, a closed session) leaves its spawned measurement
    running: a training would go on writing the run directory that the resumed bench trains again.
    """
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_measurement(fn, job, isolate: bool):
    """fn(job) in a fresh spawned process (isolate) or here; the thread count is restored here."""
    if isolate:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_exit_with, initargs=(os.getpid(),)) as pool:
            return pool.submit(fn, job).result()
    threads = torch.get_num_threads()
    try:
        return fn(job)
    finally:
        torch.set_num_threads(threads)

"""sodlab bench: every method at an equal budget -> bench.json, bench.md and two plots.

Rows (``methods.METHODS``): the baseline Faster R-CNN; ``upscale`` (trained and run on input
upsampled x2); ``sahi``, sliced inference on the baseline's weights; the SR methods
``sr-cls-only`` and ``sr`` and the ablations ``sr-no-recon``, ``sr-no-adv``, ``sr-no-cls``; and
the HR oracle, the baseline trained and evaluated on the data's exact xk twins.

Shared work is done once per seed. The SR branch never back-propagates into the detector, so
every SR variant of a seed trains its branch (``budget.sr_iters``, the staged schedule) on that
seed's baseline detector, frozen: the rows of a seed differ by the SR branch alone, and the
detector's training is counted once; their evaluations share each val batch's detector pass too.
SAHI reuses the baseline's weights. ``upscale`` and ``hr-oracle`` see other images, so they train
detectors of their own: from scratch at the baseline's budget, or (``budget.hires_branch_iters``)
branching off the seed's baseline run for its last iterations, trained at their own input.

A bench is resumable: a killed bench continues where it stopped when started again with the same
budget, reusing every run it finished (its measurement is kept in bench.json's records).

Layout::

    runs/bench-NAME/bench.json, bench.md, ap_by_size.png, speed_accuracy.png, errors.png
    runs/bench-NAME/runs/METHOD-seedS/        a normal run directory (``sodlab eval`` works on it)
    runs/bench-NAME/oracle-data-xK/           the oracle's COCO view of the twins (annotations x K)
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sodlab.bench.methods import METHODS, Method, select_methods
from sodlab.io import atomic_write_bytes, atomic_write_json, read_json, replace_dir
from sodlab.recipes import Budget, ensure_data, train_config

# The final latency times every method of a seed in this many rounds, budget.timing_images in all.
TIMING_ROUNDS = 5

# torch and the modules built on it load inside the functions: the command line reads the bench's
# rows (sodlab.bench.methods) for its --help, which must not wait for torch.
if TYPE_CHECKING:
    from sodlab.models.detector import DetectorConfig

__all__ = ["METHODS", "Budget", "run_bench"]


def resolve_hr_source(budget: Budget, data_dir: Path) -> tuple[str, str]:
    """The SR methods' HR patch source (the exact twins when the data has them) and a note saying why."""
    from sodlab.config import SRConfig
    from sodlab.data.coco import twin_source
    from sodlab.recipes import sr_settings

    sr = SRConfig(**sr_settings(budget))
    if (source := twin_source(data_dir, budget.train_split, sr.scale)) is not None:
        folder, factor = source
        return "twin", (f"SR methods: HR patches cut from the exact x{sr.scale} twins ({folder.name}/"
                        + ("" if factor == 1 else f", area-averaged by {factor}") + ")")
    return "image", (f"SR methods: no x{sr.scale} twins in {data_dir}, so HR patches come from the image itself, "
                     f"which has a real HR patch only for RoIs >= {sr.lr_size * sr.scale} px: small RoIs get none")


def fit_twin_scale(budget: Budget, data_dir: Path) -> tuple[Budget, str | None]:
    """The budget at the data's own twin scale, and a note, when its twins cannot serve the SR
    recipe's scale (none is a multiple of it): data converted with ``sodlab convert --twins 3``
    trains G at x3, and the oracle on those x3 twins. A budget that sets the SR scale itself is
    kept as it is."""
    from sodlab.config import SRConfig
    from sodlab.data.coco import written_twin_scales
    from sodlab.recipes import sr_settings

    scale = SRConfig(**sr_settings(budget)).scale
    written = [set(written_twin_scales(data_dir, split)) for split in (budget.train_split, budget.val_split)]
    common = set.intersection(*written)
    if "scale" in budget.sr or not common or any(k % scale == 0 for k in common):
        return budget, None
    k = max(common)
    return (dataclasses.replace(budget, sr={**budget.sr, "scale": k}, oracle_scale=k),
            f"{data_dir} has x{k} twins, which cannot serve x{scale}: the SR methods super-resolve x{k}, and the "
            f"HR oracle trains on the x{k} twins")


def backbone_label(detector: DetectorConfig) -> str:
    return f"ResNet-{detector.backbone.removeprefix('resnet')}" + ("-FPN" if detector.fpn else "")


def run_name(method: Method, preset_name: str, seed: int, budget: Budget) -> str:
    return f"{method.name}-{preset_name}-seed{seed}" if len(budget.presets) > 1 else f"{method.name}-seed{seed}"


def _is_bench(path: Path) -> bool:
    return (path / "bench.json").is_file()


# Budget fields a bench may be resumed with other values of: what bench.md says about the runs,
# never the runs themselves (the SR variants' runs are bitwise the same in one pass or in passes of
# their own; only the time differs); where the demo and the notebooks keep the budget's runs (the
# bench keeps its own); and the number of seeds, upward only, so that a bench run again with more
# seeds reuses the seeds it has finished (fewer would drop measured seeds from bench.json).
RESUMABLE_BUDGET_CHANGES = ("learned_ap", "sr_one_pass", "runs", "seeds")


def open_bench_dir(out_dir: Path, budget: Budget, force: bool) -> dict:
    """The bench directory, and the records a killed bench of the same budget had finished.

    A bench with another budget is refused (with the differing fields) unless ``force``
    replaces it; a folder that is not a bench is never deleted.
    """
    if not force and _is_bench(out_dir):
        saved = read_json(out_dir / "bench.json")
        wanted = json.loads(json.dumps(dataclasses.asdict(budget)))
        # a field the saved budget lacks was added since: that bench ran as its default does
        defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(Budget)
                                          if f.default is not dataclasses.MISSING}))
        saved_budget = saved.get("budget", {})
        changed = sorted(k for k in wanted
                         if k not in RESUMABLE_BUDGET_CHANGES and saved_budget.get(k, defaults.get(k)) != wanted[k])
        if budget.seeds < saved_budget.get("seeds", 1):
            changed.append(f"seeds {saved_budget['seeds']}, not {budget.seeds}")
        if changed:
            raise FileExistsError(f"{out_dir}: holds a bench with another budget ({', '.join(changed)}); "
                                  "choose another --name or pass --force to replace it")
        return {(r["method"], r["preset"], r["seed"]): r for r in saved.get("records", [])}
    replace_dir(out_dir, force, _is_bench, "bench", hint="choose another --name")
    return {}


def run_bench(budget: Budget, out_dir: str | Path, data: str | None = None, methods: list[str] | None = None,
              force: bool = False, progress: bool = True) -> Path:
    """Train, measure and evaluate every method; write bench.json, bench.md and the plots.

    ``data`` is a COCO-format directory; by default the budget's embedded benchmark (generated
    if absent).
    """
    from sodlab.bench.measure import (InferenceJob, LatencyJob, measure_inference, measure_paired_latency,
                                      run_measurement)
    from sodlab.bench.report import format_bench_markdown, plot_ap_by_size, plot_errors, plot_speed_accuracy, summarize
    from sodlab.bench.stats import bench_intervals
    from sodlab.data.coco import load_split
    from sodlab.data.oracle import prepare_oracle_data
    from sodlab.models.detector import preset

    out_dir = Path(out_dir)
    chosen = select_methods(methods)
    for preset_name in budget.presets:
        preset(preset_name)  # an unknown preset fails here, before anything is written
    data_dir = Path(data) if data else ensure_data(budget, progress=progress)
    lr_val = load_split(data_dir, budget.val_split, train=False)  # fail early on a missing split
    budget, scale_note = fit_twin_scale(budget, data_dir)
    finished = open_bench_dir(out_dir, budget, force)
    started = time.perf_counter()
    hr_source, note = resolve_hr_source(budget, data_dir)
    notes = [scale_note] if scale_note else []
    if any(m.train_as and m.train_as.startswith("sr") for m in chosen):
        notes.append(note)
    oracle_dir = None
    if any(m.twins for m in chosen):
        oracle_dir, note = prepare_oracle_data(data_dir, budget.oracle_scale,
                                               out_dir / f"oracle-data-x{budget.oracle_scale}",
                                               (budget.train_split, budget.val_split))
        notes.append(note)
        if oracle_dir is None:
            chosen = [m for m in chosen if not m.twins]
    header = bench_header(out_dir, budget, chosen, data_dir, lr_val, hr_source, oracle_dir, notes)
    atomic_write_json(out_dir / "bench.json", {**header, "complete": False, "records": list(finished.values())})

    records: list[dict] = []
    trained: dict[tuple, tuple] = {}  # (training record, config) of runs a pass trained ahead of their turn
    evaluated: dict[tuple, dict] = {}  # the evaluation of SR runs a shared pass evaluated ahead of their turn
    jobs = [(p, s, m) for p in budget.presets for s in range(budget.seeds) for m in chosen]
    for number, (preset_name, seed, method) in enumerate(jobs, start=1):
        run_dir = out_dir / "runs" / run_name(method, preset_name, seed, budget)
        key = (method.name, preset_name, seed)
        if key in finished:
            if progress:
                print(f"bench [{number}/{len(jobs)}] {method.name} ({preset_name}, seed {seed}): finished before, reused")
            records.append(finished[key])
            continue
        if progress:
            print(f"bench [{number}/{len(jobs)}] {method.name} ({preset_name}, seed {seed})", flush=True)
        detector_run = out_dir / "runs" / run_name(METHODS[0], preset_name, seed, budget)
        method_data = oracle_dir if method.twins else data_dir
        if method.train_as:
            # SR variants train their branch on the seed's baseline detector; upscale and the HR
            # oracle branch off its run when the budget says so (train_config decides which uses it)
            together = [m for m in chosen if m.shares_detector and (m.name, preset_name, seed) not in finished]
            together = together if method.shares_detector and budget.sr_one_pass else [method]
            if key not in trained:  # an SR variant trains in one pass with the seed's others
                trained |= train_pass(budget, together, out_dir, preset_name, seed, method_data, detector_run,
                                      hr_source, progress)
            (training, cfg), model_run = trained.pop(key), run_dir
            if method.shares_detector and key not in evaluated:  # ... and is evaluated in one pass with them
                evaluated |= evaluate_pass(budget, together, out_dir, preset_name, seed, method_data)
        else:  # SAHI: the baseline's weights, and so its training
            reused = next(r for r in records
                          if (r["method"], r["preset"], r["seed"]) == (method.reuse, preset_name, seed))
            training, model_run = {**reused["training"], "reused_from": reused["run_dir"]}, Path(reused["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "sahi.json", {"model_run": str(model_run), **header["sahi"]})
        if method.shares_detector:
            training["shared_detector"] = str(detector_run)
        job = InferenceJob(
            run_dir=str(run_dir), model_run=str(model_run), inference=method.inference, data=str(method_data),
            val_split=budget.val_split, eval_ann_file=str(lr_val.ann_file),
            box_scale=1 / budget.oracle_scale if method.twins else 1.0, threads=budget.threads,
            # a first look at batch 1, printed as the bench goes and giving its peak RSS: bench.md's
            # latency is the interleaved one below, so one round's images are enough here
            timing_images=max(1, budget.timing_images // TIMING_ROUNDS), timing_warmup=budget.timing_warmup,
            eval_batch_size=budget.eval_batch_size, max_eval_images=budget.max_eval_images,
            sahi_slice=budget.sahi_slice, sahi_overlap=budget.sahi_overlap, evaluate=key not in evaluated)
        inference = run_measurement(measure_inference, job, budget.isolate)
        shared_evaluation = evaluated.pop(key, {})
        inference |= {k: v for k, v in shared_evaluation.items() if k != "patch_sources"}
        records.append({"method": method.name, "preset": preset_name, "seed": seed, "run_dir": str(run_dir),
                        "backbone": backbone_label(preset(preset_name)),
                        "training": training, "eval": inference.pop("eval"), "inference": inference})
        if "patch_sources" in shared_evaluation:  # `sr`: what G adds to its D, against bilinear patches and a perfect G
            records[-1]["patch_sources"] = shared_evaluation["patch_sources"]
        if progress:
            print("  " + record_summary(records[-1]), flush=True)
        atomic_write_json(out_dir / "bench.json", {**header, "complete": False, "records": records})

    # Latency again, every method of a seed in turns in one process: the runs above were timed one
    # after another, minutes to hours apart, on a machine whose speed drifts.
    for preset_name in budget.presets:
        for seed in range(budget.seeds):
            group = {m.name: {"model_run": str(out_dir / "runs" / run_name(METHODS[0] if m.reuse else m, preset_name,
                                                                             seed, budget)),  # SAHI: the baseline's
                              "inference": m.inference, "data": str(oracle_dir if m.twins else data_dir),
                              "val_split": budget.val_split}
                     for m in sorted(chosen, key=lambda m: m.name != METHODS[0].name)}
            if progress:
                print(f"bench: latency of {len(group)} methods ({preset_name}, seed {seed}) in "
                      f"{TIMING_ROUNDS} interleaved rounds", flush=True)
            job = LatencyJob(group, budget.threads, TIMING_ROUNDS, max(1, budget.timing_images // TIMING_ROUNDS),
                             budget.timing_warmup,
                             budget.sahi_slice, budget.sahi_overlap)
            paired = run_measurement(measure_paired_latency, job, budget.isolate)
            for record in records:
                if record["preset"] == preset_name and record["seed"] == seed:
                    record["inference"]["paired"] = paired[record["method"]]
    rows = summarize(records, chosen, budget.presets)
    evaluated_ids = lr_val.ids[:header["evaluated_images"]]
    intervals = bench_intervals(records, lr_val.ann_file, evaluated_ids, resamples=budget.bootstrap_resamples)
    for row in rows:
        row["intervals"] = intervals.get((row["preset"], row["method"]))
    header["seconds"] = time.perf_counter() - started
    header["reused_records"] = sum(1 for r in records if (r["method"], r["preset"], r["seed"]) in finished)
    atomic_write_json(out_dir / "bench.json", {**header, "complete": True, "records": records, "rows": rows})
    atomic_write_bytes(out_dir / "bench.md", format_bench_markdown(header, rows, records).encode())
    atomic_write_bytes(out_dir / "ap_by_size.png", plot_ap_by_size(rows))
    atomic_write_bytes(out_dir / "speed_accuracy.png", plot_speed_accuracy(rows))
    atomic_write_bytes(out_dir / "errors.png", plot_errors(rows))
    return out_dir


def train_pass(budget: Budget, methods: list[Method], out_dir: Path, preset_name: str, seed: int, data_dir: Path,
               detector_run: Path, hr_source: str, progress: bool) -> dict[tuple, tuple]:
    """Train one method's run, or several SR variants' in one pass (``train.train_branches``):
    {(method, preset, seed): (its training record, its config)}."""
    from sodlab.bench.measure import TrainJob, measure_training, run_measurement
    from sodlab.runs import config_mismatch
    from sodlab.train import INFERENCE_SETTINGS

    cfgs = [train_config(budget, m.train_as, out_dir / "runs" / run_name(m, preset_name, seed, budget), data_dir,
                         seed, preset_name, detector_run=detector_run, hr_source=hr_source) for m in methods]
    for cfg in cfgs:
        if (Path(cfg.out) / "config.json").is_file() and (changed := config_mismatch(Path(cfg.out), cfg)):
            # a recipe whose inference settings changed (a new gate, say) leaves the trained weights
            # valid: say how to measure them as they are, since --force trains them again
            hint = ("; only inference settings differ, so `sodlab eval --run <run>` with those settings "
                    "measures the trained run without training it again"
                    if set(changed) <= set(INFERENCE_SETTINGS) else "")
            raise FileExistsError(f"{cfg.out}: a run with another config ({', '.join(changed)}); pass --force to "
                                  f"replace the bench{hint}")
    if progress and len(methods) > 1:
        print(f"  in one pass with {', '.join(m.name for m in methods[1:])}", flush=True)
    measured = run_measurement(measure_training, TrainJob(cfgs, budget.threads), budget.isolate)
    return {(m.name, preset_name, seed): (record, cfg) for m, record, cfg in zip(methods, measured, cfgs)}


def evaluate_pass(budget: Budget, methods: list[Method], out_dir: Path, preset_name: str, seed: int,
                  data_dir: Path) -> dict[tuple, dict]:
    """Evaluate SR variants of one seed in one pass over the val images, sharing its detector's part
    (``bench.measure.measure_sr_evaluation``), with `sr` also on the other patch sources:
    {(method, preset, seed): its "eval", "images_per_s", "sr_quality" (and `sr`'s "patch_sources")}."""
    from sodlab.bench.measure import SREvaluationJob, measure_sr_evaluation, run_measurement

    run_dirs = {m.name: str(out_dir / "runs" / run_name(m, preset_name, seed, budget)) for m in methods}
    job = SREvaluationJob(list(run_dirs.values()), run_dirs.get("sr"), str(data_dir), budget.val_split,
                          budget.threads, budget.eval_batch_size, budget.max_eval_images)
    measured = run_measurement(measure_sr_evaluation, job, budget.isolate)
    return {(name, preset_name, seed): {**measured["runs"][run_dir],
                                        **({"patch_sources": measured["patch_sources"]} if name == "sr" else {})}
            for name, run_dir in run_dirs.items()}


def bench_header(out_dir: Path, budget: Budget, methods: list[Method], data_dir: Path, lr_val, hr_source: str,
                 oracle_dir: Path | None, notes: list[str]) -> dict:
    """What bench.json says about the whole bench, before its records."""
    import torch

    from sodlab.models.sahi_adapter import POSTPROCESS, sahi_version
    from sodlab.recipes import learned_ap_on, sr_settings
    from sodlab.train import git_revision

    evaluated = len(lr_val) if budget.max_eval_images is None else min(len(lr_val), budget.max_eval_images)
    sr = sr_settings(budget)  # the SR methods' inference settings, as train_config builds them
    return {
        "name": out_dir.name, "budget": dataclasses.asdict(budget), "methods": [m.name for m in methods],
        "data": str(data_dir), "val_images": len(lr_val), "evaluated_images": evaluated,
        "images_seen_per_method": budget.iters * budget.batch_size, "schedule": "staged on the seed's baseline",
        "sr_hr_source": hr_source, "sr_fusion": sr.get("fusion", "replace"),
        "sr_gate_top_k": sr.get("gate_top_k", 0), "sr_gate_rank": sr.get("gate_rank", "foreground"),
        "sr_gate_share_iou": sr.get("gate_share_iou", 0.0),
        "sr_discriminator_trunk": sr.get("discriminator_trunk", "compact"), "sr_scale": sr.get("scale", 4),
        "sr_amp": sr["amp"],
        "oracle": {"scale": budget.oracle_scale, "data": str(oracle_dir) if oracle_dir else None},
        # the budget's claim that its detectors have learned holds for its own data only
        "learned_ap": learned_ap_on(budget, data_dir),
        "sahi": {"slice": budget.sahi_slice, "overlap": budget.sahi_overlap, "standard_pred": True,
                 **POSTPROCESS, "package_version": sahi_version()},
        "bootstrap_resamples": budget.bootstrap_resamples, "torch_threads": budget.threads, "isolated_processes": budget.isolate, "peak_rss": "VmHWM",
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "device": "cuda" if torch.cuda.is_available() else "cpu", "git": git_revision(),
                        "cpu": platform.processor() or platform.machine(),
                        "bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())},
        "notes": notes,
    }


def record_summary(record: dict) -> str:
    t, i, e = record["training"], record["inference"], record["eval"]
    return (f"AP {100 * e['AP']:.1f}  APs {100 * e['APs']:.1f}  train {t['seconds']:.0f} s "
            f"({t['images_per_s']:.1f} img/s)  infer {i['ms_per_image']:.0f} ms/img")

"""Runs as units: evaluate a trained run, reuse a finished one, train only what is missing.

``train`` (sodlab.train) writes a run's weights; ``finish_run`` evaluates it (eval.json,
detections_val.json, and for SR methods sr_quality.json and browsable patches). The demo, the
notebooks, the bench and ``sodlab train`` all go through ``ensure_run`` / ``train_and_finish``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from sodlab.config import TrainConfig
from sodlab.data.coco import load_split, twin_source
from sodlab.data.oracle import oracle_ground_truth
from sodlab.distributed import init_distributed
from sodlab.evaluate import evaluate_run
from sodlab.io import atomic_write_json, read_json
from sodlab.sr_quality import evaluate_sr_qualities, write_sr_patches
from sodlab.train import load_trained_model, train


def load_eval_split(cfg: TrainConfig, data: str | os.PathLike | None = None, split: str | None = None):
    """The split an evaluation of cfg's model reads (default: the run's val split): resized as the
    model was trained (upscale), and with the exact twins when D judges their patches
    (``sr.patches="twin"``, the oracle G), which only data with twins can give."""
    data, split = data or cfg.data, split or cfg.val_split
    twins = cfg.is_sr and cfg.sr.patches == "twin"
    if twins and twin_source(data, split, cfg.sr.scale) is None:
        raise ValueError(f"{data}: --sr-patches twin cuts D's patches from the exact x{cfg.sr.scale} twins in "
                         f"{split}_x{cfg.sr.scale}/ (or twins of a multiple of {cfg.sr.scale}), and there are none; "
                         "the embedded benchmark has them")
    return load_split(data, split, train=False, scale=cfg.input_scale, hr_scale=cfg.sr.scale if twins else None)


def evaluation_dir(run_dir: Path, run_data: str, run_split: str, data: str, split: str, overrides: dict) -> Path:
    """Where ``sodlab eval`` writes eval.json and detections_val.json: the run itself for its own
    settings on its own val split; any other evaluation goes to run_dir/evals/NAME/, NAME saying
    what differs, so that it never replaces the evaluation the run was trained, benchmarked and
    browsed with."""
    parts = []
    if Path(data).resolve() != Path(run_data).resolve():
        digest = hashlib.sha1(str(Path(data).resolve()).encode()).hexdigest()[:8]
        parts.append(f"{Path(data).resolve().name}-{digest}")
    if split != run_split or overrides:
        parts.append(split)
    parts += [f"{setting}={value}" for setting, value in sorted(overrides.items())]
    return run_dir / "evals" / "+".join(parts) if parts else run_dir


def evaluate_with(run_dir: str | os.PathLike, overrides: dict, data: str | os.PathLike | None = None,
                  split: str | None = None, max_images: int | None = None, progress: bool = True) -> tuple[str, Path, dict]:
    """``sodlab eval``: a trained run evaluated with other inference settings (train.INFERENCE_SETTINGS)
    or on other data, into ``evaluation_dir``; eval.json records what this evaluation changed, and
    config.json keeps the trained settings. ``max_images``: the first N images only (the bench's dry
    runs). Returns the run's method, the folder written and the stats."""
    from torch.utils.data import Subset

    run_dir = Path(run_dir)
    cfg, model = load_trained_model(run_dir, inference=overrides)
    data, split = data or cfg.data, split or cfg.val_split
    out = evaluation_dir(run_dir, cfg.data, cfg.val_split, str(data), split, overrides)
    val = load_eval_split(cfg, data, split)
    if max_images is not None:
        val = Subset(val, range(min(max_images, len(val))))
    ground_truth, box_scale = oracle_ground_truth(data, split) or (None, 1.0)
    out.mkdir(parents=True, exist_ok=True)
    stats = evaluate_run(out, model, val, batch_size=cfg.eval_batch_size, progress=progress, tile=cfg.tile,
                         tile_overlap=cfg.tile_overlap, ground_truth=ground_truth, box_scale=box_scale,
                         record={"inference_overrides": overrides, "data": str(data), "split": split}
                         if out != run_dir else None)
    return cfg.method, out, stats


# What else D can judge at inference (SRConfig.patches) besides G's patches: bilinear ones (G
# bypassed) and the same boxes cut from the exact twins (a perfect G). With D held fixed, the two
# bound what any reconstruction can add to that D (README: "How much any G could give").
OTHER_PATCH_SOURCES = ("bilinear", "twin")


def finish_run(run_dir: str | os.PathLike, device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Evaluate a trained run on its val split: eval.json and detections_val.json; for SR
    methods also sr_quality.json (G against bicubic on held-out small RoIs) and sr_patches/.
    Under torchrun every rank scores its share of the images and rank 0 writes. Returns the stats
    (None on the other ranks)."""
    ddp = init_distributed()
    ddp.barrier()  # rank 0 wrote the final checkpoint
    device = device or ddp.device
    run_dir = Path(run_dir)
    cfg, model = load_trained_model(run_dir, device)
    val = load_eval_split(cfg)
    ground_truth, box_scale = oracle_ground_truth(cfg.data, cfg.val_split) or (None, 1.0)
    stats = evaluate_run(run_dir, model, val, device=device, batch_size=cfg.eval_batch_size, progress=progress,
                         rank=ddp.rank, world_size=ddp.world_size, tile=cfg.tile, tile_overlap=cfg.tile_overlap,
                         ground_truth=ground_truth, box_scale=box_scale)
    if cfg.is_sr and ddp.is_main:
        held_out = load_split(cfg.data, cfg.val_split, train=False, hr_scale=cfg.hr_twin_scale)
        write_sr_quality(run_dir, cfg, model, held_out)
        # Browsable patches show the exact twin as HR whenever the data has one.
        write_sr_patches(model, held_out, run_dir / "sr_patches",
                         twins=twin_source(cfg.data, cfg.val_split, cfg.sr.scale))
    return stats


def write_sr_quality(run_dir: str | os.PathLike, cfg: TrainConfig, model, held_out=None) -> dict:
    """Write and return sr_quality.json of an SR run: G (or bilinear, without G) against bicubic
    on the val split's small ground-truth boxes, with the twins the run trained on, by size bin.
    ``held_out`` is that split with its twins, when the caller has loaded it already."""
    return write_sr_qualities([(run_dir, cfg, model)], held_out)[0]


def write_sr_qualities(runs: list[tuple], held_out=None) -> list[dict]:
    """``write_sr_quality`` of several SR runs (run_dir, cfg, model) on the same val split and
    twins, in one pass over the split (``sr_quality.evaluate_sr_qualities``)."""
    splits = {(str(cfg.data), cfg.val_split, cfg.hr_twin_scale) for _, cfg, _ in runs}
    if len(splits) != 1:
        raise ValueError(f"SR quality in one pass needs one val split and twin scale; got {sorted(splits)}")
    cfg = runs[0][1]
    if held_out is None:
        held_out = load_split(cfg.data, cfg.val_split, train=False, hr_scale=cfg.hr_twin_scale)
    qualities = evaluate_sr_qualities([model for _, _, model in runs], held_out)
    for (run_dir, _, _), quality in zip(runs, qualities):
        atomic_write_json(Path(run_dir) / "sr_quality.json", quality)
    return qualities


def train_and_finish(cfg: TrainConfig, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    run_dir = train(cfg, resume=resume, force=force, progress=progress)
    finish_run(run_dir, progress=progress)
    return run_dir


def _comparable(config: dict) -> dict:
    """A saved or fresh config as json values, without what does not change the result."""
    config = TrainConfig.from_dict(config).to_dict()
    config = json.loads(json.dumps(config))
    for key in ("out", "ckpt_every", "eval_batch_size"):
        config.pop(key, None)
    for key in ("data", "init_from", "continue_from"):
        config[key] = str(Path(config[key]).resolve()) if config.get(key) else ""
    return config


def _differing_fields(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Where ``wanted`` differs from ``saved``, as dotted paths to the leaves (sr.gate_rank, not sr)."""
    changed = []
    for key, value in wanted.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changed += _differing_fields(old, value, f"{prefix}{key}.")
        elif old != value:
            changed.append(f"{prefix}{key}")
    return changed


def config_mismatch(run_dir: str | os.PathLike, cfg: TrainConfig) -> list[str]:
    """The TrainConfig fields (dotted, e.g. sr.gate_rank) where the run saved at run_dir differs from ``cfg``."""
    saved, wanted = _comparable(read_json(Path(run_dir) / "config.json")), _comparable(cfg.to_dict())
    return sorted(_differing_fields(saved, wanted))


def run_is_complete(run_dir: str | os.PathLike, cfg: TrainConfig | None = None) -> bool:
    """True when run_dir holds an evaluated run (config, checkpoint, eval.json, detections) and,
    if ``cfg`` is given, was trained with that config."""
    run_dir = Path(run_dir)
    needed = [run_dir / "config.json", run_dir / "eval.json", run_dir / "detections_val.json",
              run_dir / "checkpoints" / "last.pt"]
    if not all(path.is_file() for path in needed):
        return False
    return cfg is None or not config_mismatch(run_dir, cfg)


def _checkpoint_time(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "last.pt"
    return path.stat().st_mtime_ns if path.is_file() else -1


def ensure_run(cfg: TrainConfig, train_missing: bool = True, progress: bool = True) -> Path | None:
    """cfg's run directory: reused when it is complete and was trained with the same config,
    trained (and evaluated) otherwise, replacing an interrupted or different run.

    An SR run on a detector run (``init_from``), or a run continuing one (``continue_from``), older
    than that detector's checkpoint is stale (the detector was trained again since) and is trained
    again too. With
    ``train_missing=False`` nothing is trained: returns None when the run is missing or stale.
    """
    run_dir = Path(cfg.out)
    start = Path(cfg.init_from or cfg.continue_from) if cfg.init_from or cfg.continue_from else None
    fresh = start is None or _checkpoint_time(run_dir) >= _checkpoint_time(start) >= 0
    if fresh and run_is_complete(run_dir, cfg):
        if progress:
            print(f"reusing {run_dir} (evaluated, same config)")
        return run_dir
    if not train_missing:
        return None
    return train_and_finish(cfg, force=True, progress=progress)


def ensure_method(budget, method: str, train_missing: bool | None = None, progress: bool = True) -> Path | None:
    """The run of ``method`` in the budget's runs folder (runs/demo for the demo budget): reused
    when complete, trained otherwise. An SR method trains on the budget's baseline run, which is
    ensured first. By default only the quick budget trains what is missing; for the demo budget a
    missing run is an error naming the command that makes it (`make demo`).
    """
    from sodlab.recipes import ensure_data, train_config

    train_missing = budget.name == "quick" if train_missing is None else train_missing
    runs_dir = budget.runs_dir()
    cfg = train_config(budget, method, runs_dir / method, detector_run=runs_dir / "baseline")
    if cfg.init_from and train_missing:
        ensure_method(budget, "baseline", train_missing, progress)
    if train_missing:
        ensure_data(budget, progress=progress)
    run_dir = ensure_run(cfg, train_missing=train_missing, progress=progress)
    if run_dir is None and budget.name == "demo":
        raise FileNotFoundError(f"{cfg.out}: no finished {method} run of the demo budget; make it with `make demo` "
                                "(or `sodlab demo`), or set SODLAB_BUDGET=quick")
    return run_dir


def completed_runs(runs_dir: str | os.PathLike, names) -> dict[str, Path]:
    """{name: runs_dir/name} for the names whose run has been evaluated, in the order given."""
    runs_dir = Path(runs_dir)
    return {name: runs_dir / name for name in names if (runs_dir / name / "eval.json").is_file()}

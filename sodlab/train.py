"""One training loop, readable top to bottom (after torchvision's references/detection/engine.py).

A run is a directory: config.json, metrics.jsonl and checkpoints/last.pt; evaluation (eval.json,
detections_val.json, sr_quality.json) comes after, in sodlab.runs.finish_run. On the CPU a run is bitwise reproducible from its seed, and a resumed run
ends with the same weights as an uninterrupted one: the batch order is a pure function of
(seed, iteration) and the RNG states travel in the checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from sodlab.config import DETECTOR_TRUNKS, TrainConfig
from sodlab.data.coco import collate_fn, load_split
from sodlab.data.oracle import oracle_view
from sodlab.data.tiles import TiledDataset, count_pushed_under
from sodlab.distributed import any_rank, average_gradients, init_distributed
from sodlab.io import (atomic_torch_save, atomic_write_bytes, atomic_write_json, load_checkpoint_file, read_json,
                       read_metrics_log, remove_stale_temporaries)
from sodlab.rng import rng_state, set_rng_state
from sodlab.rundir import RUN_FORMAT, RUN_MARKER, RunLock, check_replaceable, replace_run_dir, run_contents
from sodlab.losses import discriminator_objective, generator_objective
from sodlab.models import build_model, fast_autocast_dtype
from sodlab.sr_quality import psnr

# Fields that may differ when a run is resumed: extending a run is the point of resuming.
RESUMABLE_CHANGES = {"iters", "ckpt_every"}
RUN_DIR_HINT = "choose another --out or --resume it"
# What a run continuing another (TrainConfig.continue_from) must share with it: the schedule, the
# batches and the detector it continues.
CONTINUED_FIELDS = ("seed", "iters", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "warmup_iters",
                    "schedule", "restart_at", "restart_lr", "grad_clip", "hflip_prob", "amp", "train_split", "preset")


def resize_warning(cfg: TrainConfig, ann_file) -> str | None:
    """A warning when the preset's input resize puts many objects under 8 px that are larger at
    native resolution (train on tiles then)."""
    scale = cfg.input_scale
    return count_pushed_under(ann_file, cfg.detector.min_size * scale, cfg.detector.max_size * scale,
                              input_scale=scale).warning()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_indices(num_images: int, batch_size: int, seed: int, start_iter: int, rank: int = 0,
                  world_size: int = 1):
    """Yield this rank's index batches of iterations start_iter, start_iter+1, ... forever.

    A DistributedSampler shards each epoch's permutation (drawn from seed and epoch alone)
    across the ranks; this rank's shards are concatenated epoch after epoch and cut into
    batches. Iteration i therefore always sees the same images, whether the run was resumed or
    not: a plain DataLoader iterator could not restart in the middle of an epoch.
    """
    sampler = DistributedSampler(range(num_images), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    per_epoch = len(sampler)
    epochs: dict[int, list[int]] = {}

    def index(position: int) -> int:
        epoch, offset = divmod(position, per_epoch)
        if epoch not in epochs:
            sampler.set_epoch(epoch)
            epochs.clear()  # only the current (and next) epoch are ever needed
            epochs[epoch] = list(sampler)
        return epochs[epoch][offset]

    it = start_iter
    while True:
        yield [index(it * batch_size + k) for k in range(batch_size)]
        it += 1


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Linear warmup, then cosine decay to 0 or steps of x0.1 at 2/3 and 8/9 of the run; with a
    warm restart (cfg.restart_at), the cosine starts again there from cfg.restart_lr."""
    if cfg.restart_at and it >= cfg.restart_at:
        progress = (it - cfg.restart_at) / (cfg.iters - cfg.restart_at)
        return cfg.restart_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if it < cfg.warmup_iters:
        return 0.001 + (1 - 0.001) * it / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.iters - cfg.warmup_iters)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(it >= m for m in (cfg.iters * 2 // 3, cfg.iters * 8 // 9))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The detector step's autocast dtype, or None for float32 (see TrainConfig.amp)."""
    return fast_autocast_dtype(device) if cfg.amp else None


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_record(cfg: TrainConfig) -> dict:
    """config.json: the config, plus sodlab's marker, the git revision, the versions and the machine."""
    import torchvision

    return {RUN_MARKER: RUN_FORMAT, **cfg.to_dict(), "git": git_revision(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__},
            "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


def check_run_dir(cfg: TrainConfig, resume: bool, force: bool) -> None:
    """Every refusal of ``prepare_run_dir`` (a changed config on resume, a run or a foreign folder
    in the way, the data or the run this one starts from inside --out), touching nothing."""
    run_dir = Path(cfg.out)
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path}: nothing to resume (no config.json)")
        saved = read_json(config_path)
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in RESUMABLE_CHANGES and json.loads(json.dumps(v)) != saved.get(k))
        if changed and not force:
            raise ValueError(f"{config_path}: resuming with a changed config ({', '.join(changed)}); "
                             "pass force=True (--force) to resume anyway")
    elif run_contents(run_dir):
        if not force:
            raise FileExistsError(f"{run_dir} already holds a run; {RUN_DIR_HINT}, or pass --force to replace it")
        check_replaceable(run_dir, cfg.data, protected=[cfg.init_from, cfg.continue_from])


def prepare_run_dir(cfg: TrainConfig, resume: bool, force: bool) -> Path:
    """Make runs/NAME ready under the run's lock (the caller holds ``RunLock``): the refusals of
    ``check_run_dir``, then an old run replaced (only a sodlab run holding no data), or the stale
    temporaries of an interrupted one removed; config.json written."""
    check_run_dir(cfg, resume, force)
    run_dir = Path(cfg.out)
    if resume:
        remove_stale_temporaries(run_dir)  # killed atomic writes of the interrupted run
    elif run_contents(run_dir):
        replace_run_dir(run_dir, cfg.data, protected=[cfg.init_from, cfg.continue_from])
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", run_record(cfg))
    return run_dir


def save_checkpoint(path: Path, model, optimizers: dict, iteration: int, cfg: TrainConfig, num_classes: int) -> None:
    """Tensors and plain values only (loadable with weights_only=True). Weights that are not all
    finite are never saved: the last good checkpoint stays."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"{path.parent.parent}, iteration {iteration}: {len(bad)} weight tensors are not "
                                 f"finite ({bad[0]}, ...); training stopped, the last good checkpoint is kept")
    rng = rng_state()
    if hasattr(model, "sampling_rng"):
        rng["sr_sampling"] = model.sampling_rng.get_state()
    atomic_torch_save({
        "model": model.state_dict(),
        "num_classes": num_classes,
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "iteration": iteration,  # iterations completed
        "config": cfg.to_dict(),
        "rng": rng,
    }, path)


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights do not fit the model its config describes (an edited config.json)."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def _differences(saved: dict, current: dict) -> list[str]:
    """'detector.fpn_channels 128 there, 64 here': the fields where ``current`` differs from a
    checkpoint's own record of its config (the lengths, which resuming may change, aside)."""
    saved, current = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    return [f"{k} {saved[k]!r} there, {v!r} here" for k, v in current.items()
            if k in saved and saved[k] != v and k not in RESUMABLE_CHANGES | {"out"}]


def load_weights(module, state: dict, ckpt_path: Path, described_by: str, differences: list[str],
                 remedy: str) -> None:
    """``module.load_state_dict(state)``; weights that do not fit are one line naming the
    checkpoint, what describes the model, what differs and what to do."""
    try:
        module.load_state_dict(state)
    except RuntimeError:
        expected = module.state_dict()
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        shapes = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        kinds = (("missing tensors", missing), ("unexpected tensors", unexpected), ("tensors of another shape", shapes))
        found = [f"{len(keys)} {what} (first {keys[0]})" for what, keys in kinds if keys]
        raise CheckpointMismatch(
            f"{ckpt_path}: its weights do not fit the model {described_by} describes ({'; '.join(found)})"
            + (f"; the checkpoint's config differs in {', '.join(differences)}" if differences else "")
            + f"; {remedy}") from None


def load_checkpoint(path: Path, model, optimizers: dict, cfg: TrainConfig) -> int:
    ckpt = load_checkpoint_file(path, keys=("model", "optimizers", "rng", "iteration"))
    load_weights(model, ckpt["model"], path, f"{Path(cfg.out) / 'config.json'} with the flags given",
                 _differences(ckpt.get("config") or {}, cfg.to_dict()),
                 "resume with the config the run was trained with (leave out the flags that change the model)")
    for name, opt in optimizers.items():
        if name not in ckpt["optimizers"]:
            raise CheckpointMismatch(f"{path}: has no {name} optimizer state, which {cfg.out}/config.json's "
                                     f"method {cfg.method} needs; resume with the config it was trained with")
        try:
            opt.load_state_dict(ckpt["optimizers"][name])
        except ValueError as e:
            raise CheckpointMismatch(f"{path}: the {name} optimizer state does not fit this config ({e})") from None
    try:
        set_rng_state(ckpt["rng"])
    except ValueError as e:
        raise CheckpointMismatch(f"{path}: {e}") from None
    if "sr_sampling" in ckpt["rng"]:
        model.sampling_rng.set_state(ckpt["rng"]["sr_sampling"])
    return ckpt["iteration"]


def make_optimizers(cfg: TrainConfig, model) -> dict:
    """The detector's optimizer (cfg.optimizer: AdamW by default, or SGD), and Adam for D and G,
    each with its own optimizer since they update alternately. The staged schedule has no
    detector optimizer: its detector is frozen."""
    detector = model.detector if cfg.is_sr else model
    optimizers = {}
    if not (cfg.is_sr and cfg.sr_train.schedule == "staged"):
        params = [p for p in detector.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            optimizers["detector"] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizers["detector"] = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    if cfg.is_sr:
        optimizers["discriminator"] = torch.optim.Adam([p for p in model.discriminator.parameters() if p.requires_grad],
                                                       lr=cfg.sr_train.lr_discriminator, betas=(0.9, 0.999))
        if model.generator is not None:
            optimizers["generator"] = torch.optim.Adam(model.generator.parameters(),
                                                       lr=cfg.sr_train.lr_generator, betas=(0.9, 0.999))
    return optimizers


def kept_checkpoint(run_dir: str | os.PathLike, iteration: int) -> Path:
    """Where a run keeps its checkpoint of iteration ``iteration`` (TrainConfig.keep_checkpoint_at)."""
    return Path(run_dir) / "checkpoints" / f"iter-{iteration}.pt"


def continue_run(cfg: TrainConfig, model, optimizers: dict) -> int:
    """Start a new run from continue_from's checkpoint of iteration continue_at: its weights,
    optimizer moments and RNG; returns the iteration this run goes on from."""
    path, parent = kept_checkpoint(cfg.continue_from, cfg.continue_at), Path(cfg.continue_from) / "config.json"
    if not path.is_file() or not parent.is_file():
        raise FileNotFoundError(f"{path}: continue_from {cfg.continue_from} kept no checkpoint of iteration "
                                f"{cfg.continue_at}; train it with keep_checkpoint_at {cfg.continue_at}")
    saved = read_json(parent)
    differ = [k for k in CONTINUED_FIELDS if json.loads(json.dumps(getattr(cfg, k))) != saved.get(k)]
    if differ:
        raise ValueError(f"{parent}: this run continues its schedule, but differs from it in {', '.join(differ)}")
    return load_checkpoint(path, model, optimizers, cfg)


def init_detector_from(cfg: TrainConfig, model) -> None:
    """Load a finished run's detector weights: into the SR detector, frozen, for the staged
    schedule; into a detector method's model, which then trains on (fine-tuning)."""
    ckpt_path = Path(cfg.init_from) / "checkpoints" / "last.pt"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: init_from names no finished run")
    ckpt = load_checkpoint_file(ckpt_path)
    saved = (ckpt.get("config") or {}).get("detector", {})
    detector = model.detector if cfg.is_sr else model
    load_weights(detector, ckpt["model"], ckpt_path, "this run's detector config",
                 [f"detector.{d}" for d in _differences(saved, dataclasses.asdict(cfg.detector))],
                 f"give this run the detector settings of {Path(cfg.init_from) / 'config.json'} (its --preset and "
                 "--detector-* flags)")
    if cfg.is_sr and cfg.sr_train.schedule == "staged":
        detector.requires_grad_(False)
        if cfg.sr.discriminator_trunk in DETECTOR_TRUNKS:  # D built on the detector starts from its trained heads
            model.discriminator.init_from_detector()


def init_generator(cfg: TrainConfig, model) -> None:
    """Start G from a pretrained one: the file cfg.sr_train.generator_init names, or, for
    "pretrain", the PSNR-oriented G of this data and SR config (made once, then cached)."""
    from sodlab.pretrain import PretrainConfig, init_generator_from, pretrain_generator

    path = cfg.sr_train.generator_init
    if path == "pretrain":
        iters = cfg.sr_train.pretrain_iters
        # the default warm-up (50 of 1,000 iterations), shortened for the short runs of tests and dry runs
        warmup = min(PretrainConfig.warmup_iters, max(1, iters // 10))
        pretrain_cfg = PretrainConfig.from_sr(cfg.sr, cfg.sr_train, iters=iters, warmup_iters=warmup)
        path = pretrain_generator(cfg.data, pretrain_cfg, split=cfg.train_split, evaluate_split=None,
                                  log=tqdm.write).path
    init_generator_from(model.generator, path, lr_size=cfg.sr.lr_size)


def truncate_metrics(path: Path, last_iter: int) -> None:
    """Drop log lines past the checkpoint we restart from, so a resumed log has no duplicates."""
    if not path.exists():
        return
    kept = [record for record in read_metrics_log(path) if record["iter"] <= last_iter]
    atomic_write_bytes(path, "".join(json.dumps(record) + "\n" for record in kept).encode())


def patch_psnr(sr: torch.Tensor, batch: dict, scale: int) -> dict:
    """G's and bicubic's PSNR against the real HR targets of this batch (for the health check)."""
    valid = batch["hr_valid"]
    if not valid.any():
        return {}
    hr = batch["hr_patch"][valid]
    bicubic = F.interpolate(batch["lr_patch"][valid], scale_factor=scale, mode="bicubic", align_corners=False)
    return {"g_psnr": psnr(sr[valid], hr).mean().item(), "bicubic_psnr": psnr(bicubic, hr).mean().item()}


def check_finite(terms: dict, where: str) -> None:
    """A NaN or inf loss stops training with the term's name; nothing is stepped or saved, so the
    last good checkpoint stays as it is."""
    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{where}: loss {', '.join(bad)} is not finite; training stopped, "
                                 "the last good checkpoint is kept")


def optimizer_step(optimizer, loss: torch.Tensor, lr: float, grad_clip: float, scaler=None,
                   world_size: int = 1) -> float:
    """Backward, average gradients over ranks, clip the global grad norm, step.

    Returns the norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:  # AMP on CUDA: unscale before averaging and clipping
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    if world_size > 1:
        average_gradients(params, world_size)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return norm.item()


class GanHealth:
    """Warns when the adversarial game has collapsed, judged over the last ``window`` iterations.

    Two symptoms: D's accuracy pinned at 1.0 on both real and fake patches (G gets no useful
    adversarial gradient), and G's PSNR below bicubic's for the whole window once past warm-up
    (G makes patches worse than a fixed interpolation).
    """

    def __init__(self, window: int = 50, warmup: int = 200):
        self.window, self.warmup = window, warmup
        self.d_pinned: list[bool] = []
        self.g_worse: list[bool] = []

    def update(self, it: int, record: dict) -> str | None:
        if "d_real_acc" in record:
            self.d_pinned = (self.d_pinned + [record["d_real_acc"] == 1.0 and record["d_fake_acc"] == 1.0])[-self.window:]
        if "g_psnr" in record and "bicubic_psnr" in record and math.isfinite(record["g_psnr"]):
            self.g_worse = (self.g_worse + [record["g_psnr"] < record["bicubic_psnr"]])[-self.window:]
        if it % self.window:
            return None
        problems = []
        if len(self.d_pinned) == self.window and all(self.d_pinned):
            problems.append(f"D's accuracy has been 1.0 on real and fake for {self.window} iterations "
                            "(G gets no adversarial signal; lower lr_discriminator or raise alpha)")
        if it > self.warmup and len(self.g_worse) == self.window and all(self.g_worse):
            problems.append(f"G's PSNR has stayed below bicubic for {self.window} iterations")
        return "; ".join(problems) or None


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and returns."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TrainingStopped(Exception):
    """A run stopped early by SIGINT/SIGTERM, after saving a checkpoint that --resume continues."""

    def __init__(self, message: str, signal_name: str | None):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(getattr(signal, self.signal_name or "SIGTERM"))


GRAD_NORM_EVERY = 25  # iterations between logs of each G term's gradient norm (a backward per term)


def term_grad_norms(terms: dict, sr: torch.Tensor, weights) -> dict:
    """The norm of each weighted term's gradient on G's output: which term drives G."""
    norms = {}
    for name in ("adv", "cls", "reg", "mse", "tv"):
        weight = getattr(weights, name)
        if weight and terms[name].requires_grad:
            (grad,) = torch.autograd.grad(weight * terms[name], sr, retain_graph=True, allow_unused=True)
            norms[f"g_gradnorm_{name}"] = 0.0 if grad is None else grad.norm().item()
    return norms


@dataclasses.dataclass
class SharedWork:
    """The work on one batch that the branches of a pass do alike, done by the first branch that
    needs it, and its time, which the pass splits between its branches.

    The branches share the data, the seed of their RoI sampling and the frozen detector (``check_branches``),
    so RoIs drawn alike give the same patches (``SRDetector.training_forward``) and the same read
    of the real ones by D built on that detector (``read_real_patches``). A result is reused only
    for the same key and equal input tensors: a branch that draws other RoIs does its own work.
    """
    done: dict = dataclasses.field(default_factory=dict)  # key -> (the input tensors, the result)
    seconds: float = 0.0

    def once(self, key, inputs: list[torch.Tensor], compute):
        """``compute()``, or its result for this key and equal inputs earlier in the batch."""
        if key in self.done:
            earlier, result = self.done[key]
            if len(earlier) == len(inputs) and all(torch.equal(a, b) for a, b in zip(earlier, inputs)):
                return result
        tic = time.perf_counter()
        result = compute()
        self.done[key] = (list(inputs), result)
        self.seconds += time.perf_counter() - tic
        return result


def read_real_patches(discriminator, hr_patch: torch.Tensor, shared: SharedWork | None) -> torch.Tensor:
    """D's ``read`` (its frozen part) of the real patches z_HR, once per batch for a pass's branches
    (``shared``). A branch whose real patches differ (another context or patch size) reads its own.
    """
    if shared is None:
        return discriminator.read(hr_patch)
    key = ("read", type(discriminator).__name__, getattr(discriminator, "context", None))
    return shared.once(key, [hr_patch], lambda: discriminator.read(hr_patch))


# What G's step reads of a RoI batch, taken at G's RoIs when D also judges RoIs G does not serve.
G_BATCH_KEYS = ("lr_patch", "hr_patch", "hr_valid", "labels", "regression_targets")


def sr_step(model, batch: dict, optimizers: dict, cfg: TrainConfig, it: int, world_size: int = 1,
            shared: SharedWork | None = None) -> dict:
    """One step of the reconstruction module on a sampled RoI batch, as BasicSR's SRGANModel.

    D first: real z_HR against G(z_LR) detached, plus D's class and box losses, in one pass of
    D's heads over both (D normalises per sample, so the joint batch equals two). Then G, through
    the updated D with D's parameters frozen: alpha L_adv + beta L_cls + gamma L_reg + L_TV + L_MSE.
    D's frozen part (``read``: the detector's backbone, for D built on the detector) reads G(z_LR)
    once for both steps, and z_HR once per batch of a pass (``read_real_patches``): the detector's
    backbone on the patches is most of a branch step's time. A D whose read trains (a tuned copy
    of the backbone) reads both for its own step and G(z_LR) again, updated, for G's. RoIs that G
    does not serve (``SRConfig.large_rois="native"``) reach D as their native cut: D's class and
    box terms see them, while G's objective and D's real/fake game play on G's RoIs alone.
    """
    weights, where = cfg.sr_train.weights, f"{cfg.out}, iteration {it + 1}"
    factor = lr_factor(cfg, it)
    # G serves the RoIs that fit the LR patch; D judges the others as cut at its own size (SRConfig.large_rois)
    generated = batch["generated"]
    g_batch = batch if bool(generated.all()) else {k: batch[k][generated] for k in G_BATCH_KEYS}
    sr_g = model.super_resolve(g_batch["lr_patch"])
    sr = model.in_roi_order(generated, sr_g, batch["native_patch"])
    n, discriminator = len(batch["hr_patch"]), model.discriminator
    if discriminator.read_trains:
        sr_read = None
        d_both = discriminator(torch.cat([batch["hr_patch"], sr.detach()]))
    else:
        hr_read, sr_read = read_real_patches(discriminator, batch["hr_patch"], shared), discriminator.read(sr)
        d_both = discriminator.judge(torch.cat([hr_read, sr_read.detach()]))
    d_hr, d_sr = ({k: v[:n] for k, v in d_both.items()}, {k: v[n:] for k, v in d_both.items()})
    d_terms = discriminator_objective(d_hr, d_sr, batch["labels"], batch["regression_targets"], batch["hr_valid"],
                                      weights, generated=generated)
    check_finite(d_terms, where)
    optimizer_step(optimizers["discriminator"], d_terms["total"], cfg.sr_train.lr_discriminator * factor,
                   cfg.grad_clip, world_size=world_size)
    record = {f"d_{k}": v.item() for k, v in d_terms.items()}
    model.update_box_errors(batch["head_deltas"], d_sr["box"], batch["labels"], batch["regression_targets"])
    record |= dict(zip(("head_box_error", "d_box_error"), model.box_errors.tolist()))
    # G steps when some rank's batch holds RoIs for it: every rank then steps, since they average
    # gradients, and when none does, none steps (Adam's moments would move G without a gradient).
    if "generator" in optimizers and any_rank(bool(generated.any()), world_size, generated.device):
        trainable = [p for p in discriminator.parameters() if p.requires_grad]
        discriminator.requires_grad_(False)
        try:
            if bool(generated.any()):
                judged = discriminator(sr) if sr_read is None else discriminator.judge(sr_read)
                if g_batch is not batch:
                    judged = {k: v[generated] for k, v in judged.items()}
                g_terms = generator_objective(judged, sr_g, g_batch["hr_patch"], g_batch["hr_valid"],
                                              g_batch["labels"], g_batch["regression_targets"], weights,
                                              mse_reduction=cfg.sr_train.mse_reduction)
                check_finite(g_terms, where)
                if it % GRAD_NORM_EVERY == 0:
                    record |= term_grad_norms(g_terms, sr_g, weights)
                g_loss = g_terms["total"]
            else:
                # zero gradients for the ranks' average, taken on G's weights: a backward through
                # G's empty batch fails in its pixel shuffle. Nothing of G is logged from this rank.
                g_terms, g_loss = {}, sum(p.sum() for p in model.generator.parameters()) * 0.0
            optimizer_step(optimizers["generator"], g_loss, cfg.sr_train.lr_generator * factor,
                           cfg.grad_clip, world_size=world_size)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        if g_terms:
            record |= {f"g_{k}": v.item() for k, v in g_terms.items()} | patch_psnr(sr_g.detach(), g_batch,
                                                                                   model.scale)
    return record | {"sr_rois": len(batch["labels"]), "sr_hr_valid": int(batch["hr_valid"].sum()),
                     "sr_generated": int(generated.sum())}


def train_step(model, images, targets, optimizers: dict, cfg: TrainConfig, it: int, amp_dtype, scaler,
               world_size: int = 1, proposed: tuple | None = None, shared: SharedWork | None = None) -> dict:
    """One iteration: the detector step (Faster R-CNN's RPN and box-head losses), then the SR
    branch's ``sr_step`` for SR methods. When branches of one pass share the frozen detector,
    ``proposed`` is its proposals for these images and ``shared`` the batch's work they share
    (``SharedWork``). Returns the log record."""
    device = images[0].device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if cfg.is_sr:
            hr_images = [t["hr_image"] for t in targets] if cfg.hr_twin_scale else None
            loss_dict, sr_batch = model.training_forward(images, targets, hr_images,
                                                         train_detector="detector" in optimizers, proposed=proposed,
                                                         shared=shared)
        else:
            loss_dict = model(images, targets)
    record = {"iter": it + 1}
    if "detector" in optimizers:
        check_finite(loss_dict, f"{cfg.out}, iteration {it + 1}")
        loss = sum(loss_dict.values())
        lr = cfg.lr * lr_factor(cfg, it)
        grad_norm = optimizer_step(optimizers["detector"], loss, lr, cfg.grad_clip, scaler, world_size)
        record |= {"loss": loss.item(), **{k: v.item() for k, v in loss_dict.items()}, "lr": lr,
                   "grad_norm": grad_norm}
    if cfg.is_sr:
        record |= sr_step(model, sr_batch, optimizers, cfg, it, world_size, shared)
    return record


def train(cfg: TrainConfig, resume: bool = False, force: bool = False, progress: bool = True,
          check_val: bool = True) -> Path:
    """Train cfg.method on cfg.data; returns the run directory (evaluate it with sodlab.runs.finish_run).

    Nothing is written before every input is checked: the data (and with ``check_val`` the val
    split the evaluation reads), the config, the run folder, the weights a run starts from.

    Under torchrun every rank runs this function: each trains on its shard of every global
    batch, gradients are averaged, and rank 0 alone writes the run directory. Raises
    TrainingStopped after checkpointing when a signal stops the run early.
    """
    return train_branches([cfg], resume, force, progress, check_val)[0]


def train_branches(cfgs: list[TrainConfig], resume: bool = False, force: bool = False, progress: bool = True,
                   check_val: bool = True) -> list[Path]:
    """Train several staged SR runs on one frozen detector in one pass (or one run, as ``train``).

    The SR branch never back-propagates into its frozen detector, so runs that differ only in
    their SR branch (``BRANCH_FIELDS``) can share each batch's loading and the detector's forward.
    Each branch is still a run directory of its own, bitwise the one ``train`` makes alone: its G
    and D are built and its RoIs drawn from its own generators, and the batches and flips, drawn
    once, are what each run would draw. A pass that stopped resumes every branch from its own
    checkpoint. Returns the run directories, in the order of ``cfgs``.
    """
    ddp = init_distributed()
    if len(cfgs) > 1:
        check_branches(cfgs, ddp.world_size)
    for cfg in cfgs:
        check_method(cfg)
    dataset = training_data(cfgs[0], check_val, ddp.is_main)
    with contextlib.ExitStack() as locks:
        if ddp.is_main:
            for cfg in cfgs:
                locks.enter_context(RunLock(cfg.out))
        return _train(cfgs, dataset, ddp, resume, force, progress)


# The fields in which runs trained in one pass may differ; they share the rest: the data, its
# order and flips, and the frozen detector they start from.
BRANCH_FIELDS = ("method", "out", "sr", "sr_train")


def check_branches(cfgs: list[TrainConfig], world_size: int) -> None:
    """Refuse configs that cannot share one pass, with the first field that keeps them apart."""
    if world_size > 1:
        raise ValueError("several SR runs train in one pass in one process only; under torchrun train each run alone")
    first = cfgs[0]
    outs = [Path(cfg.out).resolve() for cfg in cfgs]
    if len(set(outs)) < len(outs):
        raise ValueError(f"{first.out}: two runs of one pass write the same directory")
    for cfg in cfgs:
        if not (cfg.is_sr and cfg.sr_train.schedule == "staged" and cfg.init_from):
            raise ValueError(f"{cfg.out}: only staged SR runs on a finished detector (init_from) train in one pass "
                             f"with others; method {cfg.method} with the {cfg.sr_train.schedule} schedule trains alone")
        differ = [f.name for f in dataclasses.fields(TrainConfig)
                  if f.name not in BRANCH_FIELDS and getattr(cfg, f.name) != getattr(first, f.name)]
        if cfg.hr_twin_scale != first.hr_twin_scale:
            differ.append("the xk twins it reads (sr.scale, sr_train.hr_source)")
        if differ:
            raise ValueError(f"{cfg.out}: differs from {first.out} in {', '.join(differ)}; runs of one pass share "
                             "their data, its order and the frozen detector, so train it alone")


def check_method(cfg: TrainConfig) -> None:
    if cfg.is_sr and cfg.sr.patches != "generator":
        # An oracle or bypassed G at the run's own evaluation would stand for the method's result.
        raise ValueError(f"{cfg.out}: sr.patches={cfg.sr.patches!r} is an evaluation setting (`sodlab eval --run RUN "
                         f"--sr-patches {cfg.sr.patches}`); a run trains and is evaluated with G's patches")
    if cfg.method == "hr-oracle" and oracle_view(cfg.data, cfg.train_split) is None:
        # Trained on LR images this would be the baseline under another name.
        raise ValueError(f"{cfg.data}: --method hr-oracle trains on the HR oracle's view of exact xK twins, and this "
                         f"is not one (its instances_{cfg.train_split}.json has no info.hr_oracle); `sodlab train "
                         "--method hr-oracle --data DIR --oracle-scale K` builds it from DIR's {split}_xK/ twins")


def training_data(cfg: TrainConfig, check_val: bool, is_main: bool):
    """The training split as cfg's method reads it (with ``check_val`` the val split is read too,
    before hours of training, since the evaluation after needs it)."""
    dataset = load_split(cfg.data, cfg.train_split, train=True, scale=cfg.input_scale, hflip_prob=cfg.hflip_prob,
                         hr_scale=cfg.hr_twin_scale)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data}: the {cfg.train_split!r} split has no images to train on")
    if check_val:
        load_split(cfg.data, cfg.val_split, train=False, hr_scale=cfg.hr_twin_scale)
    if cfg.tile:
        dataset = TiledDataset(dataset, cfg.tile)
    elif is_main and (warning := resize_warning(cfg, dataset.ann_file)):
        tqdm.write(f"{cfg.out}: warning: {warning}")
    if cfg.crop:
        dataset = TiledDataset(dataset, cfg.crop, native_resolution=False)
    return dataset


@dataclasses.dataclass
class Branch:
    """One run of a training pass: its config, model, optimizers and where it starts."""
    cfg: TrainConfig
    model: torch.nn.Module
    optimizers: dict
    start_iter: int = 0
    rng: dict | None = None  # the global RNGs' state its next iteration draws from
    health: GanHealth = dataclasses.field(default_factory=GanHealth)

    @property
    def last_ckpt(self) -> Path:
        return Path(self.cfg.out) / "checkpoints" / "last.pt"


def build_branch(cfg: TrainConfig, num_classes: int, device, resume: bool, force: bool) -> Branch:
    """cfg's model and optimizers, from its seed, the weights it starts from and, resuming, its checkpoint."""
    check_run_dir(cfg, resume, force)
    last_ckpt = Path(cfg.out) / "checkpoints" / "last.pt"
    resuming = resume and last_ckpt.exists()  # a run stopped before its first checkpoint starts over
    seed_everything(cfg.seed)  # the same initial weights on every rank, and for every branch of a pass
    model = build_model(cfg, num_classes)
    if cfg.init_from:
        init_detector_from(cfg, model)
    if cfg.is_sr and cfg.sr_train.generator_init and model.generator is not None and not resuming:
        init_generator(cfg, model)
    model.to(device)
    optimizers = make_optimizers(cfg, model)
    branch = Branch(cfg, model, optimizers)
    if resuming:
        branch.start_iter = load_checkpoint(last_ckpt, model, optimizers, cfg)
    elif cfg.continue_from:
        branch.start_iter = continue_run(cfg, model, optimizers)
    branch.rng = rng_state()  # fresh from the seed, or the checkpoint's
    return branch


def _train(cfgs: list[TrainConfig], dataset, ddp, resume: bool, force: bool, progress: bool) -> list[Path]:
    """train_branches() once its inputs are read, under the runs' locks."""
    branches = [build_branch(cfg, dataset.num_classes, ddp.device, resume, force) for cfg in cfgs]
    cfg, device = cfgs[0], ddp.device
    behind = min(branches, key=lambda b: b.start_iter)
    start_iter = behind.start_iter
    set_rng_state(behind.rng)  # the flips, drawn once for all branches, go on from the one furthest behind
    # Every input has been checked (data, config, weights to start from): only now are the runs written.
    if ddp.is_main:
        for b in branches:
            prepare_run_dir(b.cfg, resume, force)
            truncate_metrics(Path(b.cfg.out) / "metrics.jsonl", b.start_iter)
    ddp.barrier()
    ddp.decorrelate(branches[0].model, cfg.seed, start_iter)
    # The batch order is a pure function of (seed, iteration); a private generator keeps the
    # loader's base-seed draw off the global RNG, so a resumed run sees the same random flips.
    sampler = batch_indices(len(dataset), cfg.batch_size, cfg.seed, start_iter, ddp.rank, ddp.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    for b in branches:
        b.model.train()
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # bf16 needs no scaling
    name = cfg.method if len(branches) == 1 else f"{len(branches)} SR branches"
    bar = tqdm(total=cfg.iters, initial=start_iter, desc=f"train {name}", disable=not (progress and ddp.is_main))
    it = start_iter
    # The bar is a context manager too: it is closed before an error message, not left half drawn.
    with contextlib.ExitStack() as stack, StopRequested() as stop, bar:
        logs = [stack.enter_context(open(Path(b.cfg.out) / "metrics.jsonl" if ddp.is_main else os.devnull, "a"))
                for b in branches]
        for images, targets in loader:
            if it >= cfg.iters:
                break
            tic = time.perf_counter()
            images = [img.to(device, non_blocking=True) for img in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            active = [(b, log) for b, log in zip(branches, logs) if it >= b.start_iter]
            proposed, shared = None, SharedWork()
            if len(branches) > 1:  # one frozen forward for every branch (a lone run proposes in its step)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    proposed = branches[0].model.propose(images)
            batch_sec, stepped = time.perf_counter() - tic, []
            for b, log in active:
                tic, shared_before = time.perf_counter(), shared.seconds
                record = train_step(b.model, images, targets, b.optimizers, b.cfg, it, amp_dtype, scaler,
                                    ddp.world_size, proposed, shared)
                stepped.append((b, log, record, time.perf_counter() - tic - (shared.seconds - shared_before)))
            # The batch's shared work (its transfer, the frozen detector's proposals, the patches and
            # D's reads of the real ones, whichever branch did them) is split evenly between the branches.
            shared_sec = (batch_sec + shared.seconds) / len(active)
            for b, log, record, own_sec in stepped:
                record["sec"] = own_sec + shared_sec
                record, stopping = ddp.end_step(b.model, record, stop.signal is not None)
                if b.cfg.is_sr and (warning := b.health.update(it + 1, record)):
                    record["warning"] = warning
                    if ddp.is_main:
                        tqdm.write(f"{b.cfg.out}, iteration {it + 1}: GAN health: {warning}")
                log.write(json.dumps(record) + "\n")
                log.flush()
            it += 1
            # Checkpoint before the next batch is drawn: the saved RNG state must be the one the
            # next iteration starts from (its flips and RoI sampling draw from it).
            if ddp.is_main and (it % cfg.ckpt_every == 0 or it == cfg.iters or stopping):
                for b, _ in active:
                    save_checkpoint(b.last_ckpt, b.model, b.optimizers, it, b.cfg, dataset.num_classes)
            for b, _ in active:  # kept for the runs that continue from here
                if ddp.is_main and it == b.cfg.keep_checkpoint_at:
                    save_checkpoint(kept_checkpoint(b.cfg.out, it), b.model, b.optimizers, it, b.cfg,
                                    dataset.num_classes)
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "d_total", "g_total") if k in record})
            if stopping:
                raise TrainingStopped(f"stopped by {stop.signal or 'a signal on another rank'}: saved "
                                      f"{', '.join(str(b.last_ckpt) for b, _ in active)} at iteration {it}; continue "
                                      "with --resume", stop.signal)
    if (digests := ddp.digests(branches[0].model)) and ddp.is_main:  # the ranks ended in step: equal digests
        atomic_write_json(Path(cfg.out) / "ddp.json", {"world_size": ddp.world_size, "parameter_digests": digests,
                                                       "identical": len(set(digests)) == 1})
    return [Path(b.cfg.out) for b in branches]


# Settings that change what inference does with the trained weights, not the weights themselves:
# an evaluation may override them (``sodlab eval --sr-fusion mean``) without retraining.
INFERENCE_SETTINGS = ("sr.fusion", "sr.sr_scope", "sr.area_threshold", "sr.large_rois", "sr.gate_top_k",
                      "sr.gate_rank", "sr.gate_share_iou", "sr.amp", "sr.patches", "detector.box_score_thresh")


def with_inference_settings(cfg: TrainConfig, settings: dict) -> TrainConfig:
    """``cfg`` with {"sr.fusion": "mean", ...} (keys from INFERENCE_SETTINGS) replaced."""
    unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
    if unknown:
        raise ValueError(f"not inference settings: {', '.join(unknown)}; choose from {', '.join(INFERENCE_SETTINGS)}")
    sr = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("sr.")}
    detector = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("detector.")}
    if sr and not cfg.is_sr:
        raise ValueError(f"{cfg.out}: method {cfg.method} has no SR branch, so "
                         f"{', '.join('sr.' + k for k in sr)} cannot apply; these settings are for SR methods")
    return dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, **sr),
                               detector=dataclasses.replace(cfg.detector, **detector))


def load_trained_model(run_dir: str | Path, device: str | torch.device = "cpu", inference: dict | None = None):
    """Rebuild a run's model from its config.json and load checkpoints/last.pt (eval mode).

    ``inference`` overrides settings of INFERENCE_SETTINGS for this model only; config.json is
    never rewritten. Returns (the config the model was built from, the model).
    """
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: the run has no checkpoint to evaluate")
    ckpt = load_checkpoint_file(ckpt_path, map_location=device, keys=("model", "num_classes"))
    saved = ckpt.get("config")
    if saved and saved.get("method") != cfg.method:  # same weights (baseline / upscale / hr-oracle), other inputs
        raise CheckpointMismatch(f"{ckpt_path}: trained as method {saved.get('method')}, but "
                                 f"{run_dir / 'config.json'} says {cfg.method}; restore config.json to the config "
                                 "the checkpoint was trained with")
    differences = _differences(saved or {}, cfg.to_dict())
    cfg = with_inference_settings(cfg, inference or {})
    model = build_model(cfg, ckpt["num_classes"])
    load_weights(model, ckpt["model"], ckpt_path, str(run_dir / "config.json"), differences,
                 "restore config.json to the config the checkpoint was trained with")
    # Inference runs channels-last, every method alike: the SR branch's D (the detector's backbone
    # on a batch of 32 px patches, whose coarsest maps are 1 x 1) runs markedly faster so on the
    # CPU, and the detector itself no slower. Training stays NCHW, where channels-last was not
    # faster (README: "Channels-last inference").
    return cfg, model.to(device, memory_format=torch.channels_last).eval()

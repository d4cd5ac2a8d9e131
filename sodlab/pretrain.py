"""PSNR-oriented pretraining of G on small RoIs, before any adversarial or task term reaches it.

The SR literature never starts a GAN from a random generator: SRGAN starts from an MSE-trained
SRResNet, ESRGAN from a PSNR-oriented model trained with L1, Real-ESRGAN trains ESRNet first. Here
G learns the pixel mapping alone, on (z_LR, z_HR) pairs of small RoIs, with no detector in the loop:

* Pairs are cut as inference cuts them. z_LR is ``lr_patches`` of the image (roi_align at lr_size,
  the patch SRDetector.score_proposals gives G) for every box, including boxes under 8 px, which
  have no real HR target in SRDetector's training batches. With ``hr_source="twin"`` z_HR is the
  same (context-expanded) box cut from the exact xk twin at hr_size = lr_size * scale; where the
  twin has fewer than hr_size pixels across the box, roi_align interpolates the twin, which still
  holds k x the image's detail, so even the smallest RoIs get a target sharper than their input.
  With ``hr_source="image"`` (no twins) it is SOD-MTGAN's protocol, as ``lr_hr_pairs`` implements
  it: z_HR is the RoI at hr_size from the image itself, only for RoIs with at least hr_size image
  pixels across, and z_LR = z_HR area-reduced by ``scale``.
* Boxes are ground truth and jittered ground truth of the train split whose side sqrt(w * h) lies
  in ``size_bins`` (every small size: sqrt of the ``box_area`` that SRDetector's area_threshold
  compares), kept stratified: up to ``pairs_per_bin`` per bin, and every batch draws the bins
  equally, so RoIs under 8 px are not outnumbered by the larger ones.
* The pairs and the trained G are cached under ~/.cache/sodlab/pretrain/ ($SODLAB_CACHE), keyed by a hash of
  the config and of the split's annotation file, so seeds and bench variants reuse them:

      pairs-<key>.pt       {"lr", "hr": uint8 patches, "side", "boxes", "image_ids", "record"}
      pairs-<key>.json     the record: config, dataset fingerprint, pairs per bin, seconds
      generator-<key>.pt   {"state_dict", "arch": SRGenerator kwargs, "record"} (load_generator)
      generator-<key>.json the record: config, dataset, pairs, cost (wall and CPU seconds,
                           iterations), loss curve, machine, evaluation

  Every file is written atomically (sodlab.io). Patches are stored rounded to 8 bits (at most half a
  grey level from the float cut, below the image's own quantisation) to keep the cache a quarter of
  float32's size.

``evaluate_generator`` measures G against bicubic (PSNR and SSIM, sodlab.sr_quality) on the val
split's small ground-truth boxes by size bin <8, 8-16, 16-32 px, with the same pair protocol.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sodlab.data.coco import coco_paths, load_split, twin_source
from sodlab.io import atomic_torch_save, atomic_write_json
from sodlab.models.generator import SRGenerator
from sodlab.patches import DEFAULT_CONTEXT, Images, box_side, extract_patches, lr_hr_pairs, lr_patches
from sodlab.sr_quality import SIZE_BINS, psnr, ssim

PRETRAIN_VERSION = 1  # bump when pairs or training change meaning, so old cache entries miss
# the SR quality report's bins of box side, px, as edges; half-open [lo, hi)
EVAL_BIN_EDGES = (SIZE_BINS[0][1],) + tuple(high for _, _, high in SIZE_BINS)


@dataclass(frozen=True)
class PretrainConfig:
    # patches: the same meaning as SRConfig's fields of the same name, so a pretrained G fits the
    # SR branch it starts
    lr_size: int = 16
    scale: int = 4
    context: float = DEFAULT_CONTEXT
    hr_source: str = "twin"  # twin: exact xk twins (DIR/{split}_x{hr_scale}) | image: SOD-MTGAN's protocol
    hr_scale: int = 4  # k of the twins; independent of ``scale`` (an x4 twin serves a x2 G too)
    # which boxes: side sqrt(w * h) bin edges in px (from_sr: every small size, up to 32 px or the
    # SR scope). Ignored with hr_source="image", whose RoIs must be large.
    size_bins: tuple[float, ...] = EVAL_BIN_EDGES
    pairs_per_bin: int = 3000  # with 8 flips/transposes this outlasts iters * batch_size draws
    jitter: float = 0.15  # relative shift and log-scale of jittered ground truth, as SRConfig.gt_jitter
    jitters_per_gt: int = 2
    # G: SRGenerator's arguments (SRConfig.generator_channels / _blocks / _upsample_channels)
    channels: int = 32
    blocks: int = 4
    upsample_channels: int = 0
    # optimisation. L1, as ESRGAN's and Real-ESRGAN's PSNR stage: it converges to the median rather
    # than the mean of the plausible HR patches, so edges stay sharper, and EDSR measured higher
    # PSNR with L1 than with L2 training. "mse" is the paper's L_MSE, for comparison.
    loss: str = "l1"
    iters: int = 1000
    batch_size: int = 16  # ESRGAN's batch; every batch holds every size bin equally
    lr: float = 2e-4  # ESRGAN's PSNR stage: Adam, lr 2e-4, betas (0.9, 0.99)
    warmup_iters: int = 50  # linear warm-up from 0.1 % of lr, then cosine decay to 0
    # random flips and transposes: exact for roi_align pairs (a flipped pair is the flipped box's pair)
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.hr_source not in ("twin", "image"):
            raise ValueError(f"PretrainConfig.hr_source must be 'twin' or 'image', got {self.hr_source!r}")
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"PretrainConfig.loss must be 'l1' or 'mse', got {self.loss!r}")
        edges = tuple(float(e) for e in self.size_bins)
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
            raise ValueError(f"PretrainConfig.size_bins must be increasing edges >= 0, got {self.size_bins!r}")
        object.__setattr__(self, "size_bins", edges)  # json round trips give lists
        if self.warmup_iters >= self.iters:
            raise ValueError(f"PretrainConfig: warmup_iters ({self.warmup_iters}) must be below iters ({self.iters})")

    @classmethod
    def from_sr(cls, sr, sr_train, **overrides) -> "PretrainConfig":
        """The pretraining that fits an SR branch's config (SRConfig, SRTrainConfig): its patches,
        its G, its HR source, its pretraining rate, and every small size (COCO's 32 px, or the SR
        scope where wider).

        The bins reach 32 px even when the SR scope stops at 16: G is judged on all of COCO's small
        RoIs (``evaluate_generator``), and a scope swept up to 32^2 on the trained run must not send
        RoIs through a G that never saw their size (README: "G pretrained on every small size")."""
        upper = max(math.sqrt(sr.area_threshold), EVAL_BIN_EDGES[-1])
        values = {"lr_size": sr.lr_size, "scale": sr.scale, "context": sr.context, "hr_source": sr_train.hr_source,
                  "hr_scale": sr.scale,  # sodlab.train reads x{scale} twins
                  "size_bins": tuple(e for e in EVAL_BIN_EDGES if e < upper) + (upper,),
                  "jitter": sr_train.gt_jitter, "jitters_per_gt": sr_train.jitters_per_gt, "lr": sr_train.pretrain_lr,
                  "channels": sr.generator_channels, "blocks": sr.generator_blocks,
                  "upsample_channels": sr.generator_upsample_channels}
        return cls(**{**values, **overrides})

    @property
    def hr_size(self) -> int:
        return self.lr_size * self.scale

    def pair_fields(self) -> dict:
        """The fields that decide the pairs (the pairs' cache key); the rest only decide training."""
        names = ("lr_size", "scale", "context", "hr_source", "hr_scale", "size_bins", "pairs_per_bin",
                 "jitter", "jitters_per_gt", "seed")
        return {name: getattr(self, name) for name in names}


# -- pairs ---------------------------------------------------------------------------------------


def size_bin(side: Tensor, edges: Sequence[float]) -> Tensor:
    """Bin index of each side in the half-open bins [edges[i], edges[i + 1]); -1 outside them."""
    index = torch.bucketize(side, torch.tensor(edges, dtype=side.dtype), right=True) - 1
    return torch.where((index >= 0) & (index < len(edges) - 1), index, torch.full_like(index, -1))


def bin_labels(edges: Sequence[float]) -> list[str]:
    """"<8", "8-16", "16-32" for the edges (0, 8, 16, 32)."""
    return [f"<{hi:g}" if lo == 0 else f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])]


def cut_pairs(
    images: Images,
    boxes: Sequence[Tensor],
    lr_size: int,
    scale: int,
    context: float = DEFAULT_CONTEXT,
    hr_images: Images | None = None,
    hr_scale: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(z_LR, z_HR) for every box, z_LR cut exactly as inference cuts it.

    With ``hr_images`` (exact xk twins, k = ``hr_scale``): z_LR = ``lr_patches`` of the image and
    z_HR = the same expanded box in the twin at lr_size * scale. Without: SOD-MTGAN's protocol
    (``lr_hr_pairs`` with small_lr="pooled": z_HR from the image, z_LR = z_HR area-reduced); only
    boxes with at least hr_size image pixels across have a real target there, see ``_image_boxes``.
    """
    if hr_images is None:
        lr, hr, _ = lr_hr_pairs(images, boxes, lr_size, scale, context, small_lr="pooled")
        return lr, hr
    if hr_scale is None:
        raise ValueError("cut_pairs: hr_scale (k of the twins) is required with hr_images")
    lr = lr_patches(images, boxes, lr_size, context)
    # box * k in the twin's pixels, expanded by the same relative context: the very region of z_LR.
    hr = extract_patches(hr_images, [b * hr_scale for b in boxes], lr_size * scale, context)
    return lr, hr


def _jitter(boxes: Tensor, copies: int, amount: float, g: torch.Generator) -> Tensor:
    """``copies`` shifted and rescaled versions of each box, as SRDetector jitters ground truth."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(copies, 1)
    centre = (boxes[:, 2:] + boxes[:, :2]).repeat(copies, 1) / 2
    centre = centre + (torch.rand(centre.shape, generator=g) * 2 - 1) * amount * wh
    wh = wh * torch.exp((torch.rand(wh.shape, generator=g) * 2 - 1) * amount)
    return torch.cat([centre - wh / 2, centre + wh / 2], dim=1)


def _candidate_boxes(gt: Tensor, cfg: PretrainConfig, g: torch.Generator) -> Tensor:
    """Ground truth and its jittered copies, at least a pixel wide and high."""
    boxes = torch.cat([gt, _jitter(gt, cfg.jitters_per_gt, cfg.jitter, g)]) if len(gt) else gt
    return boxes[((boxes[:, 2:] - boxes[:, :2]) >= 1).all(dim=1)]


def _image_boxes(boxes: Tensor, cfg: PretrainConfig) -> Tensor:
    """hr_source="image": the boxes whose expanded box has hr_size image pixels across (a real target)."""
    wh = (boxes[:, 2:] - boxes[:, :2]) * (1 + 2 * cfg.context)
    return boxes[wh.min(dim=1).values >= cfg.hr_size - 1e-4]


def dataset_fingerprint(data_dir: str | Path, split: str, cfg: PretrainConfig) -> dict:
    """What identifies the data a cache entry was made from: the split's annotation file (which
    changes whenever the benchmark is generated with another seed or size) and the twins used."""
    _, ann_file = coco_paths(data_dir, split)
    twins = cfg.hr_source == "twin"
    return {"split": split, "annotations_sha256": hashlib.sha256(ann_file.read_bytes()).hexdigest(),
            "twins": f"{split}_x{cfg.hr_scale}" if twins else None}


def cache_key(*parts: dict) -> str:
    blob = json.dumps([PRETRAIN_VERSION, *parts], sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_pairs(data_dir: str | Path, cfg: PretrainConfig, split: str = "train",
               log: Callable[[str], None] | None = None) -> dict:
    """Cut the stratified pair set of a split (uncached; ``pretrain_generator`` caches it).

    Returns {"lr": uint8 [N, 3, lr, lr], "hr": uint8 [N, 3, hr, hr], "side": float [N] (box side),
    "boxes": [N, 4] xyxy, "image_ids": [N] (where each pair was cut), "record"}.
    """
    data_dir = Path(data_dir)
    twins = cfg.hr_source == "twin"
    if twins and twin_source(data_dir, split, cfg.hr_scale) is None:
        raise FileNotFoundError(f"{data_dir / f'{split}_x{cfg.hr_scale}'}: no x{cfg.hr_scale} twins (nor twins of a "
                                f"multiple of {cfg.hr_scale}) for "
                                f"hr_source='twin'; write them with `sodlab synth --hr-scale {cfg.hr_scale}` "
                                "or use hr_source='image'")
    tic, cpu_tic = time.perf_counter(), time.process_time()
    dataset = load_split(data_dir, split, train=False, hr_scale=cfg.hr_scale if twins else None)
    g = torch.Generator().manual_seed(cfg.seed)
    edges = cfg.size_bins if twins else (0.0, math.inf)

    # First every candidate box of the split (cheap: annotations only), then a stratified choice,
    # then the images of the chosen boxes only.
    per_image, bins = [], []
    for image_id in dataset.ids:
        boxes = _candidate_boxes(dataset.boxes(image_id), cfg, g)
        boxes = boxes[size_bin(box_side(boxes), edges) >= 0] if twins else _image_boxes(boxes, cfg)
        per_image.append(boxes)
        bins.append(size_bin(box_side(boxes), edges))
    owner = torch.cat([torch.full((len(b),), i) for i, b in enumerate(per_image)]) if per_image else torch.zeros(0)
    all_bins = torch.cat(bins) if bins else torch.zeros(0, dtype=torch.long)
    chosen = torch.zeros(len(all_bins), dtype=torch.bool)
    for b in range(len(edges) - 1):
        members = torch.where(all_bins == b)[0]
        chosen[members[torch.randperm(len(members), generator=g)[:cfg.pairs_per_bin]]] = True
    if not chosen.any():
        raise ValueError(f"{data_dir}: no box of the {split!r} split fits the pretraining config "
                         f"(size_bins {cfg.size_bins}, hr_source {cfg.hr_source!r})")

    lr_all, hr_all, box_all, id_all = [], [], [], []
    offsets = torch.cumsum(torch.tensor([0] + [len(b) for b in per_image]), 0)
    for index in torch.unique(owner[chosen]).tolist():
        keep = chosen[offsets[index]:offsets[index + 1]]
        boxes = per_image[index][keep]
        image, target = dataset[index]
        image = image.as_subclass(Tensor)
        twin = [target["hr_image"].as_subclass(Tensor)] if twins else None
        lr, hr = cut_pairs([image], [boxes], cfg.lr_size, cfg.scale, cfg.context, twin, cfg.hr_scale if twins else None)
        lr_all.append(_to_uint8(lr))
        hr_all.append(_to_uint8(hr))
        box_all.append(boxes)
        id_all.append(torch.full((len(boxes),), dataset.ids[index]))
    boxes = torch.cat(box_all)
    side = box_side(boxes)
    counts = torch.bincount(size_bin(side, edges), minlength=len(edges) - 1).tolist()
    record = {"config": cfg.pair_fields(), "pairs": len(side),
              "pairs_per_bin": dict(zip(bin_labels(edges) if twins else ["all"], counts)),
              "seconds": round(time.perf_counter() - tic, 2), "cpu_seconds": round(time.process_time() - cpu_tic, 2)}
    if log:
        log(f"pretrain: cut {len(side)} pairs from {split} in {record['seconds']} s ({record['pairs_per_bin']})")
    return {"lr": torch.cat(lr_all), "hr": torch.cat(hr_all), "side": side, "boxes": boxes,
            "image_ids": torch.cat(id_all), "record": record}


def _to_uint8(patches: Tensor) -> Tensor:
    return (patches.clamp(0, 1) * 255).round().to(torch.uint8)


# -- training ------------------------------------------------------------------------------------


def _dihedral(x: Tensor, op: int) -> Tensor:
    """One of the 8 flips/transposes of the square patch's pixel grid (op in 0..7)."""
    if op & 4:
        x = x.transpose(-1, -2)
    if op & 2:
        x = x.flip(-2)
    if op & 1:
        x = x.flip(-1)
    return x


def _augment(lr: Tensor, hr: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    ops = torch.randint(0, 8, (len(lr),), generator=g)
    lr, hr = lr.clone(), hr.clone()
    for op in range(1, 8):
        rows = ops == op
        if rows.any():
            lr[rows], hr[rows] = _dihedral(lr[rows], op), _dihedral(hr[rows], op)
    return lr, hr


def _stratified_batch(members: list[Tensor], batch_size: int, g: torch.Generator) -> Tensor:
    """batch_size indices drawn equally from each bin's ``members`` (the remainder from random bins)."""
    counts = [batch_size // len(members)] * len(members)
    for b in torch.randperm(len(members), generator=g)[: batch_size % len(members)].tolist():
        counts[b] += 1
    return torch.cat([m[torch.randint(len(m), (n,), generator=g)] for m, n in zip(members, counts)])


def build_generator(cfg: PretrainConfig) -> SRGenerator:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG stream untouched
        torch.manual_seed(cfg.seed)
        return SRGenerator(cfg.channels, cfg.blocks, cfg.scale, upsample_channels=cfg.upsample_channels)


def train_generator(pairs: dict, cfg: PretrainConfig, generator: SRGenerator | None = None,
                    log: Callable[[str], None] | None = None, log_every: int = 100) -> tuple[SRGenerator, dict]:
    """Pixel-loss training of G on a pair set; returns G and a record of the loss and the cost."""
    generator = generator if generator is not None else build_generator(cfg)
    generator.train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=cfg.warmup_iters),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iters - cfg.warmup_iters),
    ], milestones=[cfg.warmup_iters])
    loss_fn = F.l1_loss if cfg.loss == "l1" else F.mse_loss
    g = torch.Generator().manual_seed(cfg.seed + 1)
    edges = cfg.size_bins if cfg.hr_source == "twin" else (0.0, math.inf)
    bins = size_bin(pairs["side"], edges)
    members = [m for m in (torch.where(bins == b)[0] for b in range(len(edges) - 1)) if len(m)]
    curve, window = [], []
    tic, cpu_tic = time.perf_counter(), time.process_time()
    for it in range(cfg.iters):
        index = _stratified_batch(members, cfg.batch_size, g)
        lr, hr = pairs["lr"][index].float() / 255, pairs["hr"][index].float() / 255
        if cfg.augment:
            lr, hr = _augment(lr, hr, g)
        loss = loss_fn(generator(lr), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: non-finite {cfg.loss} loss at iteration {it}")
        window.append(loss.item())
        if (it + 1) % log_every == 0 or it + 1 == cfg.iters:
            curve.append({"iter": it + 1, "loss": sum(window) / len(window)})
            window = []
            if log:
                log(f"pretrain: iter {it + 1}/{cfg.iters} {cfg.loss} {curve[-1]['loss']:.5f}")
    generator.eval()
    # Wall and process CPU seconds: on a shared machine the second is the cost, the first the wait.
    return generator, {"iterations": cfg.iters, "seconds": round(time.perf_counter() - tic, 2),
                       "cpu_seconds": round(time.process_time() - cpu_tic, 2), "loss_curve": curve}


# -- the cached entry point ----------------------------------------------------------------------


def default_cache_dir(data_dir: str | Path) -> Path:
    """$SODLAB_CACHE/pretrain (default ~/.cache/sodlab/pretrain): never inside the user's data
    folder; the key carries the dataset's fingerprint, so one cache serves every dataset."""
    import os

    root = os.environ.get("SODLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sodlab"
    return Path(root) / "pretrain"


def _machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__)}


@dataclass
class PretrainResult:
    generator: SRGenerator
    path: Path  # generator-<key>.pt: what SRConfig.generator_init names
    record: dict  # config, dataset, cost (seconds, iterations), loss curve, evaluation
    trained: bool  # False when the cache answered


def pretrain_generator(
    data_dir: str | Path,
    cfg: PretrainConfig = PretrainConfig(),
    cache_dir: str | Path | None = None,
    split: str = "train",
    evaluate_split: str | None = "val",
    log: Callable[[str], None] | None = print,
) -> PretrainResult:
    """The pretrained G for (data, cfg): from the cache, or cut the pairs, train, evaluate, cache.

    ``cache_dir`` defaults to ``default_cache_dir``. ``evaluate_split`` (skipped when None or
    absent from the data) adds ``evaluate_generator``'s table to the record.
    """
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    dataset = dataset_fingerprint(data_dir, split, cfg)
    g_path = cache_dir / f"generator-{cache_key(dataclasses.asdict(cfg), dataset)}.pt"
    if g_path.exists():
        generator, record = load_generator(g_path, with_record=True)
        if log:
            log(f"pretrain: reusing {g_path} (trained in {record['train']['seconds']} s, "
                f"{record['train']['iterations']} iterations)")
        return PretrainResult(generator, g_path, record, trained=False)

    pairs_path = cache_dir / f"pairs-{cache_key(cfg.pair_fields(), dataset)}.pt"
    if pairs_path.exists():
        pairs = torch.load(pairs_path, weights_only=True)
    else:
        pairs = make_pairs(data_dir, cfg, split, log)
        atomic_torch_save(pairs, pairs_path)
        atomic_write_json(pairs_path.with_suffix(".json"), {**pairs["record"], "dataset": dataset})
    generator, train_record = train_generator(pairs, cfg, log=log)
    record = {"config": dataclasses.asdict(cfg), "dataset": dataset, "pairs": pairs["record"],
              "train": train_record, "machine": _machine()}
    if evaluate_split and (data_dir / "annotations" / f"instances_{evaluate_split}.json").exists():
        record["evaluation"] = evaluate_generator(generator, data_dir, cfg, evaluate_split)
    atomic_torch_save({"state_dict": generator.state_dict(), "arch": generator.arch, "record": record}, g_path)
    atomic_write_json(g_path.with_suffix(".json"), record)
    if log:
        log(f"pretrain: trained G in {train_record['seconds']} s ({cfg.iters} iterations); cached at {g_path}")
    return PretrainResult(generator, g_path, record, trained=True)


def load_generator(path: str | Path, with_record: bool = False):
    """The SRGenerator stored by ``pretrain_generator`` (weights_only load), optionally with its record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pretrained generator file")
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or "state_dict" not in state or "arch" not in state:
        raise ValueError(f"{path}: not a pretrained generator file (needs 'state_dict' and 'arch')")
    # Built off the global RNG, whose draws the stored weights replace anyway: an SR run then
    # draws the same random stream whether its G was pretrained just now or read from the cache.
    with torch.random.fork_rng(devices=[]):
        generator = SRGenerator(**state["arch"])
    generator.load_state_dict(state["state_dict"])
    generator.eval()
    return (generator, state.get("record", {})) if with_record else generator


def init_generator_from(generator: SRGenerator, path: str | Path, lr_size: int | None = None) -> dict:
    """Load a pretrained G (``pretrain_generator``'s file) into ``generator``; returns its record.

    The hook for an SR run whose config names a pretrained G: the architectures must agree, and
    so must the LR patch size when ``lr_size`` is given (G is fully convolutional and would run
    on any size, but it learnt the statistics of one).
    """
    pretrained, record = load_generator(path, with_record=True)
    trained_lr_size = record.get("config", {}).get("lr_size")
    if lr_size is not None and trained_lr_size not in (None, lr_size):
        raise ValueError(f"{path}: G was pretrained on {trained_lr_size} px LR patches, "
                         f"the SR branch cuts {lr_size} px")
    if generator.arch != pretrained.arch:
        raise ValueError(f"{path}: pretrained G is {pretrained.arch}, but the SR branch's G is {generator.arch}")
    generator.load_state_dict(pretrained.state_dict())
    return record


# -- evaluation ----------------------------------------------------------------------------------


def _area_resize(x: Tensor, size: int) -> Tensor:
    """Resize square patches to ``size`` (area average when shrinking, bicubic when growing)."""
    if x.shape[-1] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bicubic"
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def _paired_summary(a: Tensor, b: Tensor) -> dict:
    """Mean of a - b over finite pairs and its 95 % normal interval half-width."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    d = (a - b)[ok]
    half = 1.96 * d.std().item() / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": d.mean().item() if len(d) else math.nan, "ci95": half}


def _finite_mean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.mean().item() if len(x) else math.nan


@torch.no_grad()
def evaluate_generator(
    generator: SRGenerator | None,
    data_dir: str | Path,
    cfg: PretrainConfig,
    split: str = "val",
    edges: Sequence[float] = EVAL_BIN_EDGES,
    max_rois_per_bin: int | None = None,
    reference_size: int | None = None,
) -> dict:
    """PSNR and SSIM of G(z_LR) and of bicubic(z_LR) against z_HR on the split's ground-truth boxes,
    by box-side bin; G - bicubic with a 95 % interval of the paired per-patch difference.

    Twins of the split are used when present (the only way to judge RoIs under hr_size / k px);
    otherwise SOD-MTGAN's image protocol on the boxes large enough for it (one bin, "image").
    ``reference_size``: also score both against the twin cut at that size (SR resized to it), so
    configs with different lr_size / scale compare on one target. ``generator=None`` scores
    bicubic alone.
    """
    data_dir = Path(data_dir)
    twins = twin_source(data_dir, split, cfg.hr_scale) is not None
    dataset = load_split(data_dir, split, train=False, hr_scale=cfg.hr_scale if twins else None)
    if not twins:
        edges, labels = (0.0, math.inf), ["image"]
    else:
        labels = bin_labels(edges)
    lr_all, hr_all, ref_all, side_all = [], [], [], []
    for index, image_id in enumerate(dataset.ids):
        boxes = dataset.boxes(image_id)
        boxes = boxes[((boxes[:, 2:] - boxes[:, :2]) >= 1).all(dim=1)]
        boxes = boxes[size_bin(box_side(boxes), edges) >= 0] if twins else _image_boxes(boxes, cfg)
        if not len(boxes):
            continue
        image, target = dataset[index]
        twin = [target["hr_image"].as_subclass(Tensor)] if twins else None
        lr, hr = cut_pairs([image.as_subclass(Tensor)], [boxes], cfg.lr_size, cfg.scale, cfg.context, twin,
                           cfg.hr_scale if twins else None)
        lr_all.append(lr)
        hr_all.append(hr)
        side_all.append(box_side(boxes))
        if reference_size and twins:
            ref_all.append(extract_patches(twin, [boxes * cfg.hr_scale], reference_size, cfg.context))
    if not lr_all:
        return {"rois": 0, "note": f"no ground-truth box of {split!r} fits the evaluation"}
    lr, hr, side = torch.cat(lr_all), torch.cat(hr_all), torch.cat(side_all)
    ref = torch.cat(ref_all) if ref_all else None
    bins = size_bin(side, edges)
    if max_rois_per_bin is not None:
        keep = torch.cat([torch.where(bins == b)[0][:max_rois_per_bin] for b in range(len(labels))])
        lr, hr, bins = lr[keep], hr[keep], bins[keep]
        ref = ref[keep] if ref is not None else None
    bicubic = F.interpolate(lr, scale_factor=cfg.scale, mode="bicubic", align_corners=False)
    if generator is not None:
        generator.eval()
        sr = torch.cat([generator(chunk) for chunk in lr.split(256)])
    out = {"split": split, "hr_source": "twin" if twins else "image", "rois": len(lr), "bins": {}}
    for b, label in enumerate(labels):
        rows = bins == b
        if not rows.any():
            continue
        entry = {"rois": int(rows.sum())}
        scored = {"bicubic": bicubic[rows]} | ({"G": sr[rows]} if generator is not None else {})
        per_patch = {name: (psnr(x, hr[rows]), ssim(x, hr[rows])) for name, x in scored.items()}
        for name, (p, s) in per_patch.items():
            entry[name] = {"psnr": _finite_mean(p), "ssim": _finite_mean(s)}
        if generator is not None:
            entry["G-bicubic"] = {"psnr": _paired_summary(per_patch["G"][0], per_patch["bicubic"][0]),
                                  "ssim": _paired_summary(per_patch["G"][1], per_patch["bicubic"][1])}
        if ref is not None:
            entry["reference"] = {"size": reference_size}
            for name, x in scored.items():
                entry["reference"][name] = {"psnr": _finite_mean(psnr(_area_resize(x, reference_size), ref[rows]))}
        out["bins"][label] = entry
    return out


@torch.no_grad()
def generator_cost_ms(generator: SRGenerator, lr_size: int, batch_sizes: Sequence[int] = (1, 16),
                      repeats: int = 10, dtype: torch.dtype | None = None) -> dict:
    """Forward time of G per patch in ms (median of ``repeats``) at each batch size, in the
    current thread setting; ``dtype`` runs it under CPU autocast (e.g. torch.bfloat16)."""
    generator.eval()
    out = {}
    for batch in batch_sizes:
        x = torch.rand(batch, 3, lr_size, lr_size)
        times = []
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            generator(x)  # warm-up: first-call allocations and kernel selection
            for _ in range(repeats):
                tic = time.perf_counter()
                generator(x)
                times.append(time.perf_counter() - tic)
        out[str(batch)] = sorted(times)[len(times) // 2] / batch * 1e3
    return out

"""sodlab synth | convert | check | train | eval | bench | explore | demo: the command-line entry point.

Every field of TrainConfig is a flag, nested ones included: ``--detector-min-size``,
``--sr-fusion``, ``--sr-lr-generator``, ``--sr-weights-adv``. A flag left out keeps the preset's
(or, with --resume, the saved run's) value: only flags given explicitly change a config. Heavy
modules (torch, FiftyOne) are imported inside the commands, so --help and argument errors are
instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from sodlab.config import (CHOICES, PRESETS, SR_METHODS, DetectorConfig, GANLossWeights, SRConfig, SRTrainConfig,
                           TrainConfig)
from sodlab.recipes import DEFAULT_BUDGET

DEFAULT_DATA = "data/synth"
# Where each nested config's flags live: (TrainConfig field, flag prefix, the dataclass).
NESTED = (("detector", "detector-", DetectorConfig), ("sr", "sr-", SRConfig), ("sr_train", "sr-", SRTrainConfig),
          ("sr_train.weights", "sr-weights-", GANLossWeights))
CONFIG_DEST = "config:"  # argparse dests of config flags: "config:detector.min_size"
INFERENCE_DEST = "inference:"  # sodlab eval's overrides: "inference:sr.fusion"
ORACLE_SCALE = DEFAULT_BUDGET.oracle_scale  # the HR oracle's default twins, as the bench's


def _anchor_sizes(text: str) -> tuple[tuple[int, ...], ...]:
    """'8,11 16,23 32,45 64,91 128,181': the sizes of each level, levels separated by spaces."""
    try:
        return tuple(tuple(int(v) for v in level.split(",")) for level in text.split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"anchor sizes must be like '8,11 16,23 ...' (ints), got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_config_flags(parser, cls, path: str, prefix: str) -> None:
    """One flag per field of ``cls`` (nested dataclasses get their own groups), default suppressed."""
    for f in dataclasses.fields(cls):
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested) or (not path and f.name == "preset"):
            continue  # nested configs: their own group (NESTED); --preset: added with its choices
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = CONFIG_DEST + (f"{path}.{f.name}" if path else f.name)
        shown = "the preset's" if path == "detector" else repr(default)
        kwargs = dict(dest=dest, default=argparse.SUPPRESS)
        metavar = None if isinstance(default, bool) or CHOICES.get(f.name) else f.name.upper()
        choices = CHOICES.get("sr_schedule" if (path, f.name) == ("sr_train", "schedule") else f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default: {shown})", **kwargs)
        elif f.name == "anchor_sizes":
            parser.add_argument(flag, type=_anchor_sizes, metavar=metavar, help=f"per FPN level, e.g. '8,11 16,23 32,45 64,91 "
                                "128,181' (default: the preset's)", **kwargs)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=_floats, metavar=metavar, help=f"comma-separated (default: {shown})", **kwargs)
        elif choices:
            parser.add_argument(flag, choices=choices, help=f"one of {', '.join(choices)} (default: {shown})", **kwargs)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, metavar=metavar,
                                help=f"(default: {shown})", **kwargs)


def add_train_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every knob of TrainConfig, nested configs included (see the module docstring)."""
    parser.add_argument("--preset", dest=CONFIG_DEST + "preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="the detector preset the --detector-* flags change (default: 'cpu')")
    _add_config_flags(parser, TrainConfig, "", "")
    for path, prefix, cls in NESTED:
        group = parser.add_argument_group(f"{path} ({cls.__name__}" + (", SR methods only)" if "sr" in path else ")"))
        _add_config_flags(group, cls, path, prefix)


def given_config_values(args) -> dict[str, object]:
    """{"detector.min_size": 128, "iters": 5, ...}: the config flags given on the command line."""
    return {k[len(CONFIG_DEST):]: v for k, v in vars(args).items() if k.startswith(CONFIG_DEST)}


def apply_config_values(base: TrainConfig, values: dict[str, object]) -> TrainConfig:
    """``base`` with the given (dotted) field values, through dataclasses.replace at each level."""
    from sodlab.config import preset

    values = dict(values)
    detector = base.detector
    if "preset" in values:
        detector = preset(values["preset"])
    nested = {}
    for path in ("detector", "sr", "sr_train", "sr_train.weights"):
        nested[path] = {k.rsplit(".", 1)[1]: values.pop(k) for k in list(values)
                        if k.startswith(path + ".") and k.count(".") == path.count(".") + 1}
    weights = dataclasses.replace(base.sr_train.weights, **nested["sr_train.weights"])
    return dataclasses.replace(base, **values, detector=dataclasses.replace(detector, **nested["detector"]),
                               sr=dataclasses.replace(base.sr, **nested["sr"]),
                               sr_train=dataclasses.replace(base.sr_train, weights=weights, **nested["sr_train"]))


def config_from_args(args) -> TrainConfig:
    """The run's config: the saved one with --resume (plus the flags given), else the preset's."""
    from sodlab.io import read_json

    values = given_config_values(args)
    method = values.get("method", None if getattr(args, "resume", False) else TrainConfig.method)
    sr_flags = sorted(k for k in values if k.startswith(("sr.", "sr_train.")))
    if sr_flags and method is not None and method not in SR_METHODS:
        flags = ", ".join("--sr-" + k.rsplit(".", 1)[1].replace("_", "-") for k in sr_flags)
        raise ValueError(f"{flags}: SR settings, which --method {method} would ignore; drop them or choose an SR "
                         "method")
    if values.get("tile"):  # tiles are seen at native resolution: the detector does not resize them
        values.setdefault("detector.min_size", values["tile"])
        values.setdefault("detector.max_size", values["tile"])
    if getattr(args, "resume", False):
        out = Path(values.get("out", TrainConfig.out))
        config_path = out / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: nothing to resume (no config.json); pass the run's --out")
        return apply_config_values(TrainConfig.from_dict(read_json(config_path)), values)
    return apply_config_values(TrainConfig(), values)


def cmd_synth(args) -> None:
    from sodlab.data.synth import generate

    summary = generate(args.out, n_train=args.train, n_val=args.val, seed=args.seed, size=args.size,
                       hr_scale=args.hr_scale or None, workers=args.workers, overwrite=args.force)
    print(summary)


def cmd_convert(args) -> None:
    from sodlab.data.convert import convert

    summary = convert(args.format, args.src, args.out, names=args.names,
                      splits=args.splits.split(",") if args.splits else None, coordinates=args.voc_coordinates,
                      twins=args.twins, copy=args.copy, overwrite=args.overwrite)
    import json

    print(json.dumps(summary, indent=1, default=str))
    print(f"written to {args.out}/ (annotations/instances_{{split}}.json, {{split}}/)")


def cmd_check(args) -> int:
    from sodlab.data.check import check_dataset

    report = check_dataset(args.data, args.split, args.preset, args.tile)
    print(report.format(args.max_per_kind or None))
    return 2 if report.problems else 0


def cmd_train(args) -> None:
    from sodlab.evaluate import format_table
    from sodlab.runs import finish_run
    from sodlab.train import check_run_dir, train

    cfg = config_from_args(args)
    if args.oracle_scale is not None and (cfg.method != "hr-oracle" or args.resume):
        raise ValueError("--oracle-scale sets the twins of a new --method hr-oracle run only")
    if cfg.method == "hr-oracle" and not args.resume:
        check_run_dir(cfg, resume=False, force=args.force)  # refused before the oracle's view is made
        cfg = oracle_config(cfg, args.oracle_scale, given_config_values(args))
    run_dir = train(cfg, resume=args.resume, force=args.force, check_val=not args.no_eval)
    if not args.no_eval and (stats := finish_run(run_dir)) is not None:  # rank 0 prints, under torchrun
        print(format_table({cfg.method: stats}))


def oracle_config(cfg: TrainConfig, scale: int | None, given: dict) -> TrainConfig:
    """--method hr-oracle: the baseline trained on the HR oracle's view of the data's exact xK
    twins (sodlab.data.oracle, as the bench does), which it builds beside the run, in
    OUT-oracle-data-xK/ (never inside the user's data folder), unless --data is such a view already. Its detector sees the twins at their own size: the preset's
    min_size and max_size times K, unless given. Data without twins is refused, never trained on
    as a baseline under the oracle's name."""
    from sodlab.data.oracle import oracle_view, prepare_oracle_data

    view = oracle_view(cfg.data, cfg.train_split)
    if view is not None:
        k, data = view["scale"], cfg.data
        if scale not in (None, k):
            raise ValueError(f"{cfg.data}: the HR oracle's view at x{k}, not x{scale}; pass its LR data for another "
                             "scale")
    else:
        k = scale or ORACLE_SCALE
        if k < 2:
            raise ValueError(f"--oracle-scale must be at least 2, got {k}")
        data_dir, note = prepare_oracle_data(cfg.data, k, Path(f"{cfg.out}-oracle-data-x{k}"),
                                             (cfg.train_split, cfg.val_split))
        if data_dir is None:
            raise FileNotFoundError(
                f"{note.removeprefix('HR oracle skipped: ')}: --method hr-oracle trains on exact x{k} HR twins; make "
                f"them from real images with `sodlab convert ... --twins {k}` (the native images become the twins "
                f"of an area-averaged LR copy) or use --method upscale, the input-upscaling baseline")
        print(note)
        data = str(data_dir)
    sizes = {name: getattr(cfg.detector, name) * k for name in ("min_size", "max_size")
             if f"detector.{name}" not in given}
    return dataclasses.replace(cfg, data=data, detector=dataclasses.replace(cfg.detector, **sizes))


def cmd_eval(args) -> None:
    from sodlab.evaluate import format_table
    from sodlab.runs import evaluate_with

    overrides = {k[len(INFERENCE_DEST):]: v for k, v in vars(args).items() if k.startswith(INFERENCE_DEST)}
    method, out, stats = evaluate_with(args.run, overrides, args.data, args.split)
    print(format_table({method: stats}))
    print(f"wrote {out / 'eval.json'} and {out / 'detections_val.json'}"
          + ("" if out == Path(args.run) else f" (the run's own {Path(args.run) / 'eval.json'} is unchanged)"))


def cmd_demo(args) -> None:
    from sodlab.evaluate import format_table
    from sodlab.io import read_json
    from sodlab.recipes import ensure_data, get_budget, learned_ap_on, learned_note, train_config, with_iters
    from sodlab.runs import ensure_run, train_and_finish

    tic = time.perf_counter()
    budget = with_iters(get_budget("demo"), args.iters, args.sr_iters,
                        **({} if args.amp is None else {"amp": args.amp}))
    data_dir = ensure_data(budget, args.data)
    runs = Path(args.runs) if args.runs else budget.runs_dir()
    # The SR branch trains on the finished baseline's detector (frozen), so both rows share it.
    configs = {"baseline": train_config(budget, "baseline", runs / "baseline", data_dir),
               "sr": train_config(budget, "sr", runs / "sr", data_dir, detector_run=runs / "baseline")}
    rows = {}
    for method, cfg in configs.items():
        run_dir = train_and_finish(cfg, force=True) if args.force else ensure_run(cfg)
        rows[method] = read_json(run_dir / "eval.json")
    print()
    print(format_table(rows))
    if note := learned_note(learned_ap_on(budget, data_dir), 100 * rows["baseline"]["AP"], budget.name):
        print(f"\n{note}")
    quality = read_json(runs / "sr" / "sr_quality.json")
    if quality.get("rois"):
        print(f"\nSR patches on {quality['rois']} held-out small RoIs: G {quality['sr']['psnr']:.2f} dB PSNR, "
              f"bicubic {quality['bicubic']['psnr']:.2f} dB")
    browse = f"sodlab explore --data {data_dir} --runs {' '.join(str(runs / m) for m in configs)}"
    if args.explore:
        from sodlab import explore

        dataset = explore.build_dataset(data_dir, [runs / m for m in configs], split="val")
        for run, counts in explore.small_object_summary(dataset).items():
            print(f"FiftyOne {dataset.name}: {run}: small TP {counts['tp']}, FP {counts['fp']}, FN {counts['fn']}")
        print(f"browse it: {browse}")
    else:  # `sodlab explore` (re)builds the dataset itself, so the demo need not spend its time on it
        print(f"small-object hits and misses per image, in FiftyOne: {browse}")
    print(f"\ndemo finished in {time.perf_counter() - tic:.0f} s; runs in {runs}/")


def cmd_explore(args) -> None:
    from sodlab import explore

    dataset = explore.build_dataset(args.data, args.runs, split=args.split)
    for run, counts in explore.small_object_summary(dataset).items():
        print(f"{run}: small TP {counts['tp']}, FP {counts['fp']}, FN {counts['fn']}")
    if not args.no_launch:
        explore.launch(dataset, port=args.port, wait=True)


# --- sodlab bench ------------------------------------------------------------------------------------

BENCH_BUDGETS = ("quick", "default", "paper")
AMP_HELP = ("bfloat16 autocast for the detector's training step and for G and D at inference where the CPU has "
            "native bf16 (default on); --no-amp runs float32, as a CPU without bf16 does")


def add_bench_arguments(parser) -> None:
    from sodlab.bench.methods import METHOD_NAMES

    parser.add_argument("--budget", choices=BENCH_BUDGETS, default="default",
                        help="quick (minutes: tests, notebooks), default (every method trained at the demo's "
                             "data and lengths; bench.md states the budget), paper (GPU + COCO 2017)")
    parser.add_argument("--paper", action="store_true", help="the paper's configuration (same as --budget paper)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the budget's configuration on a handful of images: 2 iterations, 4 eval images, 128 px")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (mean +- std); budget's default 1")
    parser.add_argument("--iters", type=int, default=None, help="detector iterations (default: the budget's)")
    parser.add_argument("--sr-iters", type=int, default=None,
                        help="SR branch iterations on each seed's detector (default: the budget's)")
    parser.add_argument("--lr", type=float, default=None,
                        help="the detectors' learning rate, baseline, upscale and HR oracle alike (default: the "
                             "budget's)")
    parser.add_argument("--hires-branch-iters", type=int, default=None,
                        help="upscale and hr-oracle share each seed's baseline run and train only its last N "
                             "iterations at their larger input; 0 trains them from scratch for --iters (default: "
                             "the budget's)")
    parser.add_argument("--hires-branch-lr-restart", type=float, default=None,
                        help="with --hires-branch-iters: every detector's cosine schedule restarts at the branch "
                             "point from this fraction of --lr (a warm restart, the baseline's too); 0: one cosine "
                             "(default: the budget's)")
    parser.add_argument("--data", default=None,
                        help="COCO-format directory (default: the embedded benchmark, generated if absent)")
    parser.add_argument("--train-split", default=None, help="default: the budget's (train / train2017)")
    parser.add_argument("--val-split", default=None, help="default: the budget's (val / val2017)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHOD_NAMES)}")
    parser.add_argument("--presets", default=None, help="comma-separated detector presets (default: the budget's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every measurement (default 2)")
    parser.add_argument("--pretrained", default=None, action=argparse.BooleanOptionalAction,
                        help="ImageNet backbone weights (default: the preset's; --no-pretrained where none exist)")
    parser.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction, help=AMP_HELP)
    parser.add_argument("--sr-discriminator-trunk", choices=CHOICES["discriminator_trunk"], default=None,
                        help="D's trunk in the SR methods, with its recipe: detector (the seed's trained "
                             "detector reads each patch, and D's heads start as its box head; G at x2, L_MSE x100), "
                             "detector-tuned (the same, but D fine-tunes its own copy of the detector's backbone) "
                             "or compact (a small CNN trained from scratch; G at x4, L_MSE x10); README: 'D built "
                             "on the detector'")
    parser.add_argument("--sr-one-pass", default=None, action=argparse.BooleanOptionalAction,
                        help="the SR variants of a seed train in one pass over the same batches, sharing each "
                             "batch's loading and the frozen detector's forward (default); --no-sr-one-pass trains "
                             "each in a pass of its own, with bitwise the same runs, to measure what it saves")
    parser.add_argument("--name", default=None, help="output runs/bench-NAME (default: the budget's name)")
    parser.add_argument("--runs", default="runs", help="parent directory of bench-NAME")
    parser.add_argument("--force", action="store_true", help="replace an existing runs/bench-NAME")


def budget_from_args(args):
    from sodlab.recipes import BUDGETS, dry_run, with_iters

    budget = BUDGETS["paper" if args.paper else args.budget]
    if args.dry_run:
        budget = dry_run(budget)
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip()) if args.presets else None
    changes = {k: v for k, v in {"seeds": args.seeds, "threads": args.threads, "pretrained": args.pretrained,
                                 "amp": args.amp, "sr_one_pass": args.sr_one_pass, "lr": args.lr,
                                 "hires_branch_lr_restart": args.hires_branch_lr_restart,
                                 "train_split": args.train_split, "val_split": args.val_split,
                                 "presets": presets}.items() if v is not None}
    if changes.get("seeds", 1) < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if changes.get("hires_branch_lr_restart", 0) < 0:
        raise ValueError(f"--hires-branch-lr-restart must not be below 0, got {args.hires_branch_lr_restart}")
    if changes.get("lr", 1) <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.sr_discriminator_trunk:
        changes["sr"] = {**budget.sr, "discriminator_trunk": args.sr_discriminator_trunk}
    return with_iters(budget, args.iters, args.sr_iters, args.hires_branch_iters, **changes)


def cmd_bench(args) -> Path:
    from sodlab.bench import run_bench
    from sodlab.evaluate import format_table
    from sodlab.io import read_json

    budget = budget_from_args(args)
    out_dir = Path(args.runs) / f"bench-{args.name or budget.name}"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out_dir = run_bench(budget, out_dir, data=args.data, methods=methods, force=args.force)
    rows = read_json(out_dir / "bench.json")["rows"]
    print()
    print(format_table([(row["method"], row["backbone"], row["eval"]) for row in rows]))
    print(f"\nbench written to {out_dir}/ (bench.md, bench.json, ap_by_size.png, speed_accuracy.png)")
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sodlab", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    # The defaults write what the demo and the default bench read (recipes.DEFAULT_BUDGET), twins included.
    p = sub.add_parser("synth", help="generate the embedded small-object benchmark (COCO format)")
    p.add_argument("--out", default=DEFAULT_DATA)
    p.add_argument("--train", type=int, default=DEFAULT_BUDGET.synth_train, help="training images")
    p.add_argument("--val", type=int, default=DEFAULT_BUDGET.synth_val, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=DEFAULT_BUDGET.synth_size, help="image side in pixels")
    p.add_argument("--hr-scale", type=int, default=DEFAULT_BUDGET.synth_hr_scale,
                   help="also write the exact xK HR twins, which the SR recipe and the HR oracle read (0: none)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset directory")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="VOC / YOLO / VisDrone -> sodlab's COCO layout (data/README.md)")
    p.add_argument("--format", required=True, choices=("voc", "yolo", "visdrone"), help="the source's annotation format")
    p.add_argument("--src", required=True, help="the source dataset folder")
    p.add_argument("--out", required=True, help="the COCO-format folder to write")
    p.add_argument("--names", default=None, help="YOLO: the class-names file, one name per line")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: every split found)")
    p.add_argument("--voc-coordinates", default="auto", choices=("auto", "one-based", "zero-based"),
                   help="VOC pixel indexing (auto: zero-based when a box starts at 0)")
    p.add_argument("--twins", type=int, default=None, metavar="K",
                   help="treat the native images as exact xK HR twins and write their area-averaged x1/K copy as "
                        "the working LR dataset")
    p.add_argument("--copy", action="store_true", help="copy images instead of linking them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("check", help="validate a COCO-format dataset without training: every problem at once")
    p.add_argument("--data", required=True, help="the COCO-format folder (DIR/annotations/instances_{split}.json, "
                                                 "DIR/{split}/)")
    p.add_argument("--split", nargs="+", default=None, help="the splits to check (default: every instances_*.json)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="the detector preset whose input resize the size statistics apply (default: cpu)")
    p.add_argument("--tile", type=int, default=0, metavar="PX",
                   help="the statistics for native-resolution PX x PX tiles instead of the preset's resize")
    p.add_argument("--max-per-kind", type=int, default=20, metavar="N",
                   help="list at most N problems of one kind, 0 for all (the counts are always complete)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train a detector; writes runs/NAME/")
    add_train_config_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue runs/NAME (--out) from checkpoints/last.pt; unspecified settings come from its "
                        "config.json")
    p.add_argument("--force", action="store_true", help="replace an existing run / resume a changed config")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--oracle-scale", type=int, default=None, metavar="K",
                   help=f"--method hr-oracle: train on the data's exact xK twins ({{split}}_xK/), viewed as a COCO "
                        f"dataset beside the run, OUT-oracle-data-xK/ (default: {ORACLE_SCALE})")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run: eval.json + detections_val.json")
    p.add_argument("--run", required=True)
    p.add_argument("--data", default=None, help="COCO-format directory (default: the run's)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's val split; another "
                                                 "split or --data is written to RUN/evals/NAME/)")
    group = p.add_argument_group("inference settings for this evaluation only (written to RUN/evals/NAME/, "
                                 "recorded there as inference_overrides; the run's config.json and eval.json "
                                 "keep the trained ones)")
    for flag, setting, kwargs in (
            ("--sr-fusion", "sr.fusion", dict(choices=CHOICES["fusion"], help="how D's answers join the box head's")),
            ("--sr-scope", "sr.sr_scope", dict(choices=CHOICES["sr_scope"], help="which proposals go through G and D")),
            ("--sr-area-threshold", "sr.area_threshold",
             dict(type=float, metavar="PX2", help="'small' proposals: area under this, in input-image px^2")),
            ("--sr-large-rois", "sr.large_rois",
             dict(choices=CHOICES["large_rois"], help="proposals in scope wider or taller than the LR patch: cut "
                                                      "at lr_size and through G, or cut at D's size, G skipped")),
            ("--sr-gate-top-k", "sr.gate_top_k",
             dict(type=int, metavar="K", help="only K small proposals per image go through G and D (0: all)")),
            ("--sr-gate-rank", "sr.gate_rank",
             dict(choices=CHOICES["gate_rank"], help="which K: by the box head's foreground probability, the RPN's "
                                                     "objectness, or the sum of the two ranks")),
            ("--sr-gate-share-iou", "sr.gate_share_iou",
             dict(type=float, metavar="T", help="K patches for K objects: skip a proposal overlapping a sent one at "
                                                "IoU above T, and let the others take the answers of the sent one "
                                                "they overlap most above T (0: the plain top K)")),
            ("--sr-patches", "sr.patches",
             dict(choices=CHOICES["patches"], help="what D judges: G's patches, bilinear ones (G bypassed), or the "
                                                   "exact twin's (an oracle G: how much any G could give)")),
            ("--sr-amp", "sr.amp",
             dict(action=argparse.BooleanOptionalAction, help="G and D in bfloat16 autocast where the CPU has native "
                                                               "bf16 (float16 on CUDA); --no-sr-amp: float32")),
            ("--score-threshold", "detector.box_score_thresh",
             dict(type=float, metavar="S", help="detections scoring under S are dropped (the detector's "
                                                "box_score_thresh)"))):
        group.add_argument(flag, dest=INFERENCE_DEST + setting, default=argparse.SUPPRESS, **kwargs)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="every method side by side at an equal budget -> runs/bench-NAME/")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="synthesize, train the CPU baseline and the SR branch, evaluate, print the table")
    p.add_argument("--data", default=None, help="the embedded benchmark's folder (default: data/synth)")
    p.add_argument("--runs", default=None, help="where the runs go (default: the demo budget's, runs/demo)")
    p.add_argument("--iters", type=int, default=None, help="baseline iterations (default: the demo budget's)")
    p.add_argument("--sr-iters", type=int, default=None, help="SR branch iterations (default: the demo budget's)")
    p.add_argument("--force", action="store_true", help="train again even if the demo runs exist")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction, help=AMP_HELP)
    p.add_argument("--explore", default=False, action=argparse.BooleanOptionalAction,
                   help="also build the FiftyOne dataset of both runs and print their small-object hits and misses "
                        "(default off: `sodlab explore` builds it when you browse)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explore", help="browse a split and runs' detections in the FiftyOne App")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", nargs="+", required=True, help="run directories (baseline, sr, ...)")
    p.add_argument("--split", default="val")
    p.add_argument("--port", type=int, default=5151)
    p.add_argument("--no-launch", action="store_true", help="build the dataset only")
    p.set_defaults(func=cmd_explore)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:
        # Expected failures (bad input, clobber refusals) get one clear line, not a traceback.
        print(f"sodlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from sodlab.train import TrainingStopped

        if not isinstance(e, TrainingStopped):
            raise
        print(f"sodlab {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    return status if isinstance(status, int) else 0  # a command's own exit status (sodlab check: 2 on problems)


if __name__ == "__main__":
    sys.exit(main())

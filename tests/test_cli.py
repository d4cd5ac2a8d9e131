"""The command line: synth, train, eval and the error path, end to end on tiny data."""
import dataclasses
import json

import pytest

from sodlab.cli import NESTED, build_parser, config_from_args, main
from sodlab.config import TrainConfig
from sodlab.io import read_json


def test_every_config_knob_is_a_flag():
    args = build_parser().parse_args(["train", "--lr", "0.5", "--warmup-iters", "3", "--method", "sr",
                                      "--sr-hr-source", "twin", "--sr-area-threshold", "256", "--no-sr-use-generator",
                                      "--sr-weights-adv", "0.01", "--sr-lr-generator", "2e-4",
                                      "--detector-min-size", "320", "--detector-anchor-sizes", "4,6 8,11 16,23 32,45 64,91",
                                      "--detector-box-head", "4conv1fc", "--no-detector-fpn-norm"])
    cfg = config_from_args(args)
    assert cfg.lr == 0.5 and cfg.warmup_iters == 3 and cfg.method == "sr"
    assert cfg.sr_train.hr_source == "twin" and cfg.sr.area_threshold == 256 and cfg.sr.use_generator is False
    assert cfg.sr_train.weights.adv == 0.01 and cfg.sr_train.lr_generator == 2e-4
    assert cfg.detector.min_size == 320 and cfg.detector.anchor_sizes[0] == (4, 6) and cfg.detector.box_head == "4conv1fc"
    assert cfg.detector.max_size == TrainConfig().detector.max_size  # a flag left out keeps the preset's value


def test_help_lists_every_field_and_every_choice(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    flags = ["--" + prefix + f.name.replace("_", "-") for path, prefix, cls in NESTED for f in dataclasses.fields(cls)
             if not dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else 0)]
    flags += ["--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)
              if f.name not in ("detector", "sr", "sr_train")]
    assert [f for f in flags if f not in text] == []
    assert "{adamw,sgd}" in text and "{replace,mean}" in text and "{image,twin}" in text


def test_resume_takes_unspecified_settings_from_the_saved_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = dataclasses.replace(TrainConfig(), data="elsewhere/data", method="sr-no-adv", iters=10, out=str(run))
    (run / "config.json").write_text(json.dumps(saved.to_dict()))
    cfg = config_from_args(build_parser().parse_args(["train", "--out", str(run), "--resume", "--iters", "20"]))
    assert cfg == dataclasses.replace(saved, iters=20)


@pytest.mark.slow
def test_synth_train_eval_round_trip(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "runs" / "b"
    assert main(["synth", "--out", str(data), "--train", "4", "--val", "2", "--size", "128", "--workers", "1"]) == 0
    assert (data / "annotations" / "instances_train.json").exists()
    assert main(["train", "--data", str(data), "--iters", "2", "--batch-size", "2", "--warmup-iters", "1",
                 "--out", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| baseline |" in table and "AP" in table
    first = read_json(run / "eval.json")
    (run / "eval.json").unlink()
    assert main(["eval", "--run", str(run)]) == 0
    assert read_json(run / "eval.json") == first, "eval of the saved checkpoint reproduces training's evaluation"
    detections = json.loads((run / "detections_val.json").read_text())
    assert isinstance(detections, list)
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} and len(d["bbox"]) == 4 for d in detections)


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--iters", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sodlab train: error:") and "nowhere" in err and "Traceback" not in err


def test_help_and_argument_errors_import_nothing_heavy(tmp_path):
    """--help and argument errors must not wait for torch (seconds on a busy CPU): the parser, the
    bench's rows and the configs import none of torch, torchvision or FiftyOne."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys\nfrom sodlab.cli import build_parser\n"
              "for argv in (['--help'], ['train', '--help'], ['bench', '--help'], ['check', '--help'], "
              "['train', '--bogus'], ['train', '--preset', 'nope']):\n"
              "    try: build_parser().parse_args(argv)\n"
              "    except SystemExit: pass\n"
              "heavy = sorted(m for m in ('torch', 'torchvision', 'fiftyone', 'pycocotools', 'PIL', 'numpy') "
              "if m in sys.modules)\n"
              "print(heavy, file=sys.stderr)\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]

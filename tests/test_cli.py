"""The command line: synth, train, eval and the error path, end to end on tiny data."""
import json

import pytest

from sodlab.cli import build_parser, main
from sodlab.io import read_json


def test_every_config_knob_is_a_flag():
    args = build_parser().parse_args(["train", "--lr", "0.5", "--warmup-iters", "3", "--method", "sr",
                                      "--sr-hr-source", "twin", "--sr-area-threshold", "256", "--no-sr-use-generator"])
    from sodlab.cli import _config_from_args

    cfg = _config_from_args(args)
    assert cfg.lr == 0.5 and cfg.warmup_iters == 3 and cfg.method == "sr"
    assert cfg.sr.hr_source == "twin" and cfg.sr.area_threshold == 256 and cfg.sr.use_generator is False


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

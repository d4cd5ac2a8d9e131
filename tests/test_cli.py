"""The command line: synth, train, eval and the error path, end to end on tiny data."""
import dataclasses
import json

import pytest

from sodlab.cli import NESTED, build_parser, config_from_args, main
from sodlab.config import TrainConfig
from sodlab.io import read_json


def test_every_config_knob_is_a_flag():
    args = build_parser().parse_args(["train", "--lr", "0.5", "--warmup-iters", "3", "--method", "sr",
                                      "--sr-hr-source", "twin", "--sr-area-threshold", "256", "--sr-large-rois", "native",
                                      "--no-sr-use-generator",
                                      "--sr-weights-adv", "0.01", "--sr-lr-generator", "2e-4",
                                      "--detector-min-size", "320", "--detector-anchor-sizes", "4,6 8,11 16,23 32,45 64,91",
                                      "--detector-box-head", "4conv1fc", "--no-detector-fpn-norm"])
    cfg = config_from_args(args)
    assert cfg.lr == 0.5 and cfg.warmup_iters == 3 and cfg.method == "sr"
    assert cfg.sr_train.hr_source == "twin" and cfg.sr.use_generator is False
    assert cfg.sr.area_threshold == 256 and cfg.sr.large_rois == "native"
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
    assert (data / "train_x4").is_dir(), "by default it writes the x4 twins the demo and the bench read"
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


# --- nothing written before every input is checked; checkpoints that do not fit their config ------------

TINY = ["--iters", "2", "--batch-size", "2", "--warmup-iters", "1", "--detector-min-size", "128",
        "--detector-max-size", "128", "--no-eval"]


@pytest.mark.parametrize("flags, message", [
    (["--ckpt-every", "0"], "TrainConfig.ckpt_every must be at least 1; got 0"),
    (["--lr", "0"], "TrainConfig.lr must be above 0; got 0.0"),
    (["--detector-min-size", "0"], "DetectorConfig.min_size must be at least 1; got 0"),
    (["--val-split", "nope"], "COCO split 'nope'"),
    (["--method", "sr", "--sr-schedule", "staged", "--init-from", "nowhere"], "nowhere/checkpoints/last.pt"),
    (["--detector-anchor-sizes", "8,11"], "FPN needs anchor sizes for 5 levels"),
])
def test_a_refused_start_writes_nothing(tiny_synth, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    evaluating = [f for f in TINY if f != "--no-eval"]  # so the val split the evaluation reads is checked
    assert main(["train", "--data", str(tiny_synth), "--out", str(run), *evaluating, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not run.exists()


@pytest.fixture(scope="module")
def sr_run(tiny_synth, tmp_path_factory):
    """A joint SR run of two iterations (the checkpoint holds a detector, G and D)."""
    run = tmp_path_factory.mktemp("runs") / "sr"
    assert main(["train", "--data", str(tiny_synth), "--out", str(run), "--method", "sr", "--sr-schedule", "joint",
                 "--detector-box-score-thresh", "0", *TINY]) == 0  # threshold 0: detections after 2 steps
    return run


def _edited_copy(run, tmp_path, change):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.slow
def test_eval_of_a_run_whose_config_names_another_method_is_one_line(sr_run, tmp_path, capsys):
    """The issue's case: config.json rewritten to another method, then `sodlab eval --run`."""
    run = _edited_copy(sr_run, tmp_path, lambda c: c.update(method="baseline"))
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run}/checkpoints/last.pt: trained as method sr" in err and f"{run}/config.json says baseline" in err
    assert not (run / "eval.json").exists()


@pytest.mark.slow
def test_eval_of_weights_that_do_not_fit_names_both_files_and_the_field(sr_run, tmp_path, capsys):
    run = _edited_copy(sr_run, tmp_path, lambda c: c["detector"].update(fpn_channels=64))
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run}/checkpoints/last.pt: its weights do not fit the model {run}/config.json describes" in err
    assert "detector.fpn_channels 128 there, 64 here" in err


@pytest.mark.slow
def test_resume_with_flags_the_weights_do_not_fit_leaves_the_run_untouched(sr_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(sr_run, run)
    files = (run / "config.json", run / "metrics.jsonl", run / "checkpoints" / "last.pt")
    before = [p.read_bytes() for p in files]
    assert main(["train", "--out", str(run), "--resume", "--force", "--iters", "3",
                 "--sr-generator-channels", "16"]) == 2
    err = capsys.readouterr().err
    assert "last.pt: its weights do not fit" in err and "sr.generator_channels 32 there, 16 here" in err
    assert [p.read_bytes() for p in files] == before


# --- methods that refuse what they cannot do ------------------------------------------------------------------

def _without_twins(tiny_synth, tmp_path):
    import shutil

    data = tmp_path / "lr-only"
    shutil.copytree(tiny_synth, data, ignore=shutil.ignore_patterns("*_x[0-9]*", "scenes_*"))
    return data


def test_hr_oracle_without_twins_is_refused_before_anything_is_written(tiny_synth, tmp_path, capsys):
    data = _without_twins(tiny_synth, tmp_path)
    listing = sorted(p.name for p in data.iterdir())
    assert main(["train", "--data", str(data), "--method", "hr-oracle", "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no twins" in err
    assert "sodlab convert ... --twins 2" in err and "--method upscale" in err
    assert not (tmp_path / "run").exists() and sorted(p.name for p in data.iterdir()) == listing


def test_the_library_refuses_hr_oracle_on_lr_data(tiny_synth, tmp_path):
    from sodlab.train import train

    cfg = TrainConfig(data=str(tiny_synth), method="hr-oracle", out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="--method hr-oracle trains on the HR oracle's view"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_hr_oracle_trains_on_the_view_of_the_twins_at_their_own_size(tiny_synth, tmp_path):
    import shutil

    from sodlab.cli import oracle_config

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    out = tmp_path / "runs" / "oracle"
    cfg = dataclasses.replace(TrainConfig(), data=str(data), method="hr-oracle", out=str(out))
    before = sorted(p.name for p in data.iterdir())
    oracle = oracle_config(cfg, None, {})
    assert sorted(p.name for p in data.iterdir()) == before, "nothing is written into the user's data folder"
    view_dir = tmp_path / "runs" / "oracle-oracle-data-x2"
    view = json.loads((view_dir / "annotations" / "instances_train.json").read_text())
    assert oracle.data == str(view_dir) and view["info"]["hr_oracle"]["scale"] == 2
    assert view["images"][0]["width"] == 256  # the 128 px images' x4 twins, area-averaged to x2
    assert (oracle.detector.min_size, oracle.detector.max_size) == (512, 512)  # the preset's 256 px, x2
    sized = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, min_size=300, max_size=300))
    given = oracle_config(sized, 4, {"detector.min_size": 300, "detector.max_size": 300})  # flags given: kept
    assert given.data == str(tmp_path / "runs" / "oracle-oracle-data-x4") and given.detector.min_size == 300
    with pytest.raises(ValueError, match="x2, not x4"):  # a view is used as it is
        oracle_config(dataclasses.replace(cfg, data=oracle.data), 4, {})


@pytest.mark.slow
def test_hr_oracle_run_is_scored_against_the_lr_ground_truth(tiny_synth, tmp_path):
    import shutil

    data, run = tmp_path / "data", tmp_path / "oracle"
    shutil.copytree(tiny_synth, data)
    flags = [f for f in TINY if f != "--no-eval"] + ["--detector-box-score-thresh", "0"]  # detections after 2 steps
    assert main(["train", "--data", str(data), "--method", "hr-oracle", "--out", str(run), *flags]) == 0
    assert read_json(run / "config.json")["data"] == str(tmp_path / "oracle-oracle-data-x2")
    detections = json.loads((run / "detections_val.json").read_text())
    # boxes mapped back by 1/2 into the 128 px LR frame the LR val json describes
    assert detections and max(d["bbox"][0] + d["bbox"][2] for d in detections) <= 128.01
    assert read_json(run / "eval.json")["APs"] >= 0


def test_twin_hr_source_without_twins_names_the_ways_that_work(tiny_synth, tmp_path, capsys):
    data = _without_twins(tiny_synth, tmp_path)
    assert main(["train", "--data", str(data), "--method", "sr", "--sr-schedule", "joint", "--sr-hr-source", "twin",
                 "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_x4: no x4 twins" in err
    assert "--sr-hr-source image" in err and "`sodlab convert ... --twins 4`" in err
    assert not (tmp_path / "run").exists()


# --- evaluation with other inference settings -----------------------------------------------------------------

def test_inference_settings_apply_to_sr_runs_only():
    from sodlab.train import with_inference_settings

    sr = TrainConfig(method="sr", init_from="x")
    changed = with_inference_settings(sr, {"sr.fusion": "mean", "sr.gate_top_k": 3, "detector.box_score_thresh": 0.3})
    assert (changed.sr.fusion, changed.sr.gate_top_k, changed.detector.box_score_thresh) == ("mean", 3, 0.3)
    assert changed.sr.lr_size == sr.sr.lr_size and changed.detector.min_size == sr.detector.min_size
    with pytest.raises(ValueError, match="method baseline has no SR branch"):
        with_inference_settings(TrainConfig(), {"sr.fusion": "mean"})
    with pytest.raises(ValueError, match="not inference settings: sr.scale"):
        with_inference_settings(sr, {"sr.scale": 2})


@pytest.mark.slow
def test_eval_overrides_inference_for_that_evaluation_and_records_it(sr_run, tmp_path):
    import shutil

    from sodlab.train import load_trained_model

    run = tmp_path / "copy"
    shutil.copytree(sr_run, run)
    config = (run / "config.json").read_bytes()
    assert main(["eval", "--run", str(run)]) == 0
    assert "inference_overrides" not in read_json(run / "eval.json")
    scores = [d["score"] for d in json.loads((run / "detections_val.json").read_text())]
    assert any(score < 0.2 for score in scores), "the run's own threshold (0) keeps low-scoring detections"
    own = {name: (run / name).read_bytes() for name in ("eval.json", "detections_val.json")}
    assert main(["eval", "--run", str(run), "--sr-fusion", "mean", "--sr-scope", "all",
                 "--score-threshold", "0.2"]) == 0
    out = run / "evals" / "val+detector.box_score_thresh=0.2+sr.fusion=mean+sr.sr_scope=all"
    stats = read_json(out / "eval.json")
    assert stats["inference_overrides"] == {"sr.fusion": "mean", "sr.sr_scope": "all", "detector.box_score_thresh": 0.2}
    assert all(d["score"] >= 0.2 for d in json.loads((out / "detections_val.json").read_text()))
    assert (run / "config.json").read_bytes() == config, "config.json keeps the trained settings"
    assert {name: (run / name).read_bytes() for name in own} == own, "the run's own evaluation is never replaced"
    # another split is another evaluation too, even without overrides
    assert main(["eval", "--run", str(run), "--split", "train"]) == 0
    assert read_json(run / "evals" / "train" / "eval.json")["split"] == "train"
    assert {name: (run / name).read_bytes() for name in own} == own
    _, model = load_trained_model(run, inference={"sr.fusion": "mean"})
    assert model.fusion == "mean" and load_trained_model(run)[1].fusion == "replace"


@pytest.mark.slow
def test_eval_with_twin_patches_gives_d_the_twins_and_names_the_data_without_them(sr_run, tiny_synth, tmp_path,
                                                                                  capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(sr_run, run)
    assert main(["eval", "--run", str(run)]) == 0 and main(["eval", "--run", str(run), "--sr-patches", "twin"]) == 0
    out = run / "evals" / "val+sr.patches=twin"
    assert read_json(out / "eval.json")["inference_overrides"] == {"sr.patches": "twin"}
    assert (out / "detections_val.json").read_bytes() != (run / "detections_val.json").read_bytes(), \
        "D judged other patches, so the small proposals' scores changed"
    no_twins = tmp_path / "no-twins"
    shutil.copytree(tiny_synth, no_twins, ignore=shutil.ignore_patterns("*_x[0-9]*"))
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(no_twins), "--sr-patches", "twin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{no_twins}: --sr-patches twin" in err and "val_x4/" in err
    # a run is evaluated with G's patches: the oracle is for `sodlab eval` only, refused before anything is written
    assert main(["train", "--data", str(tiny_synth), "--out", str(tmp_path / "oracle-run"), "--method", "sr",
                 "--sr-patches", "twin", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sr.patches='twin' is an evaluation setting" in err
    assert not (tmp_path / "oracle-run").exists()


def test_sr_flags_with_a_detector_method_are_refused(capsys, tmp_path):
    assert main(["train", "--method", "baseline", "--sr-scale", "3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--sr-scale: SR settings, which --method baseline would ignore" in err
    assert not (tmp_path / "r").exists()


def test_demo_trains_both_rows_on_one_detector_and_leaves_fiftyone_to_explore(tiny_synth, tmp_path, capsys,
                                                                              monkeypatch):
    from sodlab import explore, recipes

    tiny = dataclasses.replace(recipes.get_budget("quick"), iters=3, sr_iters=2, batch_size=2, warmup_iters=1,
                               eval_batch_size=2, sr_train=dict(rois_per_image=4, pretrain_iters=2))
    monkeypatch.setattr(recipes, "get_budget", lambda name=None: tiny)

    def no_fiftyone(*args, **kwargs):
        raise AssertionError("the demo built a FiftyOne dataset without --explore")

    monkeypatch.setattr(explore, "build_dataset", no_fiftyone)
    runs = tmp_path / "runs"
    assert main(["demo", "--data", str(tiny_synth), "--runs", str(runs), "--no-amp"]) == 0
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| sr |" in out and "held-out small RoIs" in out
    assert f"sodlab explore --data {tiny_synth} --runs {runs / 'baseline'} {runs / 'sr'}" in out
    assert read_json(runs / "sr" / "config.json")["init_from"] == str(runs / "baseline")
    assert "counts its detectors as learned" not in out  # the quick budget makes no such claim
    # a budget that claims its baseline learns, on its own data, says when the baseline fell short
    monkeypatch.setattr(recipes, "get_budget", lambda name=None: dataclasses.replace(tiny, learned_ap=20.0,
                                                                                    data=str(tiny_synth)))
    assert main(["demo", "--data", str(tiny_synth), "--runs", str(runs), "--no-amp"]) == 0
    baseline_ap = 100 * read_json(runs / "baseline" / "eval.json")["AP"]
    assert f"The baseline reached AP {baseline_ap:.1f}, under the 20 at which the quick budget counts" in \
        capsys.readouterr().out
    with pytest.raises(AssertionError, match="without --explore"):  # --explore does build it
        main(["demo", "--data", str(tiny_synth), "--runs", str(runs), "--no-amp", "--explore"])

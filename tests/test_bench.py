"""sodlab bench: end to end on a tiny set, the shared detector, resume, the gap formula, the oracle's
frames, SAHI's slicing, per-process peak RSS, no overwriting, and the --paper dry run."""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodlab.bench import open_bench_dir, run_bench, run_name, train_pass
from sodlab.bench.measure import batch1_speed_and_peak, peak_rss_mb, run_measurement, scale_results
from sodlab.bench.methods import METHOD_NAMES, METHODS
from sodlab.bench.report import GATE_RANKS, gap_closed, gate_sharing, sr_precision
from sodlab.cli import add_bench_arguments, budget_from_args, cmd_bench
from sodlab.config import CHOICES
from sodlab.data.coco import load_coco_json
from sodlab.data.oracle import prepare_oracle_data
from sodlab.evaluate import coco_eval
from sodlab.models.sahi_adapter import sahi_detection_model, sahi_predict
from sodlab.recipes import BUDGETS, Budget, sr_settings, train_config

TINY_DETECTOR = dict(min_size=128, max_size=128, rpn_post_nms_top_n_train=100, box_batch_size_per_image=32,
                     rpn_post_nms_top_n_test=30, box_detections_per_img=30)


def tiny_budget(**changes) -> Budget:
    """Smaller than quick: 2 iterations at batch 2 on 128 px images (upscale and the oracle branch off the
    baseline's run for its second), 3 timed inferences, in-process."""
    return dataclasses.replace(BUDGETS["quick"], **{"name": "test", "iters": 2, "sr_iters": 2, "hires_branch_iters": 1,
                                                    "batch_size": 2, "warmup_iters": 1, "detector": TINY_DETECTOR,
                                                    "timing_images": 3, "timing_warmup": 1, "threads": 1,
                                                    "isolate": False, **changes})


def parse(argv):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def bench_dir(tiny_synth, tmp_path_factory):
    """Every method once on the tiny embedded benchmark (x4 twins: the oracle reduces them to x2)."""
    out = tmp_path_factory.mktemp("bench") / "bench-test"
    return run_bench(tiny_budget(), out, data=str(tiny_synth), progress=False)


# --- the gap formula -------------------------------------------------------------------------------

def test_gap_closed_by_hand():
    assert gap_closed(0.15, 0.10, 0.20) == pytest.approx(0.5)  # half way from baseline to oracle
    assert gap_closed(0.10, 0.10, 0.20) == 0.0
    assert gap_closed(0.20, 0.10, 0.20) == pytest.approx(1.0)
    assert gap_closed(0.25, 0.10, 0.20) == pytest.approx(1.5)  # beyond the oracle
    assert gap_closed(0.05, 0.10, 0.20) == pytest.approx(-0.5)  # worse than the baseline
    assert gap_closed(0.15, 0.10, None) is None  # no oracle
    assert gap_closed(0.15, 0.10, 0.10) is None  # nothing to close
    assert gap_closed(0.15, 0.10, 0.05) is None  # the oracle below the baseline: no gap, not a negative one
    assert gap_closed(0.15, -1.0, 0.20) is None  # COCO's -1: no small ground truth


def test_a_bench_saved_before_a_budget_field_existed_resumes_as_its_default(tmp_path):
    budget = tiny_budget(hires_branch_iters=0)
    saved = json.loads(json.dumps(dataclasses.asdict(budget)))
    del saved["hires_branch_iters"]  # a bench.json written before the field: its x2 detectors from scratch
    record = {"method": "baseline", "preset": "cpu", "seed": 0}
    (tmp_path / "bench.json").write_text(json.dumps({"budget": saved, "records": [record]}))
    assert open_bench_dir(tmp_path, budget, force=False) == {("baseline", "cpu", 0): record}
    with pytest.raises(FileExistsError, match=r"another budget \(hires_branch_iters\)"):
        open_bench_dir(tmp_path, dataclasses.replace(budget, hires_branch_iters=1), force=False)


def test_a_bench_run_of_another_config_is_refused_naming_the_field_and_when_only_inference_differs_the_eval(tmp_path):
    # a recipe change that only changes inference (the gate's rank) leaves the trained weights valid,
    # and --force would train them again: the refusal names the field and how to measure the run
    budget = tiny_budget()
    sr = next(m for m in METHODS if m.name == "sr")
    out_dir, detector_run = tmp_path / "bench", tmp_path / "bench" / "runs" / "baseline-seed0"
    cfg = train_config(budget, sr.train_as, out_dir / "runs" / run_name(sr, "cpu", 0, budget), "data/synth", 0, "cpu",
                       detector_run=detector_run)
    Path(cfg.out).mkdir(parents=True)

    def refusal(saved):
        (Path(cfg.out) / "config.json").write_text(json.dumps(saved.to_dict()))
        with pytest.raises(FileExistsError) as refused:
            train_pass(budget, [sr], out_dir, "cpu", 0, Path("data/synth"), detector_run, "twin", progress=False)
        return str(refused.value)

    other_rank = "objectness" if cfg.sr.gate_rank != "objectness" else "both"
    message = refusal(dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, gate_rank=other_rank)))
    assert "(sr.gate_rank)" in message and "sodlab eval --run" in message and "\n" not in message
    message = refusal(dataclasses.replace(cfg, sr_train=dataclasses.replace(cfg.sr_train, lr_generator=1.0)))
    assert "(sr_train.lr_generator)" in message and "sodlab eval" not in message


def test_a_bench_resumes_whatever_its_budget_claims_about_learning(tmp_path):
    # learned_ap changes what bench.md says, not the runs: a default bench saved before the field
    # (or with another value) resumes, while a field that changes the runs is still refused
    budget = tiny_budget(learned_ap=20.0)
    saved = json.loads(json.dumps(dataclasses.asdict(budget)))
    del saved["learned_ap"]
    record = {"method": "baseline", "preset": "cpu", "seed": 0}
    (tmp_path / "bench.json").write_text(json.dumps({"budget": saved, "records": [record]}))
    assert open_bench_dir(tmp_path, budget, force=False) == {("baseline", "cpu", 0): record}
    assert open_bench_dir(tmp_path, dataclasses.replace(budget, learned_ap=30.0), force=False) == {
        ("baseline", "cpu", 0): record}
    # more seeds extend the bench, reusing the seeds it has; the demo's runs folder is not the bench's
    more = dataclasses.replace(budget, seeds=3, runs="runs/elsewhere")
    assert open_bench_dir(tmp_path, more, force=False) == {("baseline", "cpu", 0): record}
    with pytest.raises(FileExistsError, match=r"another budget \(iters\)"):
        open_bench_dir(tmp_path, dataclasses.replace(budget, iters=budget.iters + 1), force=False)
    saved["seeds"] = 3  # fewer seeds than a bench measured would drop some from bench.json: refused
    (tmp_path / "bench.json").write_text(json.dumps({"budget": saved, "records": [record]}))
    with pytest.raises(FileExistsError, match=r"another budget \(seeds 3, not 1\)"):
        open_bench_dir(tmp_path, budget, force=False)


# --- end to end --------------------------------------------------------------------------------------

@pytest.mark.slow  # the whole bench, every method trained (one module fixture)
def test_every_method_has_a_row_with_finite_numbers(bench_dir):
    bench = json.loads((bench_dir / "bench.json").read_text())
    assert bench["complete"]
    rows = {row["method"]: row for row in bench["rows"]}
    assert list(rows) == list(METHOD_NAMES)
    for name, row in rows.items():
        numbers = [row["eval"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        numbers += [b["AP"] for b in row["eval"]["fine_bins"].values()]
        numbers += list(row["cost"].values()) + list(row["vs_baseline"].values())
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), (name, numbers)
        assert row["cost"]["infer_ms_per_image"] > 0 and row["cost"]["parameters"] > 0
    # equal budget: every detector saw the same 4 images (2 iterations at batch 2); upscale and the
    # oracle branch off the baseline's run after its first iteration, and train the second
    assert {row["budget"]["images_seen"] for row in rows.values()} == {4}
    assert {rows[name]["branch_point"] for name in ("upscale", "hr-oracle")} == {1}
    assert rows["baseline"]["vs_baseline"]["infer_ms_per_image"] == 1.0
    # SAHI reuses the baseline's weights and training; the SR methods carry G and D on top
    assert rows["sahi"]["cost"]["parameters"] == rows["baseline"]["cost"]["parameters"]
    assert rows["sahi"]["budget"]["reused_from"] == "baseline"
    assert rows["sr"]["vs_baseline"]["parameters"] > 1
    assert rows["sr-no-recon"]["cost"]["parameters"] < rows["sr"]["cost"]["parameters"]  # no G
    # the oracle is evaluated against the LR ground truth: the same objects in the same size bins
    assert ({b: v["num_gt"] for b, v in rows["hr-oracle"]["eval"]["fine_bins"].items()}
            == {b: v["num_gt"] for b, v in rows["baseline"]["eval"]["fine_bins"].items()})
    assert bench["torch_threads"] == 1
    assert all(r["training"]["torch_threads"] == r["inference"]["torch_threads"] == 1 for r in bench["records"])
    assert bench["sr_hr_source"] == "twin"
    # the final latency: every method timed in turns, the baseline the reference of the ratios
    paired = {r["method"]: r["inference"]["paired"] for r in bench["records"]}
    assert set(paired) == set(METHOD_NAMES) and paired["baseline"]["ratio"] == 1.0
    assert all(p["median_ms"] > 0 and p["rounds"] == 5 for p in paired.values())
    assert rows["sr"]["cost"]["infer_ms_per_image"] == paired["sr"]["median_ms"]


@pytest.mark.slow  # the whole bench, every method trained (one module fixture)
def test_bench_writes_run_dirs_report_and_plots(bench_dir):
    for method in METHODS:
        run_dir = bench_dir / "runs" / f"{method.name}-seed0"
        assert (run_dir / "eval.json").exists() and (run_dir / "detections_val.json").exists()
        if method.train_as:  # a normal run directory: `sodlab eval` can load it
            config = json.loads((run_dir / "config.json").read_text())
            assert config["method"] == method.train_as
            assert config["iters"] == 2
            assert (run_dir / "checkpoints" / "last.pt").exists()
    records = {r["method"]: r for r in json.loads((bench_dir / "bench.json").read_text())["records"]}
    assert (bench_dir / "runs" / "baseline-seed0" / "checkpoints" / "iter-1.pt").exists()
    for name in ("upscale", "hr-oracle"):  # their first iteration is the baseline's, their second their own
        config = json.loads((bench_dir / "runs" / f"{name}-seed0" / "config.json").read_text())
        assert (config["continue_from"], config["continue_at"]) == (str(bench_dir / "runs" / "baseline-seed0"), 1)
        assert len((bench_dir / "runs" / f"{name}-seed0" / "metrics.jsonl").read_text().splitlines()) == 1
        assert records[name]["training"]["branched_from"]["own_iters"] == 1
    oracle = json.loads((bench_dir / "runs" / "hr-oracle-seed0" / "config.json").read_text())
    assert oracle["detector"]["min_size"] == 2 * 128  # x2 twins are not resized back down
    sr = json.loads((bench_dir / "runs" / "sr-seed0" / "config.json").read_text())
    assert sr["sr_train"]["schedule"] == "staged" and sr["sr_train"]["hr_source"] == "twin"
    assert sr["init_from"] == str(bench_dir / "runs" / "baseline-seed0")

    report = (bench_dir / "bench.md").read_text()
    assert "## Published on COCO (Gu et al.), not comparable" in report
    assert "| Methods | Backbone | AP 0.5:0.95 | 0.5 | 0.75 | S | M | L |" in report
    assert "w/o clsloss (cf. sr-no-cls) | ResNet-50 | 32.5 | 52.8 | 34.5 | 1.9 | 11.5 | 29.9 |" in report
    assert "64x64 px slices, overlap 0.2" in report and "HR oracle at x2" in report
    assert "- evaluation: whole images, each resized by its own detector (the oracle's 2x larger ones" in report
    assert "annotations/instances_val.json`, the ground truth at the data's own resolution" in report
    assert "| APs - score-matched baseline | 95% interval |" in report
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ("G and D at inference in bfloat16 autocast" in report) == native_bf16
    assert ("G and D at inference in float32 (this CPU has no native bf16" in report) == (not native_bf16)
    assert "Sharing the detector: the 5 SR variants train their branches on the seed's baseline detector" in report
    assert ("Branching: `upscale` and `hr-oracle` share the seed's baseline run up to iteration 1 and train its "
            "last 1 iterations at their larger input") in report
    assert "share the seed's baseline run (its weights, optimizer and batches) up to iteration 1 and train" in report
    rows = json.loads((bench_dir / "bench.json").read_text())["rows"]
    matched = next(r for r in rows if r["method"] == "sr")["intervals"]["APs_vs_score_matched"]
    assert matched["low"] <= matched["high"] and np.isfinite(matched["point"])
    # the SR branch's ablation: sr minus each variant, and none for sr itself or a detector method
    assert "## The SR branch's ablation: `sr` minus each variant" in report and "What G adds" in report
    for row in rows:
        ablation = (row["intervals"] or {}).get("ablation")
        assert (ablation is not None) == (row["method"] in ("sr-no-recon", "sr-no-adv", "sr-no-cls", "sr-cls-only"))
        if ablation:
            assert set(ablation) == {"AP", "APs", "AP75s"}
            assert all(v["low"] <= v["high"] and np.isfinite(v["point"]) and v["seeds"] == 1 for v in ablation.values())
            assert f"| {row['method']} | ResNet-18-FPN | {row['description']} |" in report
    # every SR variant's reconstruction against bicubic, G's or bilinear's, saved with its run and in bench.md
    records = {r["method"]: r for r in json.loads((bench_dir / "bench.json").read_text())["records"]}
    for method in METHODS:
        quality = records[method.name]["inference"]["sr_quality"]
        assert (quality is not None) == method.shares_detector
        if quality:
            saved = json.loads((bench_dir / "runs" / f"{method.name}-seed0" / "sr_quality.json").read_text())
            assert saved == quality and quality["rois"] > 0 and quality["bins"]
            assert quality["method"] == ("G" if method.name != "sr-no-recon" else "bilinear (no reconstruction module)")
            assert f"| {method.name} | ResNet-18-FPN | {quality['method']} | " in report
    assert "## Reconstruction: each SR variant's patches minus bicubic's" in report
    # sr's D held fixed on bilinear patches and on the twins' (a perfect G), as `sodlab eval --sr-patches` writes them
    assert all("patch_sources" not in r for r in records.values() if r["method"] != "sr")
    for patches, entry in records["sr"]["patch_sources"].items():
        folder = bench_dir / "runs" / "sr-seed0" / "evals" / f"val+sr.patches={patches}"
        assert entry["dir"] == str(folder) and json.loads((folder / "eval.json").read_text()) == entry["eval"]
        assert entry["eval"]["inference_overrides"] == {"sr.patches": patches}
    assert set(records["sr"]["patch_sources"]) == {"bilinear", "twin"}
    assert "## How much any G could give: `sr`'s D on other patches" in report and "| seed 0 | ResNet-18-FPN |" in report
    assert set(next(r for r in rows if r["method"] == "sr")["intervals"]["patch_sources"]) == {"generator", "twin"}
    assert "`sr`'s G against bicubic on held-out small RoIs: " in report
    for name in ("ap_by_size.png", "speed_accuracy.png"):
        with Image.open(bench_dir / name) as image:
            assert image.format == "PNG" and image.width > 300


@pytest.mark.slow  # the whole bench, every method trained (one module fixture)
def test_sr_variants_of_a_seed_share_the_baseline_detector_bytes(bench_dir):
    def detector_state(run):
        state = torch.load(bench_dir / "runs" / run / "checkpoints" / "last.pt", weights_only=False)["model"]
        if any(k.startswith("detector.") for k in state):
            return {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}
        return state

    baseline = detector_state("baseline-seed0")
    for method in ("sr", "sr-no-recon", "sr-cls-only"):
        shared = detector_state(f"{method}-seed0")
        assert shared.keys() == baseline.keys()
        assert all(torch.equal(shared[k], baseline[k]) for k in baseline), method
    records = json.loads((bench_dir / "bench.json").read_text())["records"]
    sr = next(r for r in records if r["method"] == "sr")
    assert sr["training"]["shared_detector"].endswith("baseline-seed0")
    # ... and they trained in one pass, whose time is split between them
    sr_variants = [r for r in records if r["method"].startswith("sr")]
    passes = {json.dumps(r["training"]["one_pass"]) for r in sr_variants}
    assert len(passes) == 1
    one_pass = sr_variants[0]["training"]["one_pass"]
    assert sorted(Path(run).name for run in one_pass["runs"]) == sorted(Path(r["run_dir"]).name for r in sr_variants)
    assert sum(r["training"]["seconds"] for r in sr_variants) == pytest.approx(one_pass["seconds"])
    assert not any("one_pass" in r["training"] for r in records if not r["method"].startswith("sr"))


@pytest.mark.slow  # the whole bench, every method trained (one module fixture)
def test_sr_variants_in_passes_of_their_own_are_bitwise_the_one_pass_runs(bench_dir, tiny_synth, tmp_path):
    budget = tiny_budget(sr_one_pass=False)
    assert not budget_from_args(parse(["--no-sr-one-pass"])).sr_one_pass
    alone = run_bench(budget, tmp_path / "bench-alone", data=str(tiny_synth), methods=["baseline", "sr", "sr-no-recon"],
                      progress=False)
    records = json.loads((alone / "bench.json").read_text())["records"]
    assert not any("one_pass" in r["training"] for r in records)
    for run in ("sr-seed0", "sr-no-recon-seed0"):
        a, b = (torch.load(d / "runs" / run / "checkpoints" / "last.pt", weights_only=False)["model"]
                for d in (bench_dir, alone))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
    # ... and evaluated in one pass sharing the detector's part, they detect as evaluated apart
    for run in ("sr-seed0", "sr-no-recon-seed0"):
        a, b = (json.loads((d / "runs" / run / "detections_val.json").read_text()) for d in (bench_dir, alone))
        assert a == b, run
    assert "each in a pass of its own" in (alone / "bench.md").read_text()
    assert "they train in one pass" in (bench_dir / "bench.md").read_text()


@pytest.mark.slow  # the whole bench, every method trained (one module fixture)
def test_a_killed_bench_resumes_reusing_its_finished_runs(bench_dir, tmp_path):
    killed = tmp_path / "bench-test"
    shutil.copytree(bench_dir, killed, symlinks=True)
    bench = json.loads((killed / "bench.json").read_text())
    kept = [r for r in bench["records"] if r["method"] != "hr-oracle"]
    (killed / "bench.json").write_text(json.dumps({**bench, "complete": False, "records": kept, "rows": None}))
    shutil.rmtree(killed / "runs" / "hr-oracle-seed0")  # killed before the oracle's run finished
    before = {r["method"]: r for r in kept}
    run_bench(tiny_budget(), killed, data=bench["data"], progress=False)
    after = json.loads((killed / "bench.json").read_text())
    assert after["complete"] and [r["method"] for r in after["records"]] == list(METHOD_NAMES)
    def without_final_latency(record):  # the one measurement every run of the bench makes again
        return {**record, "inference": {k: v for k, v in record["inference"].items() if k != "paired"}}

    for record in after["records"]:
        assert "paired" in record["inference"]
        if record["method"] in before:
            assert without_final_latency(record) == without_final_latency(before[record["method"]])  # reused
    assert {row["method"] for row in after["rows"]} == set(METHOD_NAMES)
    assert after["reused_records"] == len(METHOD_NAMES) - 1
    assert f"which reused {len(METHOD_NAMES) - 1} methods' runs" in (killed / "bench.md").read_text()


@pytest.mark.slow  # the whole bench, every method trained (one module fixture)
def test_existing_output_is_refused_and_left_untouched(bench_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded benchmark would be generated into ./data
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in bench_dir.iterdir() if p.is_file()}
    data = json.loads((bench_dir / "bench.json").read_text())["data"]
    with pytest.raises(FileExistsError, match="another budget .*iters"):
        run_bench(dataclasses.replace(tiny_budget(), iters=3), bench_dir, data=data, progress=False)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in bench_dir.iterdir() if p.is_file()} == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sodlab bench"):
        run_bench(tiny_budget(), foreign, data=data, force=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- pieces ------------------------------------------------------------------------------------------

def test_oracle_data_maps_back_to_the_lr_frame(tiny_synth, tmp_path):
    """Perfect detections in the twin frame score AP 1 against the LR json once scaled by 1/k. The
    oracle's images are synth's written x2 twins, linked; data with x4 twins alone gets them
    area-averaged, the same pixels."""
    linked, note = prepare_oracle_data(tiny_synth, 2, tmp_path / "linked", ("train", "val"))
    assert "val: the written twins" in note and (linked / "val").resolve() == (tiny_synth / "val_x2").resolve()
    only_x4 = tmp_path / "only-x4"
    shutil.copytree(tiny_synth, only_x4, ignore=shutil.ignore_patterns("*_x2"))
    out, note = prepare_oracle_data(only_x4, 2, tmp_path / "oracle", ("train", "val"))
    assert "x4 twins area-averaged by 2" in note
    for name in ("000001.png", "000006.png"):
        averaged, written = (np.asarray(Image.open(root / "val" / name)) for root in (out, linked))
        assert np.array_equal(averaged, written)
    lr = load_coco_json(tiny_synth / "annotations" / "instances_val.json")
    hr = load_coco_json(out / "annotations" / "instances_val.json")
    assert hr["images"][0]["width"] == 2 * lr["images"][0]["width"]
    assert hr["annotations"][0]["bbox"] == [2 * v for v in lr["annotations"][0]["bbox"]]
    assert hr["annotations"][0]["area"] == pytest.approx(4 * lr["annotations"][0]["area"])
    # the x2 twin is the x4 twin area-averaged: it reduces to the LR image (up to rounding twice)
    twin = np.asarray(Image.open(out / "val" / "000001.png"), dtype=np.float64)
    low = np.asarray(Image.open(tiny_synth / "val" / "000001.png"), dtype=np.float64)
    assert twin.shape == (256, 256, 3)
    assert np.abs(twin.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3)) - low).max() <= 1.0

    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in hr["annotations"]]
    stats = coco_eval(tiny_synth / "annotations" / "instances_val.json", scale_results(perfect, 1 / 2))
    assert stats["AP"] == pytest.approx(1.0)


def test_oracle_renders_twins_from_scenes_or_is_skipped(tiny_synth, tmp_path):
    data = tmp_path / "no-twins"
    shutil.copytree(tiny_synth, data, ignore=shutil.ignore_patterns("*_x[0-9]*"))
    out, note = prepare_oracle_data(data, 2, tmp_path / "oracle", ("val",))
    assert "rendered from the scene files" in note and len(list((out / "val").glob("*.png"))) == 6
    (data / "annotations" / "scenes_val.json").unlink()
    out, note = prepare_oracle_data(data, 2, tmp_path / "oracle2", ("val",))
    assert out is None and note.startswith("HR oracle skipped")


def test_bench_takes_the_twin_scale_of_converted_data(tmp_path):
    """Data converted with --twins 3 has train_x3/ and val_x3/, which cannot serve the recipe's x2:
    the SR methods super-resolve x3 and cut their HR patches from those twins. Data with x2 twins,
    or x4 twins (area-averaged by 2), serves the recipe as it is, and so does a budget that sets
    the scale itself."""
    from sodlab.bench import fit_twin_scale, resolve_hr_source

    budget = tiny_budget()
    for folder in ("train", "val", "train_x3", "val_x3", "val_x5"):
        (tmp_path / folder).mkdir()
    fitted, note = fit_twin_scale(budget, tmp_path)
    assert (fitted.sr["scale"], fitted.oracle_scale) == (3, 3) and "x3 twins, which cannot serve x2" in note
    assert resolve_hr_source(fitted, tmp_path)[0] == "twin"
    assert resolve_hr_source(budget, tmp_path)[0] == "image"
    assert fit_twin_scale(dataclasses.replace(budget, sr={"scale": 2}), tmp_path) == (
        dataclasses.replace(budget, sr={"scale": 2}), None)
    for folder in ("train_x4", "val_x4"):
        (tmp_path / folder).mkdir()
    assert fit_twin_scale(budget, tmp_path) == (budget, None)
    source, note = resolve_hr_source(budget, tmp_path)
    assert source == "twin" and "train_x4/, area-averaged by 2" in note


class CentreDetector(torch.nn.Module):
    """Detects one 8 x 8 object at the centre of its input: SAHI must shift each slice's box into place."""

    def forward(self, images):
        out = []
        for image in images:
            cx, cy = image.shape[-1] / 2, image.shape[-2] / 2
            out.append({"boxes": torch.tensor([[cx - 4, cy - 4, cx + 4, cy + 4]]), "labels": torch.tensor([1]),
                        "scores": torch.tensor([0.9])})
        return out


def test_sahi_slices_map_back_to_image_pixels():
    from sahi.slicing import get_slice_bboxes

    model = sahi_detection_model(CentreDetector(), ["__background__", "thing"], torch.device("cpu"))
    out = sahi_predict(model, np.zeros((128, 128, 3), dtype=np.uint8), slice_size=64, overlap=0.25)
    slices = get_slice_bboxes(128, 128, 64, 64, overlap_height_ratio=0.25, overlap_width_ratio=0.25)
    assert len(slices) == 9  # 3 x 3 slices of 64 px starting at 0, 48 and 64 (the last one clamped)
    centres = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in slices] + [(64.0, 64.0)]  # + the full image
    expected = sorted((cx - 4, cy - 4, cx + 4, cy + 4) for cx, cy in centres)
    assert sorted(map(tuple, out["boxes"].tolist())) == expected
    assert out["labels"].tolist() == [1] * 10


class _DriftingClock:
    """A fake clock on which method A's call takes 2 units and B's 3, times a machine that slows
    down call after call: timed one after the other, B looks twice as slow as it is."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def __call__(self):
        return self.now

    def run(self, units: float):
        self.calls += 1
        self.now += units * (1 + self.calls / 10)  # the machine slows down call after call


def test_interleaved_latency_cancels_a_drifting_machine_speed():
    from sodlab.bench.measure import interleaved_latency

    clock = _DriftingClock()
    predictors = {"A": (lambda image: clock.run(2.0), [None]), "B": (lambda image: clock.run(3.0), [None, None])}
    result = interleaved_latency(predictors, rounds=6, per_round=4, warmup=1, clock=clock)
    assert result["A"]["ratio"] == 1.0
    # in turns, each round's B over A is close to 3 / 2 whatever the speed; the drift within a round remains
    assert 1.4 < result["B"]["ratio"] < 1.7
    assert clock.calls == 2 * (1 + 6 * 4)  # one warm-up and 24 timed calls each
    # one method after the other, the same calls put B at 3x A: what the turns fix
    clock = _DriftingClock()
    sequential = {name: interleaved_latency({name: predictors[name]}, 6, 4, 1, clock)[name]["median_ms"]
                  for name in ("A", "B")}
    assert sequential["B"] / sequential["A"] > 2.5


def _pid_and_peak(_job):
    return os.getpid(), peak_rss_mb()


def _killed_bench(pid_file: str) -> None:  # a bench whose measurement would run for minutes
    run_measurement(_write_pid_and_sleep, pid_file, isolate=True)


def _write_pid_and_sleep(pid_file: str) -> None:
    Path(pid_file + ".part").write_text(str(os.getpid()))
    os.replace(pid_file + ".part", pid_file)  # the test never reads a half-written pid
    time.sleep(300)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_killed_benchs_measurement_ends_with_it(tmp_path):
    pid_file = tmp_path / "measurement.pid"
    bench = multiprocessing.get_context("spawn").Process(target=_killed_bench, args=(str(pid_file),))
    bench.start()
    deadline = time.monotonic() + 120
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    measurement = int(pid_file.read_text())
    assert _alive(measurement)
    os.kill(bench.pid, signal.SIGKILL)
    bench.join()
    deadline = time.monotonic() + 30
    while _alive(measurement) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(measurement)


def test_batch1_peak_rss_leaves_out_what_loading_freed():
    ballast = np.ones(300 * 2**20 // 8)  # a transient of loading, freed before inference
    del ballast
    before = peak_rss_mb()
    held = np.ones(50 * 2**20 // 8)  # what inference holds: counted
    speed, peak = batch1_speed_and_peak(lambda image: image.sum(), [held], count=3, warmup=1)
    assert speed["images"] == 3 and peak < before - 200
    assert peak >= held.nbytes / 2**20


def test_isolated_measurement_has_its_own_pid_and_peak_rss():
    ballast = np.ones(300 * 2**20 // 8)  # make this process's peak RSS large
    pid, peak = run_measurement(_pid_and_peak, None, isolate=True)
    assert pid != os.getpid()
    # ru_maxrss would report at least this process's peak (inherited across fork + exec); VmHWM does not
    assert peak < peak_rss_mb() - 200
    del ballast


# --- the paper's configuration ---------------------------------------------------------------------------

def test_iters_flag_overrides_the_budget_for_every_method(tmp_path):
    budget = budget_from_args(parse(["--budget", "default", "--iters", "600", "--sr-iters", "150"]))
    assert (budget.iters, budget.sr_iters) == (600, 150)
    configs = {m.name: train_config(budget, m.train_as, tmp_path / m.name, "data/synth",
                                    detector_run=tmp_path / "baseline")
               for m in METHODS if m.train_as}
    assert {c.iters for m, c in configs.items() if not m.startswith("sr")} == {600}
    assert {c.iters for m, c in configs.items() if m.startswith("sr")} == {150}
    branched = budget_from_args(parse(["--budget", "default", "--hires-branch-iters", "100"]))
    oracle = train_config(branched, "hr-oracle", tmp_path / "o", "data/synth", detector_run=tmp_path / "baseline")
    assert (oracle.iters, oracle.continue_at, oracle.continue_from) == (600, 500, str(tmp_path / "baseline"))
    warm = budget_from_args(parse(["--budget", "default", "--hires-branch-lr-restart", "0.5"]))
    assert train_config(warm, "upscale", tmp_path / "u", "data/synth",
                        detector_run=tmp_path / "baseline").restart_lr == 0.5
    with pytest.raises(ValueError, match="--hires-branch-lr-restart must not be below 0"):
        budget_from_args(parse(["--hires-branch-lr-restart", "-1"]))
    with pytest.raises(ValueError, match="--hires-branch-iters must be at least 0"):
        budget_from_args(parse(["--hires-branch-iters", "-1"]))
    with pytest.raises(ValueError, match="--hires-branch-iters 600 must be below"):
        budget_from_args(parse(["--budget", "default", "--hires-branch-iters", "600"]))
    assert {c.optimizer for c in configs.values()} == {"adamw"}
    with pytest.raises(ValueError, match="--iters"):
        budget_from_args(parse(["--iters", "0"]))
    slower = budget_from_args(parse(["--budget", "default", "--lr", "7e-4"]))
    assert {train_config(slower, m.train_as, tmp_path / m.name, "data/synth", detector_run=tmp_path / "baseline").lr
            for m in METHODS if m.train_as and not m.shares_detector} == {7e-4}
    with pytest.raises(ValueError, match="--lr must be positive"):
        budget_from_args(parse(["--lr", "0"]))
    # The recipe's D is built on the detector, with G at x2 and L_MSE x100 (D's class and box terms
    # drown G's pixel term at the compact D's weight); the flag gives all five SR variants the
    # compact D with its own recipe.
    def recipe(flags: list[str]) -> dict[str, tuple]:
        budget = budget_from_args(parse(["--budget", "default", *flags]))
        configs = {m.name: train_config(budget, m.train_as, tmp_path / m.name, "data/synth",
                                        detector_run=tmp_path / "baseline") for m in METHODS if m.shares_detector}
        return {name: (c.sr.discriminator_trunk, c.sr.scale, c.sr_train.weights.mse) for name, c in configs.items()}

    assert set(recipe([]).values()) == {("detector", 2, 100.0)} and len(recipe([])) == 5
    assert set(recipe(["--sr-discriminator-trunk", "compact"]).values()) == {("compact", 4, 10.0)}
    assert set(recipe(["--sr-discriminator-trunk", "detector"]).values()) == {("detector", 2, 100.0)}


def test_no_amp_trains_every_method_in_float32(tmp_path):
    # what a CPU without bf16 runs, measurable on a machine with it
    budgets = {flag: budget_from_args(parse(["--budget", "default", *flag])) for flag in ((), ("--no-amp",))}
    for flag, budget in budgets.items():
        configs = [train_config(budget, m.train_as, tmp_path / m.name, "data/synth", detector_run=tmp_path / "baseline")
                   for m in METHODS if m.train_as]
        assert {c.amp for c in configs} == {not flag}
        assert {c.sr.amp for c in configs if c.is_sr} == {not flag}  # G and D at inference too
    assert "float32" in budgets[("--no-amp",)].describe() and "float32" not in budgets[()].describe()
    # ... and bench.md says how G and D ran
    header = {"environment": {"device": "cpu", "bf16": True}}
    assert "bfloat16" in sr_precision({**header, "sr_amp": sr_settings(budgets[()])["amp"]})
    assert "float32 (amp off)" in sr_precision({**header, "sr_amp": sr_settings(budgets[("--no-amp",)])["amp"]})
    assert "no native bf16" in sr_precision({"environment": {"device": "cpu", "bf16": False}, "sr_amp": True})


def test_bench_md_can_say_how_every_gate_rank_chooses_and_whether_it_shares():
    # bench.md describes the gate from GATE_RANKS; a rank the config accepts but bench.md cannot
    # name would fail the report at its end, after hours of training
    assert set(GATE_RANKS) == set(CHOICES["gate_rank"])
    # the recipe's gate shares D's answers, and bench.md says at which IoU; a plain gate says nothing more
    shares = sr_settings(budget_from_args(parse(["--budget", "default"])))["gate_share_iou"]
    assert shares > 0 and f"above {shares:g}" in gate_sharing({"sr_gate_share_iou": shares})
    assert gate_sharing({}) == gate_sharing({"sr_gate_share_iou": 0.0}) == ""


def test_paper_budget_is_the_1x_schedule_at_coco_scale(tmp_path):
    budget = budget_from_args(parse(["--paper"]))
    assert budget.presets == ("r50", "r50-fpn", "r101", "r101-fpn")
    cfg = train_config(budget, "baseline", tmp_path / "run", "data/coco", preset_name="r101-fpn")
    assert (cfg.iters, cfg.batch_size, cfg.lr, cfg.schedule) == (90_000, 16, 0.02, "step")
    assert (cfg.optimizer, cfg.weight_decay) == ("sgd", 1e-4)  # torchvision's reference recipe, not AdamW
    assert (cfg.detector.min_size, cfg.detector.max_size, cfg.detector.pretrained) == (800, 1333, True)
    assert (cfg.train_split, cfg.val_split) == ("train2017", "val2017")
    sr = train_config(budget, "sr", tmp_path / "sr", "data/coco", preset_name="r101-fpn", detector_run=tmp_path / "run")
    assert sr.sr_train.schedule == "staged" and sr.sr.discriminator_trunk == "resnet50"


@pytest.fixture
def tiny_coco(tiny_synth, tmp_path):
    """A COCO 2017-shaped copy of the tiny set: train2017/val2017, no twins, no scene files."""
    out = tmp_path / "coco"
    (out / "annotations").mkdir(parents=True)
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        shutil.copytree(tiny_synth / split, out / coco_split)
        shutil.copy(tiny_synth / "annotations" / f"instances_{split}.json",
                    out / "annotations" / f"instances_{coco_split}.json")
    return out


@pytest.mark.slow  # the paper's four R50/R101 detectors built and stepped
def test_paper_dry_run_on_a_handful_of_images(tiny_coco, tmp_path):
    """Both backbone depths, with and without FPN, every kind of method (the oracle: skipped, no twins)."""
    out = cmd_bench(parse(["--paper", "--dry-run", "--data", str(tiny_coco), "--no-pretrained",
                               "--threads", "1", "--runs", str(tmp_path / "runs"),
                               "--presets", "r50,r101-fpn", "--methods", "baseline,sahi,sr,hr-oracle"]))
    bench = json.loads((out / "bench.json").read_text())
    assert out.name == "bench-paper-dry-run"
    assert [(r["preset"], r["method"]) for r in bench["rows"]] == [
        (p, m) for p in ("r50", "r101-fpn") for m in ("baseline", "sahi", "sr")]
    assert any(note.startswith("HR oracle skipped") for note in bench["notes"])
    assert {r["backbone"] for r in bench["rows"]} == {"ResNet-50", "ResNet-101-FPN"}
    for record in bench["records"]:
        assert record["training"]["iters"] == 2 and record["inference"]["torch_threads"] == 1
        assert all(math.isfinite(record["eval"][k]) for k in ("AP", "APs"))

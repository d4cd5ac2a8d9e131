"""sodlab.recipes and sodlab.runs: budgets, one train_config for every caller, the data check,
reuse of finished runs; and the one-way import rule of the package."""
import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest

from sodlab import recipes, runs
from sodlab.io import read_json

ROOT = Path(__file__).resolve().parent.parent


def test_project_root_is_found_from_the_notebooks_folder_and_the_root(tmp_path):
    assert recipes.project_root(ROOT / "notebooks") == ROOT
    assert recipes.project_root(ROOT / "sodlab" / "data") == ROOT
    assert recipes.project_root(tmp_path) == ROOT  # this checkout is where sodlab was imported from


def test_the_env_var_picks_a_budget_and_paths_live_under_the_root(monkeypatch):
    monkeypatch.setenv("SODLAB_BUDGET", "demo")
    demo = recipes.get_budget()
    assert demo.data_dir() == ROOT / "data" / "synth" and demo.runs_dir() == ROOT / "runs" / "demo"
    assert recipes.get_budget("quick").runs_dir() == ROOT / "runs" / "notebooks" / "quick"
    monkeypatch.setenv("SODLAB_BUDGET", "huge")
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        recipes.get_budget()


def test_train_config_follows_the_budget(tmp_path):
    budget = recipes.get_budget("quick")
    with pytest.raises(ValueError, match="detector_run"):
        recipes.train_config(budget, "sr", tmp_path / "sr")
    cfg = recipes.train_config(budget, "sr-no-adv", tmp_path / "sr", detector_run=tmp_path / "baseline")
    assert cfg.out == str(tmp_path / "sr") and cfg.data == str(budget.data_dir())
    assert cfg.iters == budget.sr_iters and cfg.detector.min_size == 128
    assert cfg.sr_train.hr_source == "twin" and cfg.sr_train.rois_per_image == 8
    # the staged schedule on the detector run: every SR row of a seed shares that detector
    assert cfg.sr_train.schedule == "staged" and cfg.init_from == str(tmp_path / "baseline")
    assert cfg.sr.fusion == "mean"
    assert cfg.sr.generator_upsample_channels == 8  # the recipe's cheap G; the paper budget keeps SRGAN's x2 stages
    paper = recipes.train_config(recipes.get_budget("paper"), "sr", tmp_path / "p", detector_run=tmp_path / "baseline")
    assert paper.sr.generator_upsample_channels == 0
    assert cfg.sr_train.weights.adv == 0.0  # the variant's switch is applied on top
    baseline = recipes.train_config(budget, "baseline", tmp_path / "b2", iters=3)
    assert baseline.iters == 3 and baseline.init_from == "" and baseline.ckpt_every == 3
    oracle = recipes.train_config(budget, "hr-oracle", tmp_path / "o", detector_run=tmp_path / "baseline")
    assert oracle.detector.min_size == budget.oracle_scale * 128  # the twins are not resized back down


def test_upscale_and_the_oracle_branch_off_the_baseline_when_the_budget_says_so(tmp_path):
    budget = dataclasses.replace(recipes.get_budget("quick"), hires_branch_iters=6)
    baseline = recipes.train_config(budget, "baseline", tmp_path / "b", detector_run=tmp_path / "other")
    assert (baseline.keep_checkpoint_at, baseline.continue_from, baseline.iters) == (budget.iters - 6, "", budget.iters)
    for method in recipes.HIRES_METHODS:
        with pytest.raises(ValueError, match="detector_run"):
            recipes.train_config(budget, method, tmp_path / method)
        cfg = recipes.train_config(budget, method, tmp_path / method, detector_run=tmp_path / "baseline")
        assert (cfg.continue_from, cfg.continue_at) == (str(tmp_path / "baseline"), budget.iters - 6)
        # the baseline's schedule, not one of its own
        assert (cfg.iters, cfg.warmup_iters, cfg.lr, cfg.init_from) == (budget.iters, budget.warmup_iters, budget.lr, "")
        assert (cfg.restart_at, cfg.restart_lr) == (0, 0.0)
    warm = dataclasses.replace(budget, hires_branch_lr_restart=0.3)  # every detector restarts at the branch point
    for method in ("baseline", *recipes.HIRES_METHODS):
        cfg = recipes.train_config(warm, method, tmp_path / method, detector_run=tmp_path / "baseline")
        assert (cfg.restart_at, cfg.restart_lr) == (budget.iters - 6, 0.3)
    sr = recipes.train_config(warm, "sr", tmp_path / "sr", detector_run=tmp_path / "baseline")
    assert (sr.restart_at, sr.restart_lr, sr.iters) == (0, 0.0, budget.sr_iters)  # the SR branch's own schedule
    scratch = dataclasses.replace(budget, hires_branch_iters=0)
    for method in ("baseline", "upscale"):
        cfg = recipes.train_config(scratch, method, tmp_path / method, detector_run=tmp_path / "baseline")
        assert (cfg.continue_from, cfg.keep_checkpoint_at, cfg.iters) == ("", 0, budget.iters)


def test_configs_are_frozen():
    cfg = recipes.train_config(recipes.get_budget("quick"), "baseline", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.iters = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.detector.min_size = 5


def _tiny_budget(tiny_synth, tmp_path) -> recipes.Budget:
    return dataclasses.replace(recipes.get_budget("quick"), name="tiny", data=str(tiny_synth),
                               runs=str(tmp_path / "runs"), iters=2, sr_iters=1, batch_size=2, warmup_iters=1,
                               detector=dict(recipes.SMALL_DETECTOR, rpn_post_nms_top_n_train=100,
                                             box_batch_size_per_image=32, rpn_post_nms_top_n_test=50),
                               sr_train=dict(rois_per_image=4))


@pytest.mark.slow
def test_ensure_run_trains_what_is_missing_once_then_reuses_it(tiny_synth, tmp_path):
    budget = _tiny_budget(tiny_synth, tmp_path)
    base_dir, sr_dir = budget.runs_dir() / "baseline", budget.runs_dir() / "sr"
    base_cfg = recipes.train_config(budget, "baseline", base_dir)
    sr_cfg = recipes.train_config(budget, "sr", sr_dir, detector_run=base_dir)
    assert runs.ensure_run(sr_cfg, train_missing=False) is None
    assert runs.ensure_method(budget, "sr", train_missing=True, progress=False) == sr_dir  # the baseline first
    assert runs.run_is_complete(base_dir, base_cfg) and runs.run_is_complete(sr_dir, sr_cfg)
    assert (sr_dir / "sr_quality.json").is_file()
    checkpoints = [d / "checkpoints" / "last.pt" for d in (base_dir, sr_dir)]
    before = [p.stat().st_mtime_ns for p in checkpoints]
    assert runs.ensure_run(base_cfg, progress=False) == base_dir
    assert runs.ensure_run(sr_cfg, progress=False) == sr_dir
    assert [p.stat().st_mtime_ns for p in checkpoints] == before  # reused, not retrained
    # a baseline trained again makes the SR run built on it stale
    os.utime(checkpoints[0], ns=(before[1] + 10**9, before[1] + 10**9))
    assert runs.ensure_run(sr_cfg, train_missing=False) is None
    # another config in the same place is not reused
    longer = dataclasses.replace(base_cfg, iters=3)
    assert runs.config_mismatch(base_dir, longer) == ["iters"]
    other_gate = dataclasses.replace(sr_cfg, sr=dataclasses.replace(sr_cfg.sr, gate_top_k=sr_cfg.sr.gate_top_k + 1))
    assert runs.config_mismatch(sr_dir, other_gate) == ["sr.gate_top_k"]  # the field, not all of sr
    assert runs.ensure_run(longer, train_missing=False) is None
    assert runs.completed_runs(budget.runs_dir(), ["sr-no-adv", "baseline", "sr"]) == {"baseline": base_dir,
                                                                                      "sr": sr_dir}
    assert read_json(base_dir / "config.json")["sodlab_run"] == 1


def test_the_demo_budget_names_the_command_when_its_runs_are_missing(tmp_path):
    budget = dataclasses.replace(recipes.get_budget("demo"), runs=str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="make demo"):
        runs.ensure_method(budget, "baseline")


def test_ensure_data_refuses_a_benchmark_without_twins_or_of_another_size(tmp_path):
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    info = {"sodlab_synth": {"size": [128, 128], "hr_scale": 4}}
    for split in ("train", "val"):
        (data / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"info": info, "images": [], "annotations": [], "categories": []}))
    quick = recipes.get_budget("quick")
    with pytest.raises(ValueError, match="sodlab synth --out"):
        recipes.ensure_data(quick, data, progress=False)  # no train_x4/
    for split in ("train", "val"):
        (data / f"{split}_x4").mkdir()
    assert recipes.ensure_data(quick, data, progress=False) == data
    with pytest.raises(ValueError, match="needs {'size': \\[256, 256\\]"):
        recipes.ensure_data(recipes.get_budget("demo"), data, progress=False)


def test_ensure_data_never_writes_into_a_foreign_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        recipes.ensure_data(recipes.get_budget("quick"), folder, progress=False)
    assert (folder / "notes.txt").read_text() == "keep me"


# --- the one-way import rule ------------------------------------------------------------------------

# data -> models -> train -> evaluate -> bench / explore / viz -> cli: each module may import only
# modules of its own layer or a lower one (config, io, and the plain helpers sit at the bottom).
LAYERS = [
    {"sodlab", "sodlab.config", "sodlab.io", "sodlab.rng", "sodlab.rundir"},
    {"sodlab.data", "sodlab.data.coco", "sodlab.data.synth", "sodlab.data.oracle", "sodlab.data.convert",
     "sodlab.data.tiles", "sodlab.data.check"},
    {"sodlab.patches", "sodlab.losses", "sodlab.models", "sodlab.models.detector", "sodlab.models.generator",
     "sodlab.models.discriminator", "sodlab.models.sr_detector", "sodlab.models.sahi_adapter", "sodlab.models.roi_pool",
     "sodlab.distributed", "sodlab.sr_quality"},
    {"sodlab.recipes", "sodlab.pretrain"},
    {"sodlab.train"},
    {"sodlab.evaluate", "sodlab.errors", "sodlab.tiny_metrics"},
    {"sodlab.runs"},
    {"sodlab.viz", "sodlab.explore"},
    {"sodlab.bench", "sodlab.bench.methods", "sodlab.bench.measure", "sodlab.bench.report", "sodlab.bench.stats"},
    {"sodlab.cli"},
    {"sodlab.__main__"},
]


def import_graph() -> dict[str, set[str]]:
    """{module: the sodlab modules it imports}, read from the source (top level and function bodies)."""
    graph = {}
    for path in sorted((ROOT / "sodlab").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sodlab"):
                imported.add(node.module)
                imported |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("sodlab")}
        graph[module] = imported & {m for m in _all_modules()} - {module}
    return graph


def _all_modules() -> set[str]:
    return set().union(*LAYERS)


def test_every_module_has_a_layer():
    modules = set(import_graph())
    assert modules <= _all_modules(), f"unplaced modules: {sorted(modules - _all_modules())}"


def test_imports_point_one_way():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    upward = [(m, dep) for m, deps in import_graph().items() for dep in deps if layer[dep] > layer[m]]
    assert not upward, f"imports that point up: {upward}"


def test_a_budgets_learned_ap_holds_on_its_own_data_only(tmp_path):
    from sodlab.recipes import get_budget, learned_ap_on, learned_note

    default = get_budget("default")
    assert learned_ap_on(default, default.data_dir()) == 20.0
    assert learned_ap_on(default, tmp_path) is None  # another dataset: the claim was measured on the embedded one
    assert learned_ap_on(get_budget("quick"), get_budget("quick").data_dir()) is None  # quick claims nothing
    assert "reached AP 12.7, under the 20 at which the default budget" in learned_note(20.0, 12.7, "default")
    assert learned_note(20.0, 20.0, "default") is None
    assert learned_note(20.0, -100.0, "default") is None  # COCO's -1: no ground truth, no claim
    assert learned_note(None, 12.7, "default") is None  # no claim (another dataset, the quick budget)

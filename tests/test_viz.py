"""sodlab.viz: statistics, PSNR/SSIM, the SR inspection and its widgets."""
import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from sodlab import viz
from sodlab.data.coco import load_split
from sodlab.models import build_model
from sodlab.config import SRConfig

ROOT = Path(__file__).resolve().parent.parent


# --- data statistics --------------------------------------------------------------------------

@pytest.fixture
def hand_coco(tmp_path):
    """A split with hand-picked areas: 10x10 and 20x20 (small), 50x50 (medium), 100x100 (large), a crowd."""
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    anns = [(1, 1, 1, 100.0), (2, 1, 2, 400.0), (3, 2, 2, 2500.0), (4, 2, 1, 10000.0)]
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200},
                       {"id": 2, "file_name": "b.png", "width": 200, "height": 200}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": i, "image_id": im, "category_id": c, "area": a, "iscrowd": 0,
                             "bbox": [0, 0, math.sqrt(a), math.sqrt(a)]} for i, im, c, a in anns]
            + [{"id": 5, "image_id": 2, "category_id": 1, "area": 50.0, "iscrowd": 1, "bbox": [0, 0, 5, 10]}]}
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return tmp_path


def test_split_statistics_counts_classes_by_bucket_without_crowds(hand_coco):
    stats = viz.split_statistics(hand_coco, "val")
    assert stats["images"] == 2 and stats["objects"] == 4
    assert stats["per_class"] == {"cat": {"small": 1, "medium": 0, "large": 1},
                                  "dog": {"small": 1, "medium": 1, "large": 0}}
    assert stats["per_bucket"] == {"small": 2, "medium": 1, "large": 1}
    assert sorted(stats["sides"]) == [10, 20, 50, 100]
    assert list(stats["objects_per_image"]) == [2, 2]
    table = viz.format_statistics(stats)
    assert "| cat | 1 | 0 | 1 | 2 |" in table and "| **all** | 2 (50%) | 1 (25%) | 1 (25%) | 4 |" in table


def test_size_histogram_marks_cocos_bounds_on_a_log_axis(hand_coco):
    fig = viz.plot_size_histogram(viz.split_statistics(hand_coco, "val")["sides"])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    vertical = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert vertical == [32, 96]
    shares = {t.get_text() for t in ax.texts}
    assert shares == {"small\n50%", "medium\n25%", "large\n25%"}
    assert sum(bar.get_height() for bar in ax.containers[0]) == 4  # every object in some bar


def test_image_grid_draws_every_box_in_its_bucket_colour(hand_coco):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (200, 200)).save(hand_coco / "val" / name)
    fig = viz.plot_image_grid(hand_coco, "val", ncols=2)
    from matplotlib.colors import to_rgba

    colours = [p.get_edgecolor() for ax in fig.axes for p in ax.patches]
    assert len(colours) == 4  # the crowd region is left out
    assert colours.count(to_rgba(viz.BUCKET_COLOURS["small"])) == 2
    assert colours.count(to_rgba(viz.BUCKET_COLOURS["medium"])) == 1
    assert colours.count(to_rgba(viz.BUCKET_COLOURS["large"])) == 1


def test_twin_figure_crops_the_same_region_at_k_times_the_pixels(tiny_synth):
    ann = viz.pick_small_object(tiny_synth, "val", 1)
    fig = viz.plot_lr_hr_twin(tiny_synth, "val", 1, ann, k=4, crop_side=24)
    lr_crop, hr_crop = (ax.images[0].get_array() for ax in fig.axes[1:3])
    assert lr_crop.shape[:2] == (24, 24) and hr_crop.shape[:2] == (96, 96)
    # the twin reduces to the LR image: the crops agree after 4x4 area averaging
    reduced = hr_crop.astype(np.float64).reshape(24, 4, 24, 4, 3).mean(axis=(1, 3))
    assert np.abs(reduced - lr_crop.astype(np.float64)).max() <= 1.0


# --- training curves and evaluation -----------------------------------------------------------

def test_moving_average_is_a_trailing_mean():
    assert viz.moving_average([1, 2, 3, 4], 2).tolist() == [1, 1.5, 2.5, 3.5]
    assert viz.moving_average([1, 2, 3, 4], 3).tolist() == [1, 1.5, 2, 3]
    assert viz.moving_average([5, 7], 1).tolist() == [5, 7]


def _write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_metric_series_skips_records_without_the_key(tmp_path):
    _write_metrics(tmp_path / "r", [{"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.0, "d_adv": 0.7},
                                    {"iter": 3, "loss": 0.5, "d_adv": 0.6}])
    records = viz.read_metrics(tmp_path / "r")
    its, values = viz.metric_series(records, "d_adv")
    assert its.tolist() == [2, 3] and values.tolist() == [0.7, 0.6]
    (tmp_path / "r" / "metrics.jsonl").write_text('{"iter": 1}\n{"iter": 2,\n{"iter": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        viz.read_metrics(tmp_path / "r")
    (tmp_path / "r" / "metrics.jsonl").write_text('{"iter": 1}\n{"iter": 2,\n')  # a torn last line: dropped
    with pytest.warns(UserWarning, match="torn last line 2"):
        assert viz.read_metrics(tmp_path / "r") == [{"iter": 1}]


def test_gan_figure_has_d_g_and_balance_panels(tmp_path):
    records = [{"iter": i, "loss": 1.0 / i, "d_adv": 1.3, "d_cls": 2.0, "d_reg": 0.5, "d_real_prob": 0.6,
                "d_fake_prob": 0.4, "g_adv": 0.7, "g_cls": 1.2, "g_reg": 0.3, "g_mse": 0.002, "g_tv": 0.02}
               for i in range(1, 11)]
    _write_metrics(tmp_path / "sr", records)
    _write_metrics(tmp_path / "base", [{"iter": i, "loss": 2.0 / i} for i in range(1, 11)])
    fig = viz.plot_gan_losses(tmp_path / "sr", smooth=3)
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert labels == [list(viz.D_TERMS), list(viz.G_TERMS), list(viz.ADVERSARIAL_BALANCE)]
    assert fig.axes[1].get_yscale() == "log"
    # a baseline run logs no GAN terms: the panels say so instead of failing
    fig = viz.plot_gan_losses(tmp_path / "base")
    assert all(ax.get_legend() is None for ax in fig.axes)
    fig = viz.plot_detector_losses({"base": tmp_path / "base", "sr": tmp_path / "sr"}, keys=("loss",), smooth=1)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["base", "sr"]


def test_ap_by_size_leaves_bins_without_ground_truth_out(tmp_path):
    bins = {b: {"AP": 0.1 * i, "num_gt": 10 * i} for i, b in enumerate(viz.FINE_BIN_LABELS)}
    bins[">128"] = {"AP": -1.0, "num_gt": 0}
    for name in ("baseline", "sr"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"AP": 0.2, "fine_bins": bins}))
    rows = viz.read_evals({"baseline": tmp_path / "baseline", "sr": tmp_path / "sr", "missing": tmp_path / "no"})
    assert [name for name, _ in rows] == ["baseline", "sr"]
    fig = viz.plot_ap_by_size(rows)
    line = fig.axes[0].get_lines()[0]
    assert np.allclose(line.get_ydata()[:5], [0, 10, 20, 30, 40]) and np.isnan(line.get_ydata()[5])
    assert fig.axes[0].get_xticklabels()[1].get_text() == "8-16\n(n=10)"


def test_sr_quality_table_lists_the_runs_that_measured_it(tmp_path):
    quality = {"rois": 40, "hr_source": "twin", "method": "G", "sr": {"psnr": 27.514, "ssim": 0.8123},
               "bicubic": {"psnr": 26.0, "ssim": 0.8}}
    for name, q in (("sr", quality), ("sr-tiny", {"rois": 0, "note": "no real HR target"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sr_quality.json").write_text(json.dumps(q))
    (tmp_path / "baseline").mkdir()
    table = viz.format_sr_quality({n: tmp_path / n for n in ("baseline", "sr", "sr-tiny")}).splitlines()
    assert table[2:] == ["| sr | 40 | G | 27.51 | 26.00 | 0.812 | 0.800 |", "| sr-tiny | 0 | no real HR target | | | | |"]


def test_bench_reports_newest_first(tmp_path):
    for name, mtime in (("bench-old", 1_000_000), ("bench-new", 2_000_000)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "bench.md").write_text(f"# {name}")
        os.utime(tmp_path / "runs" / name / "bench.md", (mtime, mtime))
    (tmp_path / "runs" / "baseline").mkdir()
    assert [p.parent.name for p in viz.bench_reports(tmp_path)] == ["bench-new", "bench-old"]


# --- SR inspection ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sr_model():
    from sodlab.config import make_config

    cfg = make_config("cpu", detector=dict(min_size=128, max_size=128, rpn_post_nms_top_n_test=60), method="sr",
                      # float32 G and D: these tests compare decoded boxes and scores to 1e-4 and 1e-5
                      sr=SRConfig(generator_channels=8, generator_blocks=1, amp=False))
    torch.manual_seed(0)
    return build_model(cfg, num_classes=9).eval()


@pytest.fixture(scope="module")
def val(tiny_synth):
    return load_split(tiny_synth, "val", train=False)


def test_match_gt_picks_the_best_candidate():
    rois = torch.tensor([[0, 0, 10, 10], [0, 0, 9, 10], [50, 50, 60, 60], [1, 0, 10, 10.]])
    candidates = torch.tensor([True, False, True, True])
    gt = torch.tensor([[0, 0, 9, 10], [100, 100, 110, 110.]])
    index, iou = viz.match_gt(rois, candidates, gt)
    # roi 1 would match exactly but is not a candidate; roi 3 (IoU 80/100) loses to roi 0 (90/100)
    assert index.tolist() == [0, -1]
    assert iou[0].item() == pytest.approx(0.9) and iou[1].item() == 0


def test_inspect_roi_agrees_with_the_detectors_own_scores(sr_model, val, tiny_synth):
    image = val[0][0].as_subclass(torch.Tensor)
    scored = viz.score_image(sr_model, image)
    small = torch.where(scored["sr_mask"])[0]
    assert len(small) > 0
    k = int(small[0])
    twin = viz.twin_tensor(tiny_synth, "val", val.ids[0], 4)
    view = viz.inspect_roi(sr_model, image, scored["rois"][k], twin)
    # what D said about this proposal inside score_proposals (fusion "replace")
    assert torch.allclose(view["d_probs"], scored["final_probs"][k], atol=1e-5)
    assert view["lr"].shape == (3, 16, 16) and view["sr"].shape == view["hr"].shape == (3, 64, 64)
    assert view["d_boxes"].shape == (9, 4)


def test_inspected_psnr_and_ssim_are_the_standard_ones(sr_model, val, tiny_synth):
    """The numbers shown next to the patches: PSNR by hand and skimage's SSIM (Wang et al.:
    gaussian 11x11 window, sigma 1.5, population covariance) on the very patches shown."""
    skimage_metrics = pytest.importorskip("skimage.metrics")
    image = val[1][0].as_subclass(torch.Tensor)
    twin = viz.twin_tensor(tiny_synth, "val", val.ids[1], 4)
    rois = torch.tensor([[10.0, 12.0, 30.0, 28.0], [60.0, 50.0, 66.0, 59.0]])
    views = viz.inspect_rois(sr_model, image, rois, twin)
    assert views["hr_valid"].tolist() == [True, False]  # 20 px across holds 64 twin pixels, 6 px does not
    for i in range(2):
        hr = views["hr"][i].permute(1, 2, 0).double().numpy()
        for name in ("bicubic", "sr"):
            patch = views[name][i].permute(1, 2, 0).double().numpy()
            assert views["psnr"][name][i] == pytest.approx(10 * np.log10(1 / np.mean((patch - hr) ** 2)), abs=1e-3)
            reference = skimage_metrics.structural_similarity(
                patch, hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                channel_axis=2)
            assert views["ssim"][name][i] == pytest.approx(reference, abs=1e-4)
    one = viz.inspect_roi(sr_model, image, rois[0], twin)
    assert one["psnr"]["sr"] == pytest.approx(views["psnr"]["sr"][0]) and one["hr_valid"] is True
    # without a twin there is no reference to score against
    assert viz.inspect_roi(sr_model, image, rois[0])["psnr"] == {}


def test_d_boxes_decode_t_sr_with_the_box_coder(sr_model, val):
    image = val[0][0].as_subclass(torch.Tensor)
    roi = torch.tensor([20.0, 30.0, 30.0, 50.0])  # 10 x 20 px
    box_head = sr_model.discriminator.box_head
    saved = box_head.weight.detach().clone(), box_head.bias.detach().clone()
    with torch.no_grad():
        box_head.weight.zero_()
        box_head.bias.zero_()
        box_head.bias[4 * 3 + 0] = 1.0  # class 3: dx = 1 / wx = 0.1 -> shift right by 0.1 * width
        box_head.bias[4 * 3 + 3] = 5 * math.log(2)  # class 3: dh = log 2 -> twice the height
    try:
        boxes = viz.inspect_roi(sr_model, image, roi)["d_boxes"]
    finally:
        with torch.no_grad():
            box_head.weight.copy_(saved[0])
            box_head.bias.copy_(saved[1])
    assert torch.allclose(boxes[1], roi)  # zero deltas leave the proposal where it is
    assert torch.allclose(boxes[3], torch.tensor([21.0, 20.0, 31.0, 60.0]), atol=1e-4)


@contextlib.contextmanager
def head_says_2_and_d_says_1(sr_model, **gate):
    """The box head always says class 2 and D always says class 1, with the SRDetector's
    attributes ``gate`` (gate_top_k=..., ...) set, until the block ends."""
    head = sr_model.detector.roi_heads.box_predictor.cls_score
    d_cls = sr_model.discriminator.cls_head
    saved = [p.detach().clone() for p in (head.weight, head.bias, d_cls.weight, d_cls.bias)]
    saved_gate = {name: getattr(sr_model, name) for name in gate}
    with torch.no_grad():
        for layer, label in ((head, 2), (d_cls, 1)):
            layer.weight.zero_()
            layer.bias.fill_(-10.0)
            layer.bias[label] = 10.0
    for name, value in gate.items():
        setattr(sr_model, name, value)
    try:
        yield
    finally:
        for name, value in saved_gate.items():
            setattr(sr_model, name, value)
        with torch.no_grad():
            for p, s in zip((head.weight, head.bias, d_cls.weight, d_cls.bias), saved):
                p.copy_(s)


def test_decision_changes_sorts_fixed_broken_and_changed(sr_model, val, tiny_synth):
    """The box head always says class 2, D always says class 1: every matched small object is a
    change, "fixed" exactly when it is a 1, "broken" when it is a 2."""
    with head_says_2_and_d_says_1(sr_model):
        changes = viz.decision_changes(sr_model, val, val.ids[:2], iou_threshold=0.1)
    assert changes, "an untrained RPN still proposes boxes over some small objects"
    for c in changes:
        assert (c["head_label"], c["sr_label"]) == (2, 1) and c["iou"] >= 0.1
        assert c["kind"] == {1: "fixed", 2: "broken"}.get(c["gt_label"], "changed")
        assert c["lr"].shape == (3, 16, 16) and c["sr_patch"].shape == (3, 64, 64)
    fig = viz.plot_decision_gallery(changes, val.class_names, "changed", max_items=3)
    assert len(fig.axes) == 2 * min(3, sum(c["kind"] == "changed" for c in changes))
    assert "no small object" in viz.plot_decision_gallery([], val.class_names, "fixed").axes[0].texts[0].get_text()


def test_decision_changes_count_the_proposals_that_took_a_sent_ones_answers(sr_model, val):
    """With the gate that shares D's answers, an object whose best proposal took a sent one's
    answers is a change too, shown with the patches D judged for it: the sent proposal's."""
    with head_says_2_and_d_says_1(sr_model, gate_top_k=8, gate_share_iou=0.2):
        changes = viz.decision_changes(sr_model, val, iou_threshold=0.1)
    shared = [c for c in changes if c["shared"]]
    assert shared, "the untrained RPN's proposals overlap: some small object's best one took a sent one's answers"
    for c in changes:
        assert (c["head_label"], c["sr_label"]) == (2, 1)
        assert c["shared"] == (not torch.equal(c["roi"], c["sent_roi"]))
    for c in shared:
        assert float(box_iou(c["roi"][None], c["sent_roi"][None])) > 0.2
        image = val[val.ids.index(c["image_id"])][0].as_subclass(torch.Tensor)
        sent, own = viz.inspect_roi(sr_model, image, c["sent_roi"]), viz.inspect_roi(sr_model, image, c["roi"])
        assert torch.allclose(c["lr"], sent["lr"], atol=1e-6) and torch.allclose(c["sr_patch"], sent["sr"], atol=1e-5)
        assert not torch.allclose(c["lr"], own["lr"], atol=1e-3)
    fig = viz.plot_decision_gallery(shared, val.class_names, shared[0]["kind"])
    assert any("(shared)" in ax.get_title() for ax in fig.axes)


def test_inspector_widgets_drive_the_view(sr_model, val, tiny_synth, monkeypatch):
    inspector = viz.SRInspector(sr_model, val, tiny_synth, "val")
    first_image = inspector.image_dropdown.options[0][1]
    assert inspector.state["image_id"] == first_image
    assert inspector.roi_slider.max >= 1  # the tiny val images have several small objects
    output = inspector.output.outputs[0]["data"]
    assert output["image/png"] and "D says" in inspector.info.value
    first_figure, first_gt = inspector.figure, inspector.state["gt_index"]
    # objects come best covered by a small proposal first, and each view shows that proposal
    sample = inspector.sample(first_image)
    assert sample["iou"].tolist() == sorted(sample["iou"].tolist(), reverse=True)
    assert inspector.state["iou"] == pytest.approx(float(sample["iou"].max()))
    if inspector.state["roi_index"] >= 0:
        assert torch.equal(inspector.state["roi"], sample["scored"]["rois"][inspector.state["roi_index"]])

    inspector.roi_slider.value = 1
    assert inspector.state["gt_index"] == int(sample["order"][1]) != first_gt
    assert inspector.figure is not first_figure

    calls = []
    original = inspector.update
    monkeypatch.setattr(inspector, "update", lambda: (calls.append(1), original())[1])
    second_image = inspector.image_dropdown.options[1][1]
    inspector.image_dropdown.value = second_image
    assert len(calls) == 1  # one redraw per image change, not one per slider trait
    assert inspector.state["image_id"] == second_image and inspector.roi_slider.value == 0
    target = inspector.sample(second_image)["target"]
    assert inspector.roi_slider.max == int((target["area"] <= 32**2).sum()) - 1
    assert inspector.state["gt_label"] == int(target["labels"][inspector.state["gt_index"]])


def test_inspector_refuses_a_plain_detector(val):
    from sodlab.config import make_config

    with pytest.raises(TypeError, match="not an SR detector"):
        viz.SRInspector(build_model(make_config("cpu"), num_classes=9), val)


def test_saved_view_counts_and_launch_flag(monkeypatch):
    class FakeDataset:
        views = {"small-regressions": [1, 2], "sorted-by-small-recall-gain": [1, 2, 3]}

        def list_saved_views(self):
            return list(self.views)

        def load_saved_view(self, name):
            return self.views[name]

    assert viz.saved_view_counts(FakeDataset()) == {"small-regressions": 2, "sorted-by-small-recall-gain": 3}
    monkeypatch.delenv("SODLAB_LAUNCH_APP", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not viz.launch_requested()
    monkeypatch.setenv("SODLAB_LAUNCH_APP", "1")
    assert viz.launch_requested()
    monkeypatch.setenv("CI", "true")
    assert not viz.launch_requested()


# --- error analysis (TIDE dAP by size) ------------------------------------------------------------

def _errors_stats(dap_by_bin: dict) -> dict:
    return {"errors": {"bins": {b: {"AP50": 0.5, "num_gt": 7, "dAP": dap, "counts": {k: 1 for k in dap}}
                                for b, dap in dap_by_bin.items()}}}


def test_error_bars_stack_dap_per_type_and_the_loc_line():
    from sodlab.errors import ERROR_TYPES

    dap = dict(zip(ERROR_TYPES, (0.01, 0.04, 0.0, 0.02, 0.03, 0.10)))
    rows = [("baseline", _errors_stats({"small": dap, "<8": {k: -1.0 for k in dap}})),
            ("sr", _errors_stats({"small": dict(dap, Loc=0.015)})), ("old", {})]
    fig = viz.plot_error_bars(rows, bins=("small", "<8"))
    small, tiny = fig.axes[:2]
    assert small.get_title() == "small, <32 px (n=7)" and tiny.get_title() == "<8 px (n=7)"
    bars = {c.get_label(): c for c in small.containers}
    assert list(bars) == list(ERROR_TYPES)
    assert [p.get_height() for p in bars["Loc"]] == pytest.approx([4.0, 1.5, 0.0])
    assert [p.get_y() for p in bars["Loc"]] == pytest.approx([1.0, 1.0, 0.0])  # stacked on Cls
    assert sum(p.get_height() for c in tiny.containers for p in c) == 0  # -1: no ground truth
    assert viz.loc_comparison(rows) == "Loc dAP, small objects: sr 1.5 | baseline 4.0"
    assert viz.loc_comparison([]) == "Loc dAP, small objects: no evaluated run"

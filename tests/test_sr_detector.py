"""The SR detector: variants switch one thing each, training runs, output is torchvision's format."""
import copy
import dataclasses
import json
import os
import signal

import pytest
import torch

import sodlab.train
from sodlab.config import SR_METHODS, SRConfig, SRTrainConfig, TrainConfig, method_variant
from sodlab.data.coco import load_split
from sodlab.io import read_json
from sodlab.models import build_model, fast_autocast_dtype
from sodlab.models.sr_detector import SRDetector
from sodlab.runs import finish_run
from sodlab.train import (SharedWork, TrainingStopped, build_branch, prepare_run_dir, read_real_patches, sr_step,
                          train, train_branches)


def _differences(a, b) -> set[str]:
    fa, fb = dataclasses.asdict(a), dataclasses.asdict(b)
    out = set()
    for k in fa:
        if isinstance(fa[k], dict):
            out |= {f"{k}.{kk}" for kk in fa[k] if fa[k][kk] != fb[k][kk]}
        elif fa[k] != fb[k]:
            out.add(k)
    return out


def test_each_variant_changes_only_its_switch():
    full = method_variant("sr", SRConfig(), SRTrainConfig())
    assert full == (SRConfig(), SRTrainConfig())

    def changed(method):
        sr, sr_train = method_variant(method, *full)
        return _differences(full[0], sr) | _differences(full[1], sr_train)

    assert changed("sr-no-recon") == {"use_generator"}
    assert changed("sr-no-adv") == {"weights.adv", "weights.d_adv"}
    assert changed("sr-no-cls") == {"weights.cls", "weights.d_cls"}
    assert changed("sr-cls-only") == {"boxes_from", "weights.reg", "weights.d_reg"}
    # idempotent, so a config reloaded from config.json is the same config
    for m in SR_METHODS:
        assert method_variant(m, *method_variant(m, *full)) == method_variant(m, *full)


def _model(tiny_config, method, **sr_overrides):
    # float32 G and D unless a test asks for autocast: these tests compare answers to 1e-5
    sr_overrides.setdefault("amp", False)
    cfg = dataclasses.replace(tiny_config, method=method, sr=dataclasses.replace(SRConfig(), **sr_overrides))
    torch.manual_seed(0)
    return build_model(cfg, num_classes=9).eval()


def _images(tiny_synth, n=2):
    val = load_split(tiny_synth, "val", train=False)
    return [val[i][0] for i in range(n)]


def test_small_proposals_take_d_scores_and_boxes(tiny_config, tiny_synth):
    images = _images(tiny_synth)
    threshold = 12.0**2  # splits an untrained RPN's proposals on these 128 px images
    model = _model(tiny_config, "sr", area_threshold=threshold)
    s = model.score_proposals(images)
    mask = s["sr_mask"]
    areas = torch.cat([(r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]) for r in s["rois"]])
    assert torch.equal(mask, areas < threshold)
    assert 0 < mask.sum() < len(mask)
    # outside the mask: the box head's answer, untouched
    assert torch.equal(s["class_logits"][~mask], s["head_logits"][~mask])
    assert torch.equal(s["box_regression"][~mask], s["head_deltas"][~mask])
    # inside: D's, recomputed here from the same patches
    from sodlab.patches import lr_patches

    chosen = [r[(r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]) < threshold] for r in s["rois"]]
    d = model.discriminator(model.generator(lr_patches(images, chosen, 16, model.context)))
    assert torch.allclose(s["class_logits"][mask], d["cls"], atol=1e-5)
    assert torch.allclose(s["box_regression"][mask], d["box"], atol=1e-5)
    # ... which is the one path the widgets and the SR quality report take too
    out = model.reconstruct(images, chosen)
    assert torch.allclose(out["cls"], d["cls"], atol=1e-5) and out["lr_patch"].shape[-1] == 16


def test_rois_too_large_for_the_lr_patch_skip_g_and_reach_d_as_cut(tiny_config, tiny_synth):
    """large_rois="native": RoIs whose context box exceeds the LR patch are cut at D's patch size
    and judged as they are, never downsampled before G; G serves the others, as before."""
    from sodlab.patches import fits_lr_patch, lr_patches

    images = _images(tiny_synth)
    rois = [torch.tensor([[10.0, 10.0, 20.0, 20.0], [30.0, 30.0, 60.0, 44.0], [50.0, 5.0, 63.0, 18.0]]),
            torch.tensor([[70.0, 70.0, 96.0, 80.0], [5.0, 90.0, 12.0, 97.0]])]
    fits = torch.cat([fits_lr_patch(r, 16, 0.1) for r in rois])
    # context boxes 12, 36 x 16.8, 15.6, 31.2 x 12 and 8.4 px: the second and the fourth would be downsampled
    assert fits.tolist() == [True, False, True, False, True]
    ours = _model(tiny_config, "sr", large_rois="native").reconstruct(images, rois)
    before = _model(tiny_config, "sr").reconstruct(images, rois)  # large_rois="generator", the default
    assert torch.equal(ours["generated"], fits) and before["generated"].all()
    assert torch.equal(ours["lr_patch"], before["lr_patch"])
    assert torch.allclose(ours["sr_patch"][fits], before["sr_patch"][fits], atol=1e-6), "G's patches as before"
    native = lr_patches(images, [r[~fits_lr_patch(r, 16, 0.1)] for r in rois], 64, 0.1)
    assert torch.equal(ours["sr_patch"][~fits], native), "the others cut from the image at D's 64 px"
    model = _model(tiny_config, "sr", large_rois="native")
    assert torch.allclose(model.discriminator(ours["sr_patch"])["cls"], ours["cls"], atol=1e-5)
    # the SR quality report measures G on every RoI, large ones included
    every = model.reconstruct(images, rois, judge=False, every_roi_through_g=True)
    assert every["generated"].all() and torch.allclose(every["sr_patch"], before["sr_patch"], atol=1e-6)
    # bilinear patches (sr-no-recon, or --sr-patches bilinear) follow the same split
    bilinear = _model(tiny_config, "sr", large_rois="native", patches="bilinear").reconstruct(images, rois)
    assert torch.equal(bilinear["sr_patch"][~fits], native)


def test_the_gan_step_plays_on_gs_rois_and_d_learns_classes_on_all(tiny_config, tmp_path, monkeypatch):
    """With RoIs G does not serve in the batch, G's objective and D's adversarial term see G's RoIs
    alone (real and fake alike: paired), while D's class and box terms see every RoI."""
    from sodlab import losses
    from sodlab.train import make_optimizers

    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", tmp_path / "base")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=9).train()
    model.detector.eval().requires_grad_(False)
    batch = _branch_batch(cfg)
    generated = torch.tensor([True, False, True, True, False, True])
    hr = cfg.sr.lr_size * cfg.sr.scale
    batch |= {"generated": generated, "native_patch": torch.rand(2, 3, hr, hr)}
    seen = {}
    for name in ("generator_objective", "discriminator_adv_loss", "classification_loss"):
        original = getattr(sodlab.train if name == "generator_objective" else losses, name)

        def spy(*args, original=original, name=name, **kwargs):
            seen.setdefault(name, []).append(len(args[0]["adv"] if name == "generator_objective" else args[0]))
            return original(*args, **kwargs)
        monkeypatch.setattr(sodlab.train if name == "generator_objective" else losses, name, spy)
    record = sr_step(model, batch, make_optimizers(cfg, model), cfg, it=0)
    assert seen["discriminator_adv_loss"] == [4], "D's real/fake game on G's 4 RoIs"
    assert seen["classification_loss"][0] == 6, "D's class loss on all 6"
    assert seen["generator_objective"] == [4], "G's objective on its own 4"
    assert record["sr_generated"] == 4 and torch.isfinite(torch.tensor(record["g_total"]))
    # a batch with no RoI for G leaves G as it was, and D still learns
    batch |= {"generated": torch.zeros(6, dtype=torch.bool), "native_patch": torch.rand(6, 3, hr, hr)}
    g_before = copy.deepcopy(model.generator.state_dict())
    record = sr_step(model, batch, make_optimizers(cfg, model), cfg, it=1)
    assert all(torch.equal(v, model.generator.state_dict()[k]) for k, v in g_before.items())
    assert "g_total" not in record and torch.isfinite(torch.tensor(record["d_total"]))


def _sr_steps_on_rank(rank: int, cfg: TrainConfig, batches: list, port: int, out: str) -> None:
    """``sr_step`` on each of the rank's batches (``batches[rank]``, one per iteration) in a
    two-process gloo group, with the log of the last averaged over the ranks
    (torch.multiprocessing.spawn's worker). Saves what the rank ends each step with."""
    import datetime

    import torch.distributed as dist

    from sodlab.distributed import reduce_record
    from sodlab.train import make_optimizers

    torch.set_num_threads(1)
    # a rank that skips a collective leaves the other waiting: fail within a minute, not half an hour
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=9).train()
        model.detector.eval().requires_grad_(False)
        optimizers, steps = make_optimizers(cfg, model), []
        for it, batch in enumerate(batches[rank]):
            record = sr_step(model, batch, optimizers, cfg, it=it, world_size=2)
            steps.append({"generator": copy.deepcopy(model.generator.state_dict()),
                          "discriminator": copy.deepcopy(model.discriminator.state_dict())})
        torch.save({"record": record, "logged": reduce_record(record, 2), "steps": steps}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_ranks(cfg: TrainConfig, batches: list, tmp_path) -> list[dict]:
    """What each of two gloo ranks ends with after ``_sr_steps_on_rank``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sr_steps_on_rank, args=(cfg, batches, port, str(tmp_path)), nprocs=2)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def _with_g(cfg: TrainConfig, seed: int) -> dict:
    """A branch batch in which G serves four of the six RoIs and D sees two as cut at its size."""
    hr = cfg.sr.lr_size * cfg.sr.scale
    return _branch_batch(cfg, seed=seed) | {"generated": torch.tensor([True, False, True, True, False, True]),
                                            "native_patch": torch.rand(2, 3, hr, hr)}


def _without_g(cfg: TrainConfig, seed: int) -> dict:
    """A branch batch without a RoI for G: D sees all six as cut at its size."""
    hr = cfg.sr.lr_size * cfg.sr.scale
    return _branch_batch(cfg, seed=seed) | {"generated": torch.zeros(6, dtype=torch.bool),
                                            "native_patch": torch.rand(6, 3, hr, hr)}


def test_a_rank_without_rois_for_g_steps_g_in_step_with_the_other(tiny_config, tmp_path):
    """Data parallelism averages G's gradients over the ranks, so a rank whose batch holds no RoI
    for G (all cut at D's size, ``large_rois="native"``) still steps G, with a zero loss: both ranks
    end equal, G moved by the other rank's RoIs, and the log averages each number over the ranks
    that logged it (G's terms only where G ran)."""
    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", tmp_path / "base")
    ranks = _two_ranks(cfg, [[_with_g(cfg, seed=0)], [_without_g(cfg, seed=1)]], tmp_path)

    for part in ("generator", "discriminator"):
        assert _equal_states(ranks[0]["steps"][-1][part], ranks[1]["steps"][-1][part]), f"the ranks' {part}s differ"
    torch.manual_seed(0)
    start = build_model(cfg, num_classes=9).generator.state_dict()
    assert not _equal_states(start, ranks[0]["steps"][-1]["generator"]), "G did not step"

    ours, theirs = ranks[0]["record"], ranks[1]["record"]
    assert ours["sr_generated"] == 4 and theirs["sr_generated"] == 0
    assert {"g_total", "g_psnr"} <= ours.keys() and not any(k.startswith("g_") for k in theirs)
    logged = ranks[0]["logged"]
    assert logged == ranks[1]["logged"]
    for key in ("g_total", "g_psnr"):
        assert logged[key] == pytest.approx(ours[key]), "G's terms from the rank where G ran"
    assert logged["d_total"] == pytest.approx((ours["d_total"] + theirs["d_total"]) / 2)
    assert logged["sr_generated"] == pytest.approx(2.0)


def test_when_no_rank_has_rois_for_g_no_rank_steps_g(tiny_config, tmp_path):
    """One process skips G's step on a batch without RoIs for G; under data parallelism every
    rank must agree to skip it, or Adam's moments from earlier steps move G without a gradient.
    A first step moves G; in the second no rank's batch holds a RoI for G, and G stays exactly as
    the first left it on both ranks, while D steps."""
    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", tmp_path / "base")
    ranks = _two_ranks(cfg, [[_with_g(cfg, seed=0), _without_g(cfg, seed=2)],
                             [_without_g(cfg, seed=1), _without_g(cfg, seed=3)]], tmp_path)

    first, second = ranks[0]["steps"]
    torch.manual_seed(0)
    start = build_model(cfg, num_classes=9).generator.state_dict()
    assert not _equal_states(start, first["generator"]), "G did not step first: Adam would hold no moments"
    for rank in ranks:
        assert _equal_states(rank["steps"][1]["generator"], first["generator"]), "G moved without RoIs"
        assert _equal_states(rank["steps"][1]["discriminator"], second["discriminator"])
    assert not _equal_states(second["discriminator"], first["discriminator"]), "D did not step"
    assert not any(k.startswith("g_") for rank in ranks for k in rank["record"])


def test_amp_runs_g_and_d_in_the_hardwares_fast_dtype_and_only_them(tiny_config, tiny_synth):
    assert fast_autocast_dtype("cuda") == torch.float16
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert (fast_autocast_dtype("cpu") or torch.float32) == expected
    images = _images(tiny_synth)
    scores = {}
    for amp in (False, True):
        model = _model(tiny_config, "sr", area_threshold=12.0**2, amp=amp)
        seen = {}
        for name, layer in (("G", model.generator.output), ("D", model.discriminator.cls_head),
                            ("box head", model.detector.roi_heads.box_predictor.cls_score)):
            layer.register_forward_hook(lambda _, __, out, name=name: seen.setdefault(name, out.dtype) and None)
        scores[amp] = model.score_proposals(images)
        assert seen["G"] == seen["D"] == (expected if amp else torch.float32)
        assert seen["box head"] == torch.float32  # the detector stays float32
        assert scores[amp]["class_logits"].dtype == scores[amp]["box_regression"].dtype == torch.float32
    off, on = scores[False], scores[True]
    assert torch.equal(off["sr_mask"], on["sr_mask"]) and on["sr_mask"].any()
    m = on["sr_mask"]
    assert torch.equal(on["class_logits"][~m], off["class_logits"][~m])
    # bf16 keeps 8 bits of mantissa: D's logits agree to about 1e-2, exactly without native bf16
    tolerance = 0.05 if expected == torch.bfloat16 else 0.0
    assert torch.allclose(on["class_logits"][m], off["class_logits"][m], atol=tolerance, rtol=0)


def test_cls_only_keeps_the_detector_boxes_and_scope_all_covers_everything(tiny_config, tiny_synth):
    images = _images(tiny_synth)
    s = _model(tiny_config, "sr-cls-only", area_threshold=12.0**2).score_proposals(images)
    assert torch.equal(s["box_regression"], s["head_deltas"])
    assert not torch.equal(s["class_logits"][s["sr_mask"]], s["head_logits"][s["sr_mask"]])
    s = _model(tiny_config, "sr", sr_scope="all").score_proposals(images)
    assert bool(s["sr_mask"].all())


def test_mean_fusion_averages_probabilities_and_weights_deltas_by_measured_error(tiny_config, tiny_synth):
    images = _images(tiny_synth)
    replace = _model(tiny_config, "sr", area_threshold=12.0**2).score_proposals(images)
    fused_model = _model(tiny_config, "sr", area_threshold=12.0**2, fusion="mean")
    fused = fused_model.score_proposals(images)
    m = replace["sr_mask"]
    expected = (replace["head_logits"][m].softmax(-1) + replace["class_logits"][m].softmax(-1)) / 2
    assert torch.allclose(fused["class_logits"][m].exp(), expected, atol=1e-5)
    # before D's box error is measured, D never moves (let alone halves) the box head's deltas
    assert torch.equal(fused["box_regression"], fused["head_deltas"])
    for errors, share in (([1.0, 1.0], 0.5), ([1.0, 3.0], 0.25)):  # [box head, D]
        fused_model.box_errors.copy_(torch.tensor(errors))
        fused = fused_model.score_proposals(images)
        assert torch.allclose(fused["box_regression"][m],
                              (1 - share) * replace["head_deltas"][m] + share * replace["box_regression"][m], atol=1e-5)
        assert torch.equal(fused["box_regression"][~m], fused["head_deltas"][~m])


def test_box_errors_are_a_running_mean_over_foreground_rois(tiny_config):
    model = _model(tiny_config, "sr")
    labels, targets = torch.tensor([0, 2, 1]), torch.zeros(3, 4)
    head = torch.zeros(3, 9 * 4)
    d = torch.zeros(3, 9 * 4)
    d.reshape(3, 9, 4)[1, 2] = 1.0  # D off by 1 on each coordinate of the foreground RoI of class 2
    model.update_box_errors(head, d, labels, targets)
    # smooth L1 (beta 1/9) of 1 is 1 - 1/18 per coordinate, 4 coordinates, over 2 foreground RoIs
    assert model.box_errors.tolist() == pytest.approx([0.0, 4 * (1 - 1 / 18) / 2])
    model.update_box_errors(head, head, labels, targets, momentum=0.5)
    assert model.box_errors.tolist() == pytest.approx([0.0, 4 * (1 - 1 / 18) / 4])
    assert model.box_fusion_weight() == 0.0  # a perfect box head takes all the weight


def test_no_recon_upsamples_bilinearly(tiny_config):
    model = _model(tiny_config, "sr-no-recon")
    assert model.generator is None
    lr = torch.rand(3, 3, 16, 16)
    assert torch.equal(model.super_resolve(lr),
                       torch.nn.functional.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False))


def test_sampled_rois_are_small_labelled_and_encoded(tiny_config, tiny_synth):
    model = _model(tiny_config, "sr").train()
    train_set = load_split(tiny_synth, "train", train=False)
    images, targets = zip(*[train_set[i] for i in range(2)])
    losses, batch = model.training_forward(list(images), list(targets))
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    m = len(batch["labels"])
    assert 0 < m <= 2 * (model.rois_per_image + model.hr_rois_per_image)
    assert batch["lr_patch"].shape == (m, 3, 16, 16) and batch["hr_patch"].shape == (m, 3, 64, 64)
    rois = torch.cat(batch["rois"])
    small = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]) < 32**2
    # small RoIs for the branch, plus a few large enough for a real HR target from the image itself
    assert small.sum() >= m - 2 * model.hr_rois_per_image
    assert torch.equal(batch["hr_valid"], ~small & batch["hr_valid"]), "only big RoIs have real HR in the image"
    assert (batch["labels"] > 0).any(), "jittered ground truth guarantees foreground RoIs"
    # t* decodes back onto the matched ground truth for foreground RoIs
    fg = batch["labels"] > 0
    decoded = model.box_coder.decode_single(batch["regression_targets"][fg], rois[fg])
    gts = torch.cat([t["boxes"] for t in targets])
    from torchvision.ops import box_iou

    assert bool((box_iou(decoded, gts).max(dim=1).values > 0.999).all())


@pytest.mark.slow
def test_sr_detector_trains_and_detects(tiny_config):
    cfg = dataclasses.replace(tiny_config, method="sr", sr_train=SRTrainConfig(hr_source="twin"), iters=4)
    run_dir = train(cfg, progress=False)
    finish_run(run_dir, progress=False)
    log = [l for l in open(run_dir / "metrics.jsonl")]
    assert len(log) == 4
    rec = json.loads(log[-1])
    for key in ("loss", "d_adv", "d_cls", "d_reg", "g_adv", "g_cls", "g_reg", "g_mse", "g_tv", "d_real_prob"):
        assert key in rec and rec[key] == rec[key]  # present and not NaN
    assert rec["sr_hr_valid"] > 0, "x4 twins give real HR targets for RoIs of 16 px and more"
    stats = read_json(run_dir / "eval.json")
    assert set(stats) >= {"AP", "APs", "APm", "APl"}
    quality = read_json(run_dir / "sr_quality.json")
    assert quality["rois"] > 0 and quality["sr"]["psnr"] > 10 and quality["bicubic"]["psnr"] > 10
    index = read_json(run_dir / "sr_patches" / "index.json")
    assert index and all((run_dir / "sr_patches" / e[k]).exists() for e in index for k in ("lr", "sr", "hr"))
    from PIL import Image

    assert Image.open(run_dir / "sr_patches" / index[0]["sr"]).size == (64, 64)


@pytest.mark.slow
def test_sr_at_x3_trains_on_x3_twins_and_detects(tiny_config, tmp_path):
    """Data written with x3 twins (`sodlab convert --twins 3`): G super-resolves x3 with the
    recipe's sub-pixel tail, its pixel targets are the x3 twins, and the run evaluates."""
    from PIL import Image

    from sodlab.config import SRConfig
    from sodlab.data.synth import generate

    data = tmp_path / "x3"
    generate(data, n_train=6, n_val=3, seed=1, size=128, hr_scale=3, workers=1, progress=False)
    cfg = dataclasses.replace(tiny_config, data=str(data), method="sr", iters=3, out=str(tmp_path / "sr-x3"),
                              sr=SRConfig(scale=3, generator_upsample_channels=8),
                              sr_train=SRTrainConfig(hr_source="twin"))
    run_dir = train(cfg, progress=False)
    finish_run(run_dir, progress=False)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["sr_hr_valid"] > 0
    assert 0 <= read_json(run_dir / "eval.json")["APs"] <= 1
    index = read_json(run_dir / "sr_patches" / "index.json")
    assert Image.open(run_dir / "sr_patches" / index[0]["sr"]).size == (48, 48)
    from sodlab.train import load_trained_model

    cfg, model = load_trained_model(run_dir)
    assert isinstance(model, SRDetector)
    val = load_split(cfg.data, "val", train=False)
    out = model([val[0][0]])
    assert set(out[0]) == {"boxes", "labels", "scores"} and out[0]["boxes"].shape[-1] == 4


@pytest.mark.slow
def test_staged_schedule_freezes_the_detector(tiny_config, tmp_path):
    base = train(tiny_config, progress=False)
    cfg = dataclasses.replace(tiny_config, method="sr", out=str(tmp_path / "staged"), init_from=str(base),
                              sr_train=SRTrainConfig(schedule="staged"), iters=3)
    run_dir = train(cfg, progress=False)
    before = torch.load(base / "checkpoints" / "last.pt", weights_only=False)["model"]
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after["detector." + k]) for k in before)
    g_before = build_model(cfg, 9).generator.state_dict()
    assert any(not torch.equal(g_before[k], after["generator." + k]) for k in g_before)


def _staged(tiny_config, method: str, out, base, **sr_train) -> TrainConfig:
    sr, sr_train = method_variant(method, SRConfig(), SRTrainConfig(schedule="staged", hr_source="twin", **sr_train))
    return dataclasses.replace(tiny_config, method=method, out=str(out), init_from=str(base), sr=sr,
                               sr_train=sr_train, iters=4, ckpt_every=2)


def _log(run_dir) -> list[dict]:
    """The run's metrics without the step times, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "sec"} for line in open(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_sr_runs_trained_in_one_pass_are_bitwise_the_runs_trained_alone(tiny_config, tmp_path, monkeypatch):
    """Branches of one pass share each batch, the frozen detector's forward and, with D built on the
    detector (the recipe's), its read of the real patches; each ends as it would alone, also when a
    stopped pass resumes branches whose checkpoints differ."""
    base = train(dataclasses.replace(tiny_config, out=str(tmp_path / "base")), progress=False)
    methods = ("sr", "sr-no-recon")

    def staged(method, out):
        cfg = _staged(tiny_config, method, out, base)
        return dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, discriminator_trunk="detector", amp=False))

    alone = [train(staged(m, tmp_path / f"alone-{m}"), progress=False) for m in methods]
    together = [staged(m, tmp_path / f"pass-{m}") for m in methods]

    # a signal in the second branch's second step stops the pass, checkpointed at iteration 2 ...
    steps, real_step = [], sodlab.train.train_step

    def stopped_in_the_fourth_step(*args, **kwargs):
        record = real_step(*args, **kwargs)
        steps.append(record["iter"])
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(sodlab.train, "train_step", stopped_in_the_fourth_step)
    with pytest.raises(TrainingStopped):
        train_branches(together, progress=False)
    monkeypatch.setattr(sodlab.train, "train_step", real_step)
    assert steps == [1, 1, 2, 2]
    for cfg in together:
        assert torch.load(f"{cfg.out}/checkpoints/last.pt", weights_only=False)["iteration"] == 2
    # ... and, as if killed between two saves, `sr` has no checkpoint: it starts over, and the pass's
    # flips go on from its start, not from the checkpoint loaded last
    os.remove(f"{together[0].out}/checkpoints/last.pt")

    ran = train_branches(together, resume=True, progress=False)
    for one, other in zip(alone, ran):
        assert [r["iter"] for r in _log(other)] == [1, 2, 3, 4]
        assert _log(other) == _log(one)
        a = torch.load(one / "checkpoints" / "last.pt", weights_only=False)
        b = torch.load(other / "checkpoints" / "last.pt", weights_only=False)
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # ... and the branches did train differently (equal logs would also follow from a shared model)
    assert _log(ran[0]) != _log(ran[1])


@pytest.mark.slow
def test_a_run_resumed_before_its_first_checkpoint_starts_g_from_its_pretraining(tiny_config, tmp_path):
    base = train(dataclasses.replace(tiny_config, out=str(tmp_path / "base")), progress=False)
    cfg = _staged(tiny_config, "sr", tmp_path / "sr", base, generator_init="pretrain", pretrain_iters=2)
    prepare_run_dir(cfg, resume=False, force=False)  # written, then stopped before its first checkpoint
    resumed = build_branch(cfg, 9, "cpu", resume=True, force=False)
    fresh = build_branch(cfg, 9, "cpu", resume=False, force=True)
    assert resumed.start_iter == 0
    g, pretrained, random = (m.generator.state_dict() for m in (resumed.model, fresh.model, build_model(cfg, 9)))
    assert all(torch.equal(g[k], pretrained[k]) for k in g)
    assert any(not torch.equal(g[k], random[k]) for k in g)


def test_runs_that_do_not_share_their_data_or_detector_cannot_train_in_one_pass(tiny_config, tmp_path):
    a = _staged(tiny_config, "sr", tmp_path / "a", tmp_path / "base")
    with pytest.raises(ValueError, match=r"b: differs from .*a in seed; runs of one pass share"):
        train_branches([a, dataclasses.replace(a, out=str(tmp_path / "b"), seed=1)], progress=False)
    with pytest.raises(ValueError, match=r"the xk twins it reads"):
        image_hr = dataclasses.replace(a.sr_train, hr_source="image")
        train_branches([a, dataclasses.replace(a, out=str(tmp_path / "b"), sr_train=image_hr)], progress=False)
    with pytest.raises(ValueError, match=r"only staged SR runs on a finished detector"):
        train_branches([a, dataclasses.replace(tiny_config, out=str(tmp_path / "b"))], progress=False)
    with pytest.raises(ValueError, match=r"two runs of one pass write the same directory"):
        train_branches([a, a], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_joint_schedule_trains_the_detector_exactly_as_the_baseline(tiny_config, tmp_path):
    """Equal budget in the strictest sense: the SR branch's weight init and RoI sampling draw from
    their own random streams, so the joint SR run's detector ends bitwise equal to the baseline's
    of the same seed, and SR and baseline rows differ by the SR branch alone."""
    tiny_config = dataclasses.replace(tiny_config, iters=3)
    base = train(dataclasses.replace(tiny_config, out=str(tmp_path / "base")), progress=False)
    joint = train(dataclasses.replace(tiny_config, method="sr", out=str(tmp_path / "joint"),
                                      sr_train=SRTrainConfig(hr_source="twin")), progress=False)
    before = torch.load(base / "checkpoints" / "last.pt", weights_only=False)["model"]
    after = torch.load(joint / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after["detector." + k]) for k in before)
    # ... and the detector did train (the test would pass trivially on frozen weights)
    torch.manual_seed(tiny_config.seed)
    fresh = build_model(tiny_config, 9).state_dict()
    assert any(not torch.equal(fresh[k], before[k]) for k in before if before[k].is_floating_point())


def test_sr_step_freezes_d_during_gs_step_and_steps_both(tiny_config, tiny_synth):
    """BasicSR's order: D's step, then G's through D with D's parameters frozen, so G's loss
    leaves no gradient on D and only G moves in the second step."""
    cfg = dataclasses.replace(tiny_config, method="sr")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=9).train()
    train_set = load_split(tiny_synth, "train", train=False)
    images, targets = zip(*[train_set[i] for i in range(2)])
    _, batch = model.training_forward(list(images), list(targets))
    from sodlab.train import make_optimizers

    optimizers = make_optimizers(cfg, model)
    seen = {}

    def spy(name, optimizer):
        step = optimizer.step

        def wrapped(*args, **kwargs):
            seen[name] = {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
                          for n, p in model.discriminator.named_parameters()}
            seen[name + "_requires_grad"] = any(p.requires_grad for p in model.discriminator.parameters())
            return step(*args, **kwargs)
        optimizer.step = wrapped

    spy("discriminator", optimizers["discriminator"])
    spy("generator", optimizers["generator"])
    d_before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    g_before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    record = sr_step(model, batch, optimizers, cfg, it=0)
    assert any(seen["discriminator"].values()), "D's own step has gradients"
    assert seen["generator_requires_grad"] is False, "D is frozen while G steps"
    assert all(p.requires_grad for p in model.discriminator.parameters()), "and unfrozen afterwards"
    assert any(not torch.equal(d_before[k], v) for k, v in model.discriminator.state_dict().items())
    assert any(not torch.equal(g_before[k], v) for k, v in model.generator.state_dict().items())
    assert {"d_total", "g_total", "g_mse", "g_gradnorm_mse", "g_gradnorm_cls"} <= set(record)
    assert record["g_gradnorm_mse"] > 0


def test_the_gate_keeps_exactly_k_small_proposals_and_leaves_the_rest_to_the_box_head(tiny_config, tiny_synth):
    images = _images(tiny_synth)
    ungated = _model(tiny_config, "sr", area_threshold=24.0**2).score_proposals(images)
    gated = _model(tiny_config, "sr", area_threshold=24.0**2, gate_top_k=3).score_proposals(images)
    sizes = [len(r) for r in gated["rois"]]
    for in_scope, kept, fg in zip(ungated["sr_mask"].split(sizes), gated["sr_mask"].split(sizes),
                                  (1 - gated["head_logits"].softmax(-1)[:, 0]).split(sizes)):
        assert int(kept.sum()) == min(3, int(in_scope.sum())) and bool((kept <= in_scope).all())
        # the kept ones are the most likely foreground of the small ones
        assert (in_scope & ~kept).any(), "the test needs more small proposals than the gate keeps"
        assert fg[kept].min() >= fg[in_scope & ~kept].max()
    m = gated["sr_mask"]
    assert torch.equal(gated["class_logits"][~m], gated["head_logits"][~m])
    assert torch.equal(gated["box_regression"][~m], gated["head_deltas"][~m])
    # the proposals that went through G and D got the same answer as without the gate
    assert torch.allclose(gated["class_logits"][m], ungated["class_logits"][m], atol=1e-5)


def test_the_rpn_returns_each_images_proposals_in_decreasing_objectness(tiny_config, tiny_synth):
    """The gate's objectness rank is a proposal's index: torchvision's RPN keeps no scores."""
    model = _model(tiny_config, "sr")
    rpn, seen = model.detector.rpn, []
    filter_proposals = rpn.filter_proposals

    def spy(*args, **kwargs):
        boxes, scores = filter_proposals(*args, **kwargs)
        seen.extend(scores)
        return boxes, scores
    rpn.filter_proposals = spy
    detected = model.detect(_images(tiny_synth))
    assert [len(s) for s in seen] == [len(p) for p in detected["proposals"]] and all(len(s) > 10 for s in seen)
    for scores in seen:
        assert bool((scores[:-1] >= scores[1:]).all())


@pytest.mark.parametrize("rank", ["objectness", "both"])
def test_the_gate_ranks_by_objectness_or_by_both_ranks(tiny_config, tiny_synth, rank):
    images = _images(tiny_synth)
    ungated = _model(tiny_config, "sr", area_threshold=24.0**2).score_proposals(images)
    model = _model(tiny_config, "sr", area_threshold=24.0**2, gate_top_k=3, gate_rank=rank)
    gated = model.score_proposals(images)
    sizes = [len(r) for r in gated["rois"]]
    for in_scope, kept, fg in zip(ungated["sr_mask"].split(sizes), gated["sr_mask"].split(sizes),
                                  (1 - gated["head_logits"].softmax(-1)[:, 0]).split(sizes)):
        assert int(kept.sum()) == 3 and bool((kept <= in_scope).all()) and (in_scope & ~kept).any()
        index = torch.arange(len(fg))
        fg_rank = torch.empty(len(fg), dtype=torch.long)
        fg_rank[fg.argsort(descending=True, stable=True)] = index
        score = index if rank == "objectness" else fg_rank + index  # lower is better
        assert score[kept].max() <= score[in_scope & ~kept].min()
    m = gated["sr_mask"]
    assert torch.equal(gated["class_logits"][~m], gated["head_logits"][~m])
    assert torch.allclose(gated["class_logits"][m], ungated["class_logits"][m], atol=1e-5)


def test_the_sharing_gate_sends_k_distinct_objects_and_their_overlaps_take_the_sent_answers(tiny_config, tiny_synth):
    """gate_share_iou t: the k sent proposals are the first k of an NMS at IoU t in the gate's rank
    order; a small proposal not sent that overlaps a sent one above t takes the answers of the one
    it overlaps most (D's class logits, and D's box decoded at the sent proposal); the rest keep
    the box head's."""
    from torchvision.ops import box_iou

    images, t = _images(tiny_synth), 0.5
    ungated = _model(tiny_config, "sr", area_threshold=24.0**2).score_proposals(images)
    model = _model(tiny_config, "sr", area_threshold=24.0**2, gate_top_k=3, gate_rank="both", gate_share_iou=t,
                   fusion="replace")
    gated = model.score_proposals(images)
    sizes = [len(r) for r in gated["rois"]]
    scope = ungated["sr_mask"].split(sizes)
    sent, shared = gated["sr_mask"].split(sizes), gated["shared_mask"].split(sizes)
    logits, deltas = gated["class_logits"].split(sizes), gated["box_regression"].split(sizes)
    head_logits, head_deltas = gated["head_logits"].split(sizes), gated["head_deltas"].split(sizes)
    fg = (1 - gated["head_logits"].softmax(-1)[:, 0]).split(sizes)
    took_some = False
    for i, boxes in enumerate(gated["rois"]):
        assert int(sent[i].sum()) == 3 and bool((sent[i] <= scope[i]).all()) and not (sent[i] & shared[i]).any()
        # the sent ones: the first 3 in rank order that no likelier sent one overlaps above t
        rank = model.gate_priority(fg[i])
        first, chosen = [], torch.where(scope[i])[0][rank[scope[i]].argsort(descending=True)]
        for j in chosen.tolist():
            if all(float(box_iou(boxes[j:j + 1], boxes[f:f + 1])) <= t for f in first):
                first.append(j)
            if len(first) == 3:
                break
        assert sorted(first) == torch.where(sent[i])[0].tolist()
        overlap, nearest = box_iou(boxes, boxes[first]).max(dim=1)
        assert torch.equal(shared[i], scope[i] & ~sent[i] & (overlap > t))
        took_some |= bool(shared[i].any())
        # answered_by (global indices): the sent ones themselves, each taker its source, -1 elsewhere
        offset = sum(sizes[:i])
        answered_by = gated["answered_by"].split(sizes)[i]
        expected = torch.full((sizes[i],), -1)
        expected[sent[i]] = torch.where(sent[i])[0] + offset
        expected[shared[i]] = torch.tensor(first)[nearest[shared[i]]] + offset
        assert torch.equal(answered_by, expected)
        for j in torch.where(shared[i])[0].tolist():
            source = first[int(nearest[j])]
            # with "replace" fusion a proposal's answers are D's: the sent one's class logits ...
            assert torch.equal(logits[i][j], logits[i][source])
            # ... and its box, where D put the sent one's (decoded at each proposal)
            boxes_j = model.box_coder.decode(deltas[i][j:j + 1], [boxes[j:j + 1]])
            boxes_source = model.box_coder.decode(deltas[i][source:source + 1], [boxes[source:source + 1]])
            assert torch.allclose(boxes_j, boxes_source, atol=1e-3)
        rest = ~sent[i] & ~shared[i]
        assert torch.equal(logits[i][rest], head_logits[i][rest]) and torch.equal(deltas[i][rest], head_deltas[i][rest])
    assert took_some, "the test needs proposals that overlap a sent one"
    # the sent proposals got the same answer as without the gate
    m = gated["sr_mask"]
    assert torch.allclose(gated["class_logits"][m], ungated["class_logits"][m], atol=1e-5)
    # t = 0 is the plain gate, with nothing shared
    plain = _model(tiny_config, "sr", area_threshold=24.0**2, gate_top_k=3, gate_rank="both").score_proposals(images)
    assert not plain["shared_mask"].any()
    every = torch.arange(len(plain["sr_mask"]))
    assert torch.equal(plain["answered_by"], torch.where(plain["sr_mask"], every, -1))


def test_with_twins_every_roi_is_a_paired_target_cut_as_inference_cuts_it(tiny_config, tiny_synth):
    """Pixel supervision and D's real term reach every sampled RoI, the tiniest included, and z_LR
    is exactly the patch inference gives G."""
    from sodlab.patches import lr_patches

    model = _model(tiny_config, "sr").train()
    train_set = load_split(tiny_synth, "train", train=False, hr_scale=4)
    images, targets = zip(*[train_set[i] for i in range(2)])
    _, batch = model.training_forward(list(images), list(targets), [t["hr_image"] for t in targets])
    rois = batch["rois"]
    sides = torch.cat([(r[:, 2:] - r[:, :2]).min(dim=1).values for r in rois])
    assert bool(batch["hr_valid"].all()) and bool((sides < 8).any()), "tiny RoIs have a target too"
    assert torch.equal(batch["lr_patch"], lr_patches(list(images), rois, model.lr_size, model.context))
    assert batch["hr_patch"].shape[-1] == model.lr_size * model.scale


def test_training_batches_mark_gs_rois_and_cut_the_others_at_ds_size(tiny_config, tiny_synth):
    """In training as at inference: with large_rois="native" the RoI batch says which RoIs G serves
    and holds the others' native cuts; the rest of the batch is what large_rois="generator" gives."""
    from sodlab.patches import fits_lr_patch, lr_patches

    train_set = load_split(tiny_synth, "train", train=False, hr_scale=4)
    images, targets = zip(*[train_set[i] for i in range(2)])
    images, targets, twins = list(images), list(targets), [t["hr_image"] for t in targets]
    before = _model(tiny_config, "sr", area_threshold=32.0**2).train()
    ours = copy.deepcopy(before)
    ours.large_rois = "native"
    batches = [m.training_forward(images, targets, twins, train_detector=False)[1] for m in (before, ours)]
    rois = batches[1]["rois"]
    fits = torch.cat([fits_lr_patch(r, 16, ours.context) for r in rois])
    assert 0 < fits.sum() < len(fits), "this draw holds RoIs of both kinds"
    assert torch.equal(batches[1]["generated"], fits) and batches[0]["generated"].all()
    assert torch.equal(batches[1]["native_patch"], lr_patches(images, [r[~fits_lr_patch(r, 16, ours.context)]
                                                                       for r in rois], 64, ours.context))
    for key in ("lr_patch", "hr_patch", "hr_valid", "labels", "regression_targets"):
        assert torch.equal(batches[0][key], batches[1][key]), key


def test_branches_of_a_pass_cut_the_rois_they_draw_alike_once(tiny_config, tiny_synth):
    """Branches of a pass draw their RoIs from their own samplers, seeded alike: the second takes the
    first's patches and box-head answers from the batch's SharedWork, the same as its own cut, and
    its sampler moves on as alone; a branch that draws other RoIs cuts its own."""
    from sodlab.patches import lr_patches

    train_set = load_split(tiny_synth, "train", train=False, hr_scale=4)
    images, targets = zip(*[train_set[i] for i in range(2)])
    images, targets, twins = list(images), list(targets), [t["hr_image"] for t in targets]
    first = _model(tiny_config, "sr").train()
    second, alone, other = copy.deepcopy(first), copy.deepcopy(first), copy.deepcopy(first)
    other.sampling_rng.manual_seed(12345)
    proposed = first.propose(images)

    def forward(model, shared=None):
        return model.training_forward(images, targets, twins, train_detector=False, proposed=proposed,
                                      shared=shared)[1]

    expected, shared = forward(alone), SharedWork()
    ours = forward(first, shared)
    cut_seconds = shared.seconds
    theirs = forward(second, shared)
    assert cut_seconds > 0 and shared.seconds == cut_seconds, "cut once for both"
    assert theirs["lr_patch"] is ours["lr_patch"] and theirs["head_deltas"] is ours["head_deltas"]
    for key, value in expected.items():
        assert all(torch.equal(a, b) for a, b in zip(value, theirs[key])) if key == "rois" else \
            torch.equal(value, theirs[key]), key
    assert torch.equal(second.sampling_rng.get_state(), alone.sampling_rng.get_state())
    its = forward(other, shared)
    assert shared.seconds > cut_seconds, "other RoIs, its own cut"
    assert not torch.equal(torch.cat(its["rois"]), torch.cat(ours["rois"]))
    assert torch.equal(its["lr_patch"], lr_patches(images, its["rois"], other.lr_size, other.context))


def test_patches_choose_what_d_judges_and_twin_patches_are_the_twins(tiny_config, tiny_synth):
    """patches="generator" gives D G's output; "bilinear" bypasses G; "twin" gives D the box cut from
    the exact twin, as training cuts D's real patches, and refuses to run without the twins."""
    from sodlab.patches import lr_hr_pairs, lr_patches

    val = load_split(tiny_synth, "val", train=False, hr_scale=4)
    images, targets = zip(*[val[i] for i in range(2)])
    images, twins = list(images), [t["hr_image"] for t in targets]
    rois = [t["boxes"].as_subclass(torch.Tensor) for t in targets]
    model = _model(tiny_config, "sr")
    seen = []
    model.discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    lr = lr_patches(images, rois, model.lr_size, model.context)
    _, hr, _ = lr_hr_pairs(images, rois, model.lr_size, model.scale, model.context, hr_images=twins)
    with torch.no_grad():
        expected = {"generator": model.generator(lr), "bilinear": model.upsample(lr), "twin": hr}
        for patches, want in expected.items():
            model.patches = patches
            out = model.reconstruct(images, rois, twins)
            assert torch.equal(seen[-1], want) and torch.equal(out["sr_patch"], want), patches
    assert not torch.equal(expected["generator"], expected["bilinear"])
    assert not torch.allclose(expected["twin"], expected["bilinear"], atol=1e-3), "the twin holds detail bilinear lacks"
    generator_calls = []
    model.generator.register_forward_hook(lambda *args: generator_calls.append(1))
    with torch.no_grad():
        model.patches = "generator"
        model(images)
        assert generator_calls, "small proposals go through G at inference"
        generator_calls.clear()
        model.patches = "bilinear"
        model(images)
    assert not generator_calls, "patches='bilinear' bypasses G"
    model.patches = "twin"
    with pytest.raises(ValueError, match="twins"):
        model(images)
    with torch.no_grad():
        detections = model(images, hr_images=twins)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_sr_branches_on_one_detector_share_its_pass_and_answer_as_alone(tiny_config, tiny_synth):
    """evaluate_models runs the backbone, RPN and box head once per batch for SR detectors on equal
    detector weights (a bench seed's variants; D on other patches), and each model's detections are
    exactly its own evaluation's; a model on other detector weights runs its own detector."""
    from torch.utils.data import Subset

    from sodlab.evaluate import evaluate_model, evaluate_models, same_detector

    val = Subset(load_split(tiny_synth, "val", train=False, hr_scale=4), range(4))
    first = _model(tiny_config, "sr", area_threshold=12.0**2)
    others = [_model(tiny_config, method, area_threshold=12.0**2) for method in ("sr-no-recon", "sr-cls-only", "sr")]
    others[-1].patches = "twin"
    for model in others:  # the branches differ; the detector is the seed's
        torch.nn.init.normal_(model.discriminator.cls_head.weight)
        model.detector.load_state_dict(first.detector.state_dict())
    models = [first, *others]
    assert same_detector(models)
    detector_calls = [[] for _ in models]
    for calls, model in zip(detector_calls, models):
        model.detector.backbone.register_forward_hook(lambda *args, calls=calls: calls.append(1))
    together = evaluate_models(models, val, batch_size=2, progress=False)
    assert [len(c) for c in detector_calls] == [2, 0, 0, 0], "one detector pass per batch of 2, for all four"
    for model, (results, outputs, seconds) in zip(models, together):
        assert seconds > 0 and results == evaluate_model(model, val, batch_size=2, progress=False)[0]
    assert together[0][0] != together[1][0] != together[2][0], "each branch gives its own answers"
    # (the twin model raises without its twins: evaluate_models passed them to it alone)

    others[0].detector.rpn._post_nms_top_n = {**first.detector.rpn._post_nms_top_n, "testing": 7}
    assert not same_detector(models), "other proposal settings: another detector pass"
    others[0].detector.rpn._post_nms_top_n = first.detector.rpn._post_nms_top_n
    assert same_detector(models)
    torch.nn.init.normal_(others[0].detector.roi_heads.box_predictor.cls_score.weight)  # another detector
    assert not same_detector(models)
    for calls in detector_calls:
        calls.clear()
    apart = evaluate_models(models[:2], val, batch_size=2, progress=False)
    assert [len(c) for c in detector_calls[:2]] == [2, 2]
    assert apart[1][0] == evaluate_model(others[0], val, batch_size=2, progress=False)[0]


def _detector_trunk_config(tiny_config, out, base) -> TrainConfig:
    cfg = _staged(tiny_config, "sr", out, base)
    return dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, discriminator_trunk="detector", amp=False))


def test_d_built_on_the_detector_reads_a_patch_as_the_detector_reads_an_image(tiny_config, tiny_synth, tmp_path):
    """D's trunk is the detector's own backbone (not a copy, not D's parameter); its heads start as
    the detector's box head: on a whole image as the patch, D answers what the detector's box head
    answers for the RoI that is the image less its context margin."""
    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", tmp_path / "base")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=9).eval()
    detector, d = model.detector, model.discriminator
    for p in detector.roi_heads.box_predictor.parameters():  # trained heads differ from D's fresh copy ...
        p.data.normal_()
    d.init_from_detector()  # ... until D starts from them, as init_detector_from does
    assert not {id(p) for p in d.parameters()} & {id(p) for p in detector.parameters()}
    assert not any("backbone" in k for k in model.state_dict() if k.startswith("discriminator."))

    image = _images(tiny_synth, 1)[0]  # 128 px: the tiny detector's own size, so it does not resize
    c, side = cfg.sr.context, image.shape[-1]
    box = torch.tensor([[c, c, 1 + c, 1 + c]]) * side / (1 + 2 * c)
    with torch.no_grad():
        image_list, _ = detector.transform([image])
        assert image_list.tensors.shape[-1] == side
        features = detector.backbone(image_list.tensors)
        heads = detector.roi_heads
        pooled = heads.box_roi_pool(features, [box], image_list.image_sizes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        out = d(image[None])
    assert torch.allclose(out["cls"], logits, atol=1e-4) and torch.allclose(out["box"], deltas, atol=1e-4)
    assert out["adv"].shape == (1,)
    # G's patches map to P2, which D computes alone, also before the detector's pooler has run (it
    # sets its scales and level mapper on its first forward): the same answers as from the whole pyramid
    side = cfg.sr.lr_size * cfg.sr.scale
    patches = torch.rand(3, 3, side, side)
    coarser = []  # calls of P3's 3x3 conv
    detector.backbone.fpn.layer_blocks[1].register_forward_hook(lambda *args: coarser.append(1))
    pool = heads.box_roi_pool
    pool.scales = pool.map_levels = None  # as in a model that scores with another's shared detect
    with torch.no_grad():
        unset = d(patches)
        assert not coarser and pool.map_levels is None  # nor does D's read set them from its patches
        features = detector.backbone(detector.transform.normalize(patches))
        whole = d.judge(pool(features, [d.object_box(side, side, "cpu")] * 3, [(side, side)] * 3))
        assert coarser and pool.map_levels is not None
        finest = d(patches)
    assert all(torch.equal(unset[k], finest[k]) for k in finest)
    # equal up to float rounding (the read's products for its 2 x 2 convolutions against torchvision's
    # convolutions), on logits and deltas up to about 50 from the predictor's random weights
    assert all(torch.allclose(finest[k], whole[k], atol=1e-4) for k in finest)
    detector.train()  # a detector in train mode would update its BatchNorm statistics from D's patches
    with pytest.raises(RuntimeError, match="must be in eval mode"):
        d(image[None])
    detector.eval()
    # D's heads are its own: training them leaves the detector's untouched
    next(d.box_predictor.parameters()).data.add_(1.0)
    assert not torch.equal(next(d.box_predictor.parameters()), next(heads.box_predictor.parameters()))

    with pytest.raises(ValueError, match="only the staged schedule keeps frozen"):
        dataclasses.replace(cfg, sr_train=dataclasses.replace(cfg.sr_train, schedule="joint"))


class _ReadsEveryTime(torch.nn.Module):
    """A D that reads its patches again in every forward: BasicSR's step, D(cat(z_HR, G(z_LR)))
    then D(G(z_LR)), as sr_step ran before D's frozen read was shared."""

    read_trains = False  # its read is the identity: judge reads again every time

    def __init__(self, discriminator):
        super().__init__()
        self.whole = discriminator

    def read(self, patches):
        return patches

    def judge(self, patches):
        return self.whole(patches)


def _branch_batch(cfg, seed: int = 0) -> dict:
    """A sampled RoI batch as training_forward gives sr_step (random patches, 6 RoIs, 9 classes)."""
    g = torch.Generator().manual_seed(seed)
    n, hr = 6, cfg.sr.lr_size * cfg.sr.scale
    return {"lr_patch": torch.rand(n, 3, cfg.sr.lr_size, cfg.sr.lr_size, generator=g),
            "hr_patch": torch.rand(n, 3, hr, hr, generator=g), "hr_valid": torch.ones(n, dtype=torch.bool),
            "head_deltas": torch.randn(n, 36, generator=g) * 0.1, "generated": torch.ones(n, dtype=torch.bool),
            "native_patch": torch.zeros(0, 3, hr, hr),
            "labels": torch.tensor([0, 3, 0, 5, 0, 1]), "regression_targets": torch.randn(n, 4, generator=g) * 0.1}


def test_sr_step_reads_each_patch_once_and_steps_as_basicsrs_two_forwards(tiny_config, tmp_path):
    """D built on the detector reads z_HR and G(z_LR) once per step (its frozen backbone is most of
    a step's time), and the step moves G and D as the two full forwards of BasicSR's step would;
    the branches of a pass read the same z_HR once, each ending as it would alone."""
    from sodlab.models.discriminator import DetectorTrunkDiscriminator
    from sodlab.train import make_optimizers

    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", tmp_path / "base")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=9).train()
    model.detector.eval().requires_grad_(False)  # as init_detector_from leaves it
    batch = _branch_batch(cfg)
    with torch.no_grad():  # the pooler sets its levels on first use (in training, the detector's forward
        model.discriminator(batch["hr_patch"])  # does), and D reads P2 alone from then on

    def stepped(m, shared=None, reads=None):
        m = copy.deepcopy(m)
        m.discriminator._detector = [m.detector]
        if reads is not None and isinstance(m.discriminator, DetectorTrunkDiscriminator):
            read = m.discriminator.read
            m.discriminator.read = lambda patches: reads.append(len(patches)) or read(patches)
        record = sr_step(m, batch, make_optimizers(cfg, m), cfg, it=0, shared=shared)
        return m, record

    reads = []
    ours, record = stepped(model, reads=reads)
    assert reads == [6, 6], "z_HR once, G(z_LR) once"
    reference = copy.deepcopy(model)
    reference.discriminator = _ReadsEveryTime(reference.discriminator)
    theirs, their_record = stepped(reference)
    assert record["d_total"] == pytest.approx(their_record["d_total"], rel=1e-5)
    assert record["g_total"] == pytest.approx(their_record["g_total"], rel=1e-5)
    for name in ("generator", "discriminator"):
        mine, other = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        other = {k.removeprefix("whole."): v for k, v in other.items()}
        assert mine.keys() == other.keys()
        assert all(torch.allclose(mine[k], other[k], atol=1e-6) for k in mine), name

    # two branches of a pass (a second D trained differently): z_HR read once for both
    other_branch = copy.deepcopy(model)
    for p in other_branch.discriminator.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    shared, reads = SharedWork(), []
    first, _ = stepped(model, shared, reads)
    read_seconds = shared.seconds
    second, _ = stepped(other_branch, shared, reads)
    assert reads == [6, 6, 6], "the second branch reads only its own G(z_LR)"
    assert read_seconds > 0 and shared.seconds == read_seconds, "the pass times the shared read once, to split it"
    second_alone, _ = stepped(other_branch)
    for a, b in ((first, ours), (second, second_alone)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # patches that differ (another branch's RoIs) are read again, not taken from the pass
    (read_for_the_pass,) = [features for _, features in shared.done.values()]
    other_patches = batch["hr_patch"].flip(-1)
    assert not torch.equal(read_real_patches(model.discriminator, other_patches, shared), read_for_the_pass)


@pytest.mark.slow
def test_staged_run_with_d_built_on_the_detector(tiny_config, tmp_path):
    """D's losses train D's heads and G, through the detector's backbone, which stays the finished
    detector's, bitwise; the checkpoint holds that backbone once, and the run reloads as it ended."""
    base = train(dataclasses.replace(tiny_config, out=str(tmp_path / "base")), progress=False)
    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", base)
    fresh = build_branch(dataclasses.replace(cfg, out=str(tmp_path / "fresh")), 9, "cpu", False, False).model
    assert torch.equal(fresh.discriminator.box_predictor.cls_score.weight,
                       fresh.detector.roi_heads.box_predictor.cls_score.weight), "D starts as the finished box head"
    run_dir = train(cfg, progress=False)
    before = torch.load(base / "checkpoints" / "last.pt", weights_only=False)["model"]
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after["detector." + k]) for k in before)
    assert not any("backbone" in k for k in after if k.startswith("discriminator."))
    head = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(after["discriminator.box_predictor.cls_score.weight"], before[head]), "D's heads trained"
    norms = [r["g_gradnorm_cls"] for r in _log(run_dir) if "g_gradnorm_cls" in r]
    assert norms and all(n > 0 for n in norms), "D's class loss reaches G"

    from sodlab.train import load_trained_model

    _, model = load_trained_model(run_dir)
    assert torch.equal(model.discriminator.box_predictor.cls_score.weight,
                       after["discriminator.box_predictor.cls_score.weight"])
    assert model.discriminator._detector[0] is model.detector


def _tuned(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, discriminator_trunk="detector-tuned"))


def test_d_with_a_tuned_trunk_starts_as_the_frozen_one_and_reads_with_gradients(tiny_config, tmp_path):
    """detector-tuned: D's trunk is its own copy of the detector's backbone and FPN, loaded with
    them, so D first answers as D on the detector's own backbone does; its step reads z_HR and
    G(z_LR) together, with gradients for the copy (never from a pass's shared read), then G(z_LR)
    again for G's step, and it moves the copy from sr_train.discriminator_tune_from on (layer3 and the
    FPN), but not its earlier stages, the detector, or any BatchNorm statistic."""
    from sodlab.train import make_optimizers

    cfg = _detector_trunk_config(tiny_config, tmp_path / "sr", tmp_path / "base")
    torch.manual_seed(0)
    model = build_model(_tuned(cfg), num_classes=9).train()
    detector, d = model.detector.eval().requires_grad_(False), model.discriminator
    for p in detector.backbone.parameters():  # a trained backbone differs from the copy made at build ...
        p.data.add_(0.05 * torch.randn_like(p))
    d.init_from_detector()  # ... until D loads it, as init_detector_from does
    assert d.read_trains and not d.trunk.training, "the copy's BatchNorm keeps the detector's statistics"
    assert not {id(p) for p in d.parameters()} & {id(p) for p in detector.parameters()}
    frozen = copy.deepcopy(d)
    frozen.trunk = None
    batch = _branch_batch(cfg)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(d(batch["hr_patch"]).values(), frozen(batch["hr_patch"]).values()))
    d.trunk.train()  # the copy in train mode would move its BatchNorm statistics with D's patches
    with pytest.raises(RuntimeError, match="must be in eval mode"):
        d(batch["hr_patch"])
    d.train()
    assert not d.trunk.training, "D's own train() keeps the copy in eval mode"

    reads, read = [], d.read
    d.read = lambda patches: reads.append(len(patches)) or read(patches)
    detector_before = copy.deepcopy(detector.state_dict())
    trunk_before = copy.deepcopy(d.trunk.state_dict())
    shared = SharedWork()
    sr_step(model, batch, make_optimizers(_tuned(cfg), model), _tuned(cfg), it=0, shared=shared)
    assert reads == [12, 6] and not shared.done
    assert all(torch.equal(v, detector_before[k]) for k, v in detector.state_dict().items())
    after = d.trunk.state_dict()
    moved = [k for k, v in after.items() if not torch.equal(v, trunk_before[k])]
    assert moved and all(k.endswith(("weight", "bias")) for k in moved), "weights train, running statistics stay"
    stages = {k.split(".")[1] if k.startswith("body.") else "fpn" for k in moved}
    assert stages == {"layer3", "layer4", "fpn"}, stages
    assert not any(p.requires_grad for p in d.trunk.body.layer2.parameters()), "G's step restores only what trained"
    assert all(p.requires_grad for p in d.trunk.body.layer3.parameters())


@pytest.mark.slow
def test_staged_run_with_a_tuned_trunk(tiny_config, tmp_path):
    """A staged run of detector-tuned leaves the finished detector bitwise, trains D's copy of its
    backbone, saves that copy in D's weights, and reloads as it ended."""
    from sodlab.train import load_trained_model

    base = train(dataclasses.replace(tiny_config, out=str(tmp_path / "base")), progress=False)
    run_dir = train(_tuned(_detector_trunk_config(tiny_config, tmp_path / "sr", base)), progress=False)
    before = torch.load(base / "checkpoints" / "last.pt", weights_only=False)["model"]
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after["detector." + k]) for k in before)
    prefix = "discriminator.trunk."
    copied = {k.removeprefix(prefix): v for k, v in after.items() if k.startswith(prefix)}
    assert copied.keys() == {k.removeprefix("backbone.") for k in before if k.startswith("backbone.")}
    late, early = "body.layer4.0.conv1.weight", "body.layer1.0.conv1.weight"
    assert not torch.equal(copied[late], before["backbone." + late]), "the copy's late stages trained"
    assert torch.equal(copied[early], before["backbone." + early]), "its early stages are the detector's"
    assert torch.equal(copied["body.layer4.0.bn1.running_mean"], before["backbone.body.layer4.0.bn1.running_mean"])
    _, model = load_trained_model(run_dir)
    assert torch.equal(model.discriminator.trunk.body.layer4[0].conv1.weight, copied[late])

"""The training loop: loss goes down, runs are reproducible, resume continues where it stopped."""
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sodlab.config import TrainConfig
from sodlab.io import read_json
from sodlab.runs import train_and_finish
from sodlab.train import autocast_dtype, batch_indices, load_trained_model, lr_factor, train


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_batch_order_is_a_function_of_seed_and_iteration():
    full = [b for _, b in zip(range(10), batch_indices(7, 3, seed=1, start_iter=0))]
    resumed = [b for _, b in zip(range(6), batch_indices(7, 3, seed=1, start_iter=4))]
    assert resumed == full[4:]
    # every epoch is a permutation: the first 7 draws cover every image exactly once
    flat = [i for b in full for i in b]
    assert sorted(flat[:7]) == list(range(7))
    assert full != [b for _, b in zip(range(10), batch_indices(7, 3, seed=2, start_iter=0))]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(iters=100, warmup_iters=10, schedule="cosine")
    assert lr_factor(cfg, 0) == pytest.approx(0.001)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 55) == pytest.approx(0.5)
    assert lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(iters=90, warmup_iters=0, schedule="step")
    assert [lr_factor(step, i) for i in (59, 60, 79, 80)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_a_warm_restart_starts_the_cosine_again():
    """restart_at / restart_lr: the plain schedule before, then restart_lr, cosine down to 0 at iters."""
    plain = TrainConfig(iters=100, warmup_iters=10)
    warm = dataclasses.replace(plain, restart_at=80, restart_lr=0.3)
    assert [lr_factor(warm, i) for i in (0, 10, 79)] == [lr_factor(plain, i) for i in (0, 10, 79)]
    assert lr_factor(plain, 80) == pytest.approx(0.5 * (1 + math.cos(math.pi * 70 / 90)))  # about 0.117
    assert [lr_factor(warm, i) for i in (80, 90, 100)] == pytest.approx([0.3, 0.15, 0.0], abs=1e-12)
    for half in (dict(restart_at=80), dict(restart_lr=0.3), dict(restart_at=80, restart_lr=0.3, schedule="step")):
        with pytest.raises(ValueError, match="a warm restart of the cosine schedule"):
            dataclasses.replace(plain, **half)
    with pytest.raises(ValueError, match="restart_at must be in 0..iters-1"):
        dataclasses.replace(plain, restart_at=100, restart_lr=0.3)


def test_amp_dtype_follows_the_device_and_the_switch():
    cpu = torch.device("cpu")
    assert autocast_dtype(TrainConfig(amp=False), cpu) is None
    assert autocast_dtype(TrainConfig(amp=True), torch.device("cuda")) == torch.float16
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert autocast_dtype(TrainConfig(amp=True), cpu) == expected


def test_float32_and_amp_runs_both_train(tiny_config, tmp_path):
    """amp=False is plain float32; amp=True (bf16 where the CPU has it) must give other weights
    there, or the switch would be dead."""
    digests = {}
    for amp in (False, True):
        run_dir = train(dataclasses.replace(tiny_config, amp=amp, iters=2, out=str(tmp_path / f"amp{amp}")),
                        progress=False)
        digests[amp] = sum(v.double().sum().item() for v in _weights(run_dir).values() if v.is_floating_point())
        assert all(math.isfinite(m["loss"]) for m in _metrics(run_dir))
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert digests[True] != digests[False]


@pytest.mark.slow
def test_short_training_lowers_the_loss(tiny_config):
    tiny_config = dataclasses.replace(tiny_config, iters=40, warmup_iters=5)
    run_dir = train_and_finish(tiny_config, progress=False)
    losses = [m["loss"] for m in _metrics(run_dir)]
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    cfg = read_json(run_dir / "config.json")
    assert cfg["seed"] == tiny_config.seed and cfg["versions"]["torch"] == torch.__version__
    stats = read_json(run_dir / "eval.json")
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "fine_bins"} <= set(stats)
    assert isinstance(read_json(run_dir / "detections_val.json"), list)


def test_existing_run_is_never_overwritten(tiny_config):
    run_dir = train(tiny_config, progress=False)
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny_config, progress=False)
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_a_changed_config(tiny_config):
    train(tiny_config, progress=False)
    tiny_config = dataclasses.replace(tiny_config, lr=0.5)
    with pytest.raises(ValueError, match="changed config.*lr"):
        train(tiny_config, resume=True, progress=False)


@pytest.mark.slow  # two trainings
def test_same_seed_same_weights(tiny_config, tmp_path):
    a = train(tiny_config, progress=False)
    tiny_config = dataclasses.replace(tiny_config, out=str(tmp_path / "again"))
    b = train(tiny_config, progress=False)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tiny_config, tmp_path):
    """SIGTERM mid-run saves a checkpoint; --resume ends with bitwise the same weights."""
    tiny_config = dataclasses.replace(tiny_config, iters=8)
    reference = train(tiny_config, progress=False)

    tiny_config = dataclasses.replace(tiny_config, out=str(tmp_path / "interrupted"))
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(json.dumps(tiny_config.to_dict()))
    script = ("import json,sys; from sodlab.config import TrainConfig; from sodlab.train import TrainingStopped, train\n"
              "try: train(TrainConfig.from_dict(json.load(open(sys.argv[1]))), progress=False)\n"
              "except TrainingStopped as e: sys.exit(e.exit_status)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(cfg_json)])
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=120) == 143, "a stopped run exits as the shell expects of SIGTERM (128 + 15)"
    stopped_at = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=False)["iteration"]
    assert 3 <= stopped_at < 8, "the signal arrived mid-run and the checkpoint records where"

    resumed = train(tiny_config, resume=True, progress=False)
    iters = [m["iter"] for m in _metrics(resumed)]
    assert iters == list(range(1, 9)), "resume continues from the saved iteration"
    w_ref, w_res = _weights(reference), _weights(resumed)
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_load_trained_model_round_trip(tiny_config):
    run_dir = train(tiny_config, progress=False)
    cfg, model = load_trained_model(run_dir)
    assert cfg.method == "baseline" and not model.training
    w = _weights(run_dir)
    assert all(torch.equal(v, w[k]) for k, v in model.state_dict().items())
    # it infers channels-last, with the detections of the same weights in NCHW (to float rounding)
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert nchw.backbone.body.conv1.weight.is_contiguous()
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (ours,), (theirs,) = model([image]), nchw([image])
    assert len(theirs["scores"]) > 0 and torch.equal(ours["labels"], theirs["labels"])
    assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-3) and torch.allclose(ours["scores"], theirs["scores"],
                                                                                        atol=1e-5)


def test_nan_loss_stops_with_the_term_named_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    import sodlab.train as train_module

    real_build = train_module.build_model

    def poisoned_build(cfg, num_classes):
        model = real_build(cfg, num_classes)
        real_forward, calls = model.forward, [0]

        def forward(images, targets=None):
            losses = real_forward(images, targets)
            calls[0] += 1
            if calls[0] == 5:
                losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
            return losses

        model.forward = forward
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned_build)
    tiny_config = dataclasses.replace(tiny_config, ckpt_every=2)
    with pytest.raises(FloatingPointError, match=r"iteration 5: loss loss_box_reg is not finite"):
        train(tiny_config, progress=False)
    run_dir = tiny_config.out
    ckpt = torch.load(f"{run_dir}/checkpoints/last.pt", weights_only=False)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not [p for p in os.listdir(f"{run_dir}/checkpoints") if p.endswith(".tmp")]


def test_a_run_branching_off_another_continues_its_schedule(tiny_config, tmp_path):
    """The bench's upscale and HR oracle branch off the baseline's run (TrainConfig.continue_from):
    they continue its weights, optimizer moments, RNG and batches from the kept checkpoint, so a
    branch with the parent's own method and data ends bitwise where the parent ends, and one at
    x2 input does not."""
    parent = train(dataclasses.replace(tiny_config, keep_checkpoint_at=4), progress=False)
    plain = train(dataclasses.replace(tiny_config, out=str(tmp_path / "plain")), progress=False)
    kept = torch.load(parent / "checkpoints" / "iter-4.pt", weights_only=False)
    assert kept["iteration"] == 4 and not (plain / "checkpoints" / "iter-4.pt").exists()
    parent_weights = _weights(parent)
    assert all(torch.equal(v, parent_weights[k]) for k, v in _weights(plain).items())  # keeping it changes nothing
    branch = dict(continue_at=4, continue_from=str(parent))
    same = train(dataclasses.replace(tiny_config, **branch, out=str(tmp_path / "same")), progress=False)
    assert all(torch.equal(v, parent_weights[k]) for k, v in _weights(same).items())
    assert [r["iter"] for r in map(json.loads, (same / "metrics.jsonl").read_text().splitlines())] == [5, 6]
    up = train(dataclasses.replace(tiny_config, **branch, method="upscale", out=str(tmp_path / "up")), progress=False)
    moved = [k for k, v in _weights(up).items() if v.is_floating_point() and not torch.equal(v, parent_weights[k])]
    assert moved and read_json(up / "config.json")["continue_from"] == str(parent)
    # a branch that does not continue the parent's schedule, or a point the parent did not keep: refused
    with pytest.raises(ValueError, match=r"config.json: this run continues its schedule, but differs from it in lr"):
        train(dataclasses.replace(tiny_config, **branch, lr=5e-4, out=str(tmp_path / "lr")), progress=False)
    warm = dict(restart_at=4, restart_lr=0.5)  # a warm restart at the branch point is the parent's schedule too
    with pytest.raises(ValueError, match=r"differs from it in restart_at, restart_lr"):
        train(dataclasses.replace(tiny_config, **branch, **warm, out=str(tmp_path / "lr")), progress=False)
    warm_parent = train(dataclasses.replace(tiny_config, keep_checkpoint_at=4, **warm, out=str(tmp_path / "wp")),
                        progress=False)
    warm_same = train(dataclasses.replace(tiny_config, continue_at=4, continue_from=str(warm_parent), **warm,
                                          out=str(tmp_path / "ws")), progress=False)
    first = json.loads((warm_same / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["iter"], first["lr"]) == (5, pytest.approx(0.5 * tiny_config.lr))
    warm_weights = _weights(warm_parent)
    assert all(torch.equal(v, warm_weights[k]) for k, v in _weights(warm_same).items())
    assert any(not torch.equal(v, parent_weights[k]) for k, v in warm_weights.items() if v.is_floating_point())
    with pytest.raises(FileNotFoundError, match=r"iter-3.pt: continue_from .* kept no checkpoint of iteration 3"):
        train(dataclasses.replace(tiny_config, continue_at=3, continue_from=str(parent), out=str(tmp_path / "p3")),
              progress=False)
    assert not (tmp_path / "lr").exists() and not (tmp_path / "p3").exists()
    for half in (dict(continue_from=str(parent)), dict(continue_at=4)):  # one without the other
        with pytest.raises(ValueError, match="give both or neither"):
            dataclasses.replace(tiny_config, **half)
    with pytest.raises(ValueError, match="a new detector run"):
        dataclasses.replace(tiny_config, **branch, method="sr", init_from=str(parent))


def test_a_detector_run_with_init_from_fine_tunes_that_detector(tiny_config, tmp_path):
    """upscale fine-tuned from a finished baseline (a warm restart of the schedule): one step at
    warm-up's first lr (1e-3 of the peak) leaves every weight next to the baseline's, yet trained;
    the same step from scratch is nowhere near them."""
    start = train(dataclasses.replace(tiny_config, seed=1), progress=False)  # not the seed-0 run's initial weights
    one_step = dict(method="upscale", iters=1, warmup_iters=1, ckpt_every=1)
    tuned = train(dataclasses.replace(tiny_config, **one_step, init_from=str(start), out=str(tmp_path / "tuned")),
                  progress=False)
    scratch = train(dataclasses.replace(tiny_config, **one_step, out=str(tmp_path / "scratch")), progress=False)
    base, w_tuned, w_scratch = _weights(start), _weights(tuned), _weights(scratch)
    # the learned weights; BatchNorm's running statistics follow the x2 images from the first batch
    floats = [k for k in base if base[k].is_floating_point() and ".running_" not in k]
    assert max((w_tuned[k] - base[k]).abs().max().item() for k in floats) < 1e-4
    assert any(not torch.equal(w_tuned[k], base[k]) for k in floats), "fine-tuned, not frozen"
    assert max((w_scratch[k] - base[k]).abs().max().item() for k in floats) > 1e-2
    assert read_json(tuned / "config.json")["init_from"] == str(start)

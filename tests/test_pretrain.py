"""PSNR-oriented G pretraining: pairs cut as inference cuts them, training beats bicubic, the cache."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sodlab import pretrain
from sodlab.data.coco import load_split
from sodlab.models.generator import SRGenerator
from sodlab.patches import box_side, expand_boxes, lr_patches
from sodlab.pretrain import (PretrainConfig, cut_pairs, evaluate_generator, init_generator_from,
                             load_generator, make_pairs, pretrain_generator, size_bin)

# A toy budget: few pairs, a narrow G, a learning rate high enough to move in a few dozen steps.
TOY = PretrainConfig(pairs_per_bin=120, channels=16, blocks=2, iters=100, warmup_iters=5, batch_size=8, lr=2e-3)


def _val_image(tiny_synth, index=0):
    dataset = load_split(tiny_synth, "val", train=False, hr_scale=4)
    image, target = dataset[index]
    return image.as_subclass(torch.Tensor), target["hr_image"].as_subclass(torch.Tensor)


def test_lr_patch_is_the_inference_patch_for_every_small_size(tiny_synth):
    image, twin = _val_image(tiny_synth)
    # sides 3 to 30 px, fractional corners: the < 8, 8-16 and 16-32 px bins
    boxes = torch.tensor([[10.3, 20.7, 13.5, 23.9], [40.2, 41.0, 46.9, 47.5], [60.0, 10.5, 71.25, 22.0],
                          [5.5, 70.1, 35.5, 99.9]])
    lr, hr = cut_pairs([image], [boxes], lr_size=16, scale=4, hr_images=[twin], hr_scale=4)
    assert torch.equal(lr, lr_patches([image], [boxes], 16))
    assert lr.shape == (4, 3, 16, 16) and hr.shape == (4, 3, 64, 64)
    # The HR patch is the same region of the twin. The image is the twin area-reduced by 4, so for
    # the pixel square [32, 48) x [48, 64) (no context, so that the region is exact in floats) the
    # LR patch is the image's pixels and the HR patch reduced by 4 is the LR patch, to 8-bit rounding.
    square = torch.tensor([[32.0, 48.0, 48.0, 64.0]])
    lr, hr = cut_pairs([image], [square], lr_size=16, scale=4, context=0.0, hr_images=[twin], hr_scale=4)
    assert torch.allclose(lr[0], image[:, 48:64, 32:48], atol=1e-6)
    assert torch.allclose(hr[0], twin[:, 192:256, 128:192], atol=1e-6)
    assert (F.avg_pool2d(hr, 4) - lr).abs().max() <= 0.5 / 255 + 1e-6


def test_cached_pairs_are_the_inference_cut_and_cover_every_bin(tiny_synth):
    cfg = dataclasses.replace(TOY, pairs_per_bin=40)
    pairs = make_pairs(tiny_synth, cfg, split="val")
    bins = size_bin(pairs["side"], cfg.size_bins)
    assert (bins >= 0).all() and set(bins.tolist()) == {0, 1, 2}
    assert pairs["lr"].dtype == torch.uint8 and pairs["hr"].shape[-1] == cfg.hr_size
    dataset = load_split(tiny_synth, "val", train=False)
    for image_id in pairs["image_ids"].unique().tolist():
        rows = pairs["image_ids"] == image_id
        image = dataset[dataset.ids.index(image_id)][0].as_subclass(torch.Tensor)
        expected = lr_patches([image], [pairs["boxes"][rows]], cfg.lr_size)
        # stored to 8 bits: within half a grey level of the float cut
        assert (pairs["lr"][rows].float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_image_protocol_pairs_are_area_reduced_large_rois(tiny_synth):
    cfg = dataclasses.replace(TOY, hr_source="image")
    pairs = make_pairs(tiny_synth, cfg, split="train")
    expanded = expand_boxes(pairs["boxes"])
    assert ((expanded[:, 2:] - expanded[:, :2]).min(dim=1).values >= cfg.hr_size - 1e-3).all()
    pooled = F.avg_pool2d(pairs["hr"].float() / 255, cfg.scale)
    assert (pooled - pairs["lr"].float() / 255).abs().max() <= 1 / 255 + 1e-6


def test_stratified_batches_draw_every_bin_equally():
    members = [torch.arange(0, 500), torch.arange(500, 510), torch.arange(510, 600)]
    index = pretrain._stratified_batch(members, 12, torch.Generator().manual_seed(0))
    counts = torch.bincount(size_bin(torch.cat([torch.full((500,), 4.0), torch.full((10,), 12.0),
                                                torch.full((90,), 20.0)])[index], (0, 8, 16, 32)))
    assert counts.tolist() == [4, 4, 4]
    assert box_side(torch.tensor([[0.0, 0.0, 4.0, 9.0]])).item() == 6.0


@pytest.mark.slow
def test_pretraining_lowers_the_pixel_loss_and_beats_bicubic(tiny_synth, tmp_path):
    result = pretrain_generator(tiny_synth, TOY, cache_dir=tmp_path, evaluate_split=None, log=None)
    pairs = torch.load(next(tmp_path.glob("pairs-*.pt")), weights_only=True)
    lr, hr = pairs["lr"].float() / 255, pairs["hr"].float() / 255
    with torch.no_grad():
        before = F.l1_loss(pretrain.build_generator(TOY)(lr), hr)  # the same initial weights
        after = F.l1_loss(result.generator(lr), hr)
    assert after < before
    report = evaluate_generator(result.generator, tiny_synth, TOY, split="val")  # held-out RoIs
    gains = {label: entry["G-bicubic"]["psnr"]["mean"] for label, entry in report["bins"].items()}
    assert set(gains) == {"<8", "8-16", "16-32"}
    assert all(gain > 0 for gain in gains.values()), gains


@pytest.mark.slow
def test_the_cache_is_reused_and_a_config_change_misses_it(tiny_synth, tmp_path, monkeypatch):
    cfg = dataclasses.replace(TOY, iters=3, warmup_iters=1)
    rng = torch.get_rng_state()
    first = pretrain_generator(tiny_synth, cfg, cache_dir=tmp_path, evaluate_split=None, log=None)
    # Neither training G nor reading it from the cache draws from the global RNG, so an SR run's
    # random stream (D's initial weights, flips) is the same on a cold cache and a warm one.
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.trained and first.record["train"]["iterations"] == 3 and first.record["train"]["seconds"] > 0
    assert first.path.with_suffix(".json").exists()

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    with monkeypatch.context() as m:
        m.setattr(pretrain, "train_generator", must_not_train)
        m.setattr(pretrain, "make_pairs", must_not_train)
        again = pretrain_generator(tiny_synth, cfg, cache_dir=tmp_path, evaluate_split=None, log=None)
    assert not again.trained and again.path == first.path
    assert torch.equal(torch.get_rng_state(), rng)
    pretrain.load_generator(first.path)
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(first.generator.state_dict().values(), again.generator.state_dict().values()):
        assert torch.equal(a, b)

    # A training knob misses the generator cache but reuses the pairs ...
    with monkeypatch.context() as m:
        m.setattr(pretrain, "make_pairs", must_not_train)
        other = pretrain_generator(tiny_synth, dataclasses.replace(cfg, lr=5e-4), cache_dir=tmp_path,
                                   evaluate_split=None, log=None)
    assert other.trained and other.path != first.path
    # ... and a patch knob misses both.
    resized = pretrain_generator(tiny_synth, dataclasses.replace(cfg, lr_size=8), cache_dir=tmp_path,
                                 evaluate_split=None, log=None)
    assert resized.trained and len(list(tmp_path.glob("pairs-*.pt"))) == 2
    assert resized.generator(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_config_follows_the_sr_branch_and_a_pretrained_g_loads_into_it(tiny_synth, tmp_path):
    from sodlab.config import SRConfig, SRTrainConfig

    sr = SRConfig(lr_size=16, scale=4, area_threshold=16.0**2, generator_channels=16, generator_blocks=2)
    cfg = PretrainConfig.from_sr(sr, SRTrainConfig(hr_source="twin"), iters=2, warmup_iters=1, pairs_per_bin=10)
    # G learns every small size (up to COCO's 32 px) even when the SR scope stops at 16 px ...
    assert cfg.size_bins == (0.0, 8.0, 16.0, 32.0) and (cfg.channels, cfg.blocks, cfg.hr_scale) == (16, 2, 4)
    assert cfg.lr == SRTrainConfig().pretrain_lr == PretrainConfig().lr
    assert PretrainConfig.from_sr(sr, SRTrainConfig(pretrain_lr=8e-4)).lr == 8e-4
    assert PretrainConfig.from_sr(SRConfig(area_threshold=8.0**2), SRTrainConfig()).size_bins == (0.0, 8.0, 16.0,
                                                                                                  32.0)
    # ... and a wider scope adds its own last bin
    assert PretrainConfig.from_sr(SRConfig(area_threshold=48.0**2), SRTrainConfig()).size_bins == (0.0, 8.0, 16.0,
                                                                                                   32.0, 48.0)
    result = pretrain_generator(tiny_synth, cfg, cache_dir=tmp_path, evaluate_split=None, log=None)
    fresh = SRGenerator(16, 2, 4)
    record = init_generator_from(fresh, result.path, lr_size=16)
    assert record["train"]["iterations"] == 2
    for a, b in zip(fresh.state_dict().values(), result.generator.state_dict().values()):
        assert torch.equal(a, b)
    # an SR run whose config names the file starts G from it
    from sodlab.config import make_config
    from sodlab.models import build_model
    from sodlab.train import init_generator

    run_cfg = make_config("cpu", method="sr", sr=sr, sr_train=SRTrainConfig(generator_init=str(result.path)))
    model = build_model(run_cfg, num_classes=9)
    init_generator(run_cfg, model)
    for a, b in zip(model.generator.state_dict().values(), result.generator.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pretrained G is"):
        init_generator_from(SRGenerator(32, 2, 4), result.path)
    with pytest.raises(ValueError, match="pretrained G is"):  # another upsampling tail
        init_generator_from(SRGenerator(16, 2, 4, upsample_channels=8), result.path)
    sub_pixel = dataclasses.replace(sr, generator_upsample_channels=8)
    assert PretrainConfig.from_sr(sub_pixel, SRTrainConfig()).upsample_channels == 8
    assert build_model(dataclasses.replace(run_cfg, sr=sub_pixel), num_classes=9).generator.arch["upsample_channels"] == 8
    with pytest.raises(ValueError, match="pretrained on 16 px LR patches"):
        init_generator_from(fresh, result.path, lr_size=32)


def test_bad_generator_file_is_a_clear_error(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="g.pt: not a pretrained generator file"):
        load_generator(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_generator(tmp_path / "missing.pt")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="hr_source"):
        PretrainConfig(hr_source="bicubic")
    with pytest.raises(ValueError, match="size_bins"):
        PretrainConfig(size_bins=(0, 16, 8))

"""The Faster R-CNN builders: the paper's four backbones, the CPU preset, and the weights policy."""
import os

import pytest
import torch

from sodlab.models.detector import build_detector, imagenet_weights, preset


def test_cpu_preset_is_a_narrow_resnet18_fpn_with_8px_anchors():
    model = build_detector(preset("cpu"), num_classes=9)
    assert model.backbone.out_channels == 128
    # two octave scales per level, from 8 px on the stride-4 level to 181 px on the coarsest
    assert model.rpn.anchor_generator.sizes == ((8, 11), (16, 23), (32, 45), (64, 91), (128, 181))
    assert model.rpn.head.cls_logits.out_channels == 2 * 3  # scales x aspect ratios per location
    assert model.roi_heads.box_predictor.cls_score.out_features == 9
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 9 * 4
    features = model.backbone(torch.rand(1, 3, 256, 256))
    # strides 4, 8, 16, 32 and the max-pool level
    assert [f.shape[-1] for f in features.values()] == [64, 32, 16, 8, 4]
    assert all(p.requires_grad for p in model.parameters()), "from scratch, nothing is frozen"


@pytest.mark.parametrize("name,channels", [("r50", 1024), ("r101", 1024), ("r50-fpn", 256), ("r101-fpn", 256)])
def test_paper_backbones(name, channels):
    cfg = preset(name, pretrained=False)
    model = build_detector(cfg, num_classes=81)
    assert model.backbone.out_channels == channels
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    features = model.backbone(torch.rand(1, 3, 64, 64))
    if cfg.fpn:
        assert len(features) == 5
    else:  # one C4 map at stride 16
        assert features.shape[-1] == 4


def test_normalised_box_head_and_fpn_option():
    model = build_detector(preset("cpu", box_head="4conv1fc", fpn_norm=True), num_classes=9)
    norms = [m for m in model.roi_heads.box_head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.backbone.fpn.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in build_detector(preset("cpu"), 9).modules())
    model.eval()
    (out,) = model([torch.rand(3, 256, 256)])
    assert set(out) == {"boxes", "labels", "scores"}
    with pytest.raises(ValueError, match="box_head"):
        build_detector(preset("cpu", box_head="3mlp"), num_classes=9)
    with pytest.raises(ValueError, match="same number of anchor sizes"):
        build_detector(preset("cpu", anchor_sizes=((8,), (16, 23), (32,), (64,), (128,))), num_classes=9)


def test_c4_presets_put_every_anchor_size_on_one_map():
    model = build_detector(preset("r50", pretrained=False), num_classes=81)
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)


def test_missing_imagenet_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"resnet50.*not in the torch cache.*pretrained=False"):
        build_detector(preset("r50"), num_classes=81)
    # With the file in the cache the enum is returned (the weights then load offline).
    from torchvision.models import ResNet18_Weights

    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)).write_bytes(b"")
    assert imagenet_weights("resnet18") is ResNet18_Weights.IMAGENET1K_V1


def test_upscale_factor_moves_the_resize_target():
    model = build_detector(preset("cpu"), num_classes=3, image_scale=2.0)
    assert model.transform.min_size == (512,) and model.transform.max_size == 512


def test_inference_output_is_torchvision_format():
    torch.manual_seed(0)
    model = build_detector(preset("cpu"), num_classes=4).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 256, 256), torch.rand(3, 200, 256)])
    assert len(out) == 2
    for o in out:
        assert set(o) == {"boxes", "labels", "scores"}
        assert o["boxes"].shape[1] == 4 and o["boxes"].dtype == torch.float32
        assert o["labels"].dtype == torch.int64

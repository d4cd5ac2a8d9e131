"""Each loss of sodlab.losses against values worked out by hand on tiny tensors."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import fastrcnn_loss

from sodlab.losses import (
    GANLossWeights,
    adversarial_loss_g,
    classification_loss,
    discriminator_adv_loss,
    discriminator_objective,
    generator_objective,
    mse_loss,
    regression_loss,
    tv_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_adversarial_loss_g_values_both_forms():
    logits = torch.tensor([0.0, LN3])  # D = sigmoid: 0.5 and 0.75
    # non-saturating: mean(-log D) = (-ln 0.5 - ln 0.75) / 2 = (0.693147 + 0.287682) / 2 = 0.490415
    assert adversarial_loss_g(logits).item() == pytest.approx(0.490415, abs=1e-5)
    # saturating (the paper literally): mean log(1 - D) = (ln 0.5 + ln 0.25) / 2 = -1.039721
    assert adversarial_loss_g(logits, saturating=True).item() == pytest.approx(-1.039721, abs=1e-5)


def test_adversarial_loss_g_saturates_only_in_literal_form():
    # D confidently rejects the fake: l = -5, D = sigmoid(-5) = 0.0066929.
    for saturating, expected_grad in ((True, -0.0066929), (False, -(1 - 0.0066929))):
        logit = torch.tensor([-5.0], requires_grad=True)
        adversarial_loss_g(logit, saturating=saturating).backward()
        # d/dl log(1 - sigmoid(l)) = -sigmoid(l); d/dl -log sigmoid(l) = -(1 - sigmoid(l))
        assert logit.grad.item() == pytest.approx(expected_grad, abs=1e-6)


def test_discriminator_adv_loss_masks_invalid_reals():
    real = torch.tensor([LN3, 0.0])  # second real patch is not a valid HR target: ignored
    fake = torch.tensor([0.0, -LN3])
    valid = torch.tensor([True, False])
    # real: softplus(-ln 3) = ln(1 + 1/3) = 0.287682
    # fake: (softplus(0) + softplus(-ln 3)) / 2 = (0.693147 + 0.287682) / 2 = 0.490415
    assert discriminator_adv_loss(real, fake, valid).item() == pytest.approx(0.778097, abs=1e-5)
    # without a mask both reals count: (0.287682 + 0.693147) / 2 + 0.490415 = 0.980829
    assert discriminator_adv_loss(real, fake).item() == pytest.approx(0.980829, abs=1e-5)
    # no valid real at all: no adversarial signal
    assert discriminator_adv_loss(real, fake, torch.tensor([False, False])).item() == 0.0


def test_mse_is_per_pixel_mean_over_valid_patches():
    sr = torch.zeros(2, 1, 2, 2)
    hr = torch.zeros(2, 1, 2, 2)
    hr[0] = 0.5  # every pixel error 0.25 -> 0.25
    hr[1, 0, 0] = 1.0  # one row of 1s: (1 + 1 + 0 + 0) / 4 = 0.5
    assert mse_loss(sr, hr).item() == pytest.approx(0.375)  # (0.25 + 0.5) / 2
    assert mse_loss(sr, hr, torch.tensor([False, True])).item() == pytest.approx(0.5)
    assert mse_loss(sr, hr, torch.tensor([False, False])).item() == 0.0


def test_tv_isotropic_and_anisotropic():
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])[None, None]
    # forward differences on the 2x2 pixels with right/lower neighbours:
    # (0,0): dx 1, dy 0; (0,1): dx 1, dy 0; (1,0): dx 1, dy 0; (1,1): dx 1, dy -1
    # isotropic: 1 + 1 + 1 + sqrt(2) = 4.414214, / (3 * 3) = 0.490468
    assert tv_loss(x).item() == pytest.approx(0.490468, abs=1e-5)
    # anisotropic: 1 + 1 + 1 + 2 = 5, / 9 = 0.555556
    assert tv_loss(x, isotropic=False).item() == pytest.approx(0.555556, abs=1e-5)
    # three identical channels: mean over channels gives the same value
    assert tv_loss(x.expand(1, 3, 3, 3)).item() == pytest.approx(0.490468, abs=1e-5)
    # a flat patch has (almost) no variation: 4 * sqrt(1e-12) / 9
    assert tv_loss(torch.ones(1, 1, 3, 3)).item() < 1e-6


# Two RoIs, 3 classes (0 = background).
# SR logits row 0 [0, 0, ln 2] -> softmax [0.25, 0.25, 0.5], true class 2
# SR logits row 1 [ln 3, 0, 0] -> softmax [0.6, 0.2, 0.2],   true class 0 (background)
# HR logits row 0 [0, 0, 0]    -> softmax [1/3, 1/3, 1/3],   HR-valid
# HR logits row 1 anything: not HR-valid, must be ignored
SR_LOGITS = torch.tensor([[0.0, 0.0, LN2], [LN3, 0.0, 0.0]])
HR_LOGITS = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.0, -2.0]])
LABELS = torch.tensor([2, 0])
HR_VALID = torch.tensor([True, False])


def test_classification_loss_default_reading():
    # G side: CE on SR = (-ln 0.5 - ln 0.6) / 2 = (0.693147 + 0.510826) / 2 = 0.601986
    assert classification_loss(SR_LOGITS, None, LABELS).item() == pytest.approx(0.601986, abs=1e-5)
    # D side: + CE on valid HR = -ln(1/3) = 1.098612 -> 1.700598
    loss = classification_loss(SR_LOGITS, HR_LOGITS, LABELS, HR_VALID)
    assert loss.item() == pytest.approx(1.700598, abs=1e-5)


def test_classification_loss_literal_reading():
    # p = 1 - q_background on SR: row 0 p = 0.75, p* = 1 -> -ln 0.75 = 0.287682
    #                             row 1 p = 0.4,  p* = 0 -> -ln 0.6  = 0.510826;  mean 0.399254
    # + mean log D_cls(SR)_u = (ln 0.5 + ln 0.6) / 2 = -0.601986
    # + mean over valid log D_cls(HR)_u = ln(1/3) = -1.098612
    # = 0.399254 - 0.601986 - 1.098612 = -1.301344
    loss = classification_loss(SR_LOGITS, HR_LOGITS, LABELS, HR_VALID, literal=True)
    assert loss.item() == pytest.approx(-1.301344, abs=1e-5)
    # Background rows: the first two terms cancel exactly (-ln 0.6 + ln 0.6 = 0).
    assert classification_loss(SR_LOGITS[1:], None, LABELS[1:], literal=True).item() == pytest.approx(0.0, abs=1e-6)


def test_literal_cls_is_unbounded_below_for_d_and_pushes_g_the_wrong_way():
    # D can drive the literal loss to -inf by putting no mass on the true class of real HR patches.
    hr_wrong = torch.tensor([[0.0, 0.0, -100.0], [0.0, 0.0, 0.0]])
    assert classification_loss(SR_LOGITS, hr_wrong, LABELS, HR_VALID, literal=True).item() < -90
    assert classification_loss(SR_LOGITS, hr_wrong, LABELS, HR_VALID).item() > 90  # default: huge loss

    # Gradient w.r.t. the true-class SR logit of row 0 (q = [0.25, 0.25, 0.5]), each term / m = 2:
    # literal: d(-ln(1 - q0))/dl2 = -q0 q2 / (1 - q0) = -1/6; d ln q2 / dl2 = 1 - q2 = 0.5; sum 1/3, / 2
    # default: d(-ln q2)/dl2 = -(1 - q2) = -0.5, / 2
    for literal, expected in ((True, 1 / 6), (False, -0.25)):
        sr = SR_LOGITS.clone().requires_grad_(True)
        classification_loss(sr, None, LABELS, literal=literal).backward()
        assert sr.grad[0, 2].item() == pytest.approx(expected, abs=1e-5)
    # i.e. minimising the literal loss *lowers* the true class's score, the default raises it.


def test_regression_loss_hand_value_and_boxcoder_targets():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # torchvision Faster R-CNN's box head coder
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 11.0]])
    # dx = 10 * (6 - 5) / 10 = 1, dy = 1, dw = 5 * ln(10 / 10) = 0, dh = 0
    t_star_row = coder.encode_single(gt, proposal)[0]
    assert torch.allclose(t_star_row, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    t_star = torch.stack([t_star_row, torch.zeros(4)])

    labels = torch.tensor([2, 0])  # second RoI is background: its deltas must not count
    deltas = torch.zeros(2, 4 * 3)
    deltas[0, 8:12] = torch.tensor([1.1, 1.0, 0.5, -1.0])  # class 2 slots; diffs 0.1, 0, 0.5, -1
    deltas[0, 4:8] = 100.0  # class 1 slots of a class-2 RoI: ignored
    deltas[1] = 50.0  # background RoI: ignored
    # smooth L1, beta = 1/9: |0.1| < beta -> 0.5 * 0.01 / (1/9) = 0.045; 0 -> 0;
    # 0.5 -> 0.5 - 1/18 = 0.444444; 1 -> 1 - 1/18 = 0.944444; sum 1.433889; / m = 2 RoIs
    assert regression_loss(deltas, t_star, labels).item() == pytest.approx(0.716944, abs=1e-5)


def test_regression_loss_matches_torchvision_fastrcnn_loss():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 3, 2, 0, 3])
    deltas = torch.randn(6, 16)
    t_star = torch.randn(6, 4)
    _, box_loss = fastrcnn_loss(torch.randn(6, 4), deltas, [labels], [t_star])
    assert regression_loss(deltas, t_star, labels).item() == pytest.approx(box_loss.item(), rel=1e-6)


def _d_outputs(adv, cls, box):
    return {"adv": adv, "cls": cls, "box": box}


def test_generator_objective_weighted_sum_and_skipped_terms():
    sr = torch.zeros(2, 3, 4, 4)
    hr = torch.full((2, 3, 4, 4), 0.5)
    d_sr = _d_outputs(torch.tensor([0.0, LN3]), SR_LOGITS, torch.zeros(2, 12))
    t_star = torch.zeros(2, 4)
    w = GANLossWeights(adv=0.5, cls=2.0, reg=3.0, mse=1.0, tv=10.0)
    terms = generator_objective(d_sr, sr, hr, HR_VALID, LABELS, t_star, w)
    # adv 0.490415 (above), cls 0.601986 (above), reg 0 (deltas == targets), mse 0.25, tv ~0 (flat)
    assert terms["adv"].item() == pytest.approx(0.490415, abs=1e-5)
    assert terms["cls"].item() == pytest.approx(0.601986, abs=1e-5)
    assert terms["reg"].item() == 0.0
    assert terms["mse"].item() == pytest.approx(0.25)
    expected = 0.5 * 0.490415 + 2.0 * 0.601986 + 1.0 * 0.25 + 10.0 * terms["tv"].item()
    assert terms["total"].item() == pytest.approx(expected, abs=1e-5)
    off = generator_objective(d_sr, sr, hr, HR_VALID, LABELS, t_star, GANLossWeights(adv=0.0))
    assert off["adv"].item() == 0.0


def test_discriminator_objective_terms():
    d_hr = _d_outputs(torch.tensor([LN3, 0.0]), HR_LOGITS, torch.zeros(2, 12))
    d_sr = _d_outputs(torch.tensor([0.0, -LN3]), SR_LOGITS, torch.zeros(2, 12))
    terms = discriminator_objective(d_hr, d_sr, LABELS, torch.zeros(2, 4), HR_VALID)
    assert terms["adv"].item() == pytest.approx(0.778097, abs=1e-5)
    assert terms["cls"].item() == pytest.approx(1.700598, abs=1e-5)
    assert terms["reg"].item() == 0.0
    assert terms["total"].item() == pytest.approx(0.778097 + 1.700598, abs=1e-5)
    assert terms["real_prob"].item() == pytest.approx(0.75)  # sigmoid(ln 3), valid row only
    assert terms["fake_prob"].item() == pytest.approx((0.5 + 0.25) / 2)


def test_default_weights_document_their_sources():
    w = GANLossWeights()
    assert (w.adv, w.cls, w.reg, w.mse) == (1e-3, 0.01, 0.01, 1.0)
    assert w.tv == pytest.approx(2e-8 * 64 * 64)


def test_mse_sum_is_the_papers_squared_norm():
    from sodlab.losses import mse_loss

    sr, hr = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert mse_loss(sr, hr).item() == pytest.approx(0.25)
    assert mse_loss(sr, hr, reduction="sum").item() == pytest.approx(0.25 * 3 * 4 * 4)

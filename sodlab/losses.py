r"""The paper's loss terms, one function each, and the G and D objectives built from them.

Notation (the paper's): z_LR / z_HR are the LR / HR patches of RoI i, G(z_LR) the SR patch, D_thetaD
D's adversarial head, D_cls its class head, t_SR its box deltas, u_i the RoI's class (0 = background),
m the number of sampled RoIs. D's outputs are logits (see MultiTaskDiscriminator), so every
"D(.)" below is sigmoid(adv logit) and every "D_cls(.)" is softmax(cls logits) at the true class;
logs of probabilities are computed from the logits (softplus / log_softmax), never as log(sigmoid).

The paper's objective, quoted:

    \max_{\theta_D} \min_{\theta_G} \left( \frac{1}{m} \sum_{i=1}^m \log D_{\theta_D}(z_{HR}^{(i)}) \right)
    + \alpha L_{adv} + \beta L_{cls} + \gamma L_{reg} + L_{TV} + L_{MSE}

Read as two minimisations (the usual way a GAN is trained):
  G: minimise  alpha L_adv + beta L_cls + gamma L_reg + w_tv L_TV + w_mse L_MSE   (generator_objective)
  D: minimise  -[E log D(z_HR) + E log(1 - D(G(z_LR)))] + its own class and box losses on the HR and
     SR patches                                                          (discriminator_objective)
D *minimises* L_cls and L_reg (it is the classifier and regressor, as in SOD-MTGAN), even though the
literal max over theta_D would make it maximise them; and the real and fake terms of D's adversarial
loss get equal weight (standard GAN), whereas the literal objective would scale the fake term by alpha.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sodlab.config import GANLossWeights


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of values[mask]; an exact 0 that stays in the graph when nothing is selected."""
    if mask is not None:
        values = values[mask]
    if values.numel() == 0:
        return values.sum() * 0.0
    return values.mean()


def adversarial_loss_g(d_fake_logits: Tensor, saturating: bool = False) -> Tensor:
    r"""G's adversarial loss on D's adv logits of SR patches.

    Paper: $L_{adv} = \frac{1}{m} \sum_{i=1}^m \log(1 - D_{\theta_D}(G_{\theta_G}(z_{LR}^{(i)})))$

    ``saturating=True`` is that formula literally: mean log(1 - sigmoid(l)) = mean(-softplus(l)),
    which G minimises. Its gradient d/dl = -sigmoid(l) vanishes exactly when D confidently rejects
    the SR patches (l << 0), i.e. early in training, so by default we use the non-saturating form
    of Goodfellow et al. (2014), also used by SRGAN: mean -log D(G(z)) = mean softplus(-l), which
    has the same fixed point and a gradient of -(1 - sigmoid(l)) -> -1 where the literal one dies.
    """
    if saturating:
        return (-F.softplus(d_fake_logits)).mean()
    return F.softplus(-d_fake_logits).mean()


def discriminator_adv_loss(d_real_logits: Tensor, d_fake_logits: Tensor, real_valid: Tensor | None = None) -> Tensor:
    r"""D's side of the adversarial game, as binary cross-entropy with logits.

    Paper: D maximises $\frac{1}{m} \sum_{i=1}^m \log D_{\theta_D}(z_{HR}^{(i)})$ together with
    $\log(1 - D_{\theta_D}(G_{\theta_G}(z_{LR}^{(i)})))$ from $L_{adv}$, i.e. minimises
        mean_{valid i} softplus(-l_real_i)  +  mean_i softplus(l_fake_i)
    (BCE against 1 for real HR patches, against 0 for SR patches). Only HR-valid RoIs are real
    samples (an interpolated "HR" patch is not real HR detail); every SR patch is a fake. With no
    valid real patch in the batch the loss is 0: a fake-only batch would just teach D "everything
    is fake" and hand G a meaningless adversarial gradient.
    """
    if real_valid is not None and not bool(real_valid.any()):
        return (d_real_logits.sum() + d_fake_logits.sum()) * 0.0
    real_term = _masked_mean(F.softplus(-d_real_logits), real_valid)
    fake_term = F.softplus(d_fake_logits).mean()
    return real_term + fake_term


def mse_loss(sr: Tensor, hr: Tensor, valid: Tensor | None = None, reduction: str = "mean") -> Tensor:
    r"""Pixel reconstruction loss between SR and HR patches.

    Paper: $L_{MSE} = \frac{1}{m} \sum_{i=1}^m \left\| z_{HR}^{(i)} - G_{\theta_G}(z_{LR}^{(i)}) \right\|_2^2$

    Read as a per-pixel mean (over channels and pixels, as SRGAN's 1/(r^2 W H) normalisation), not
    the raw squared norm, so its scale does not depend on the patch size; then averaged over the
    HR-valid RoIs only (the others have no real HR target). ``reduction="sum"`` is the paper's
    literal squared norm per patch (the per-pixel mean times the number of values, 3 x 64 x 64 at
    hr_size 64), whose gradient is that much larger against the other terms.
    """
    if sr.shape != hr.shape:
        raise ValueError(f"mse_loss: SR {tuple(sr.shape)} and HR {tuple(hr.shape)} patches differ in shape")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"mse_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    per_patch = (hr - sr).pow(2).flatten(1)
    per_patch = per_patch.mean(dim=1) if reduction == "mean" else per_patch.sum(dim=1)
    return _masked_mean(per_patch, valid)


def tv_loss(sr: Tensor, valid: Tensor | None = None, isotropic: bool = True, eps: float = 1e-12) -> Tensor:
    r"""Total variation of the SR patches.

    Paper: $L_{TV} = \frac{1}{r^2_{WH}} \sum_{i=1}^{r_W} \sum_{j=1}^{r_H} \left\| \nabla G_{\theta_G}(z_{LR}^{(i,j)}) \right\|$

    Read with SRGAN's notation: r^2 W H = r W x r H is the number of pixels of the SR patch (r the
    scale, W x H the LR size), so L_TV is the per-pixel mean of the gradient norm. The gradient is
    the forward difference (dx, dy) at every pixel (i, j) that has a right and a lower neighbour,
    taken per channel; ||.|| is the isotropic norm sqrt(dx^2 + dy^2 + eps) (the paper's norm of the
    gradient vector; eps keeps its derivative finite on flat regions), or |dx| + |dy| with
    ``isotropic=False``. Per patch: sum over pixels / (H W), mean over channels; then the mean over
    the selected patches (``valid``).
    """
    dx = sr[:, :, :-1, 1:] - sr[:, :, :-1, :-1]
    dy = sr[:, :, 1:, :-1] - sr[:, :, :-1, :-1]
    if isotropic:
        norm = torch.sqrt(dx.pow(2) + dy.pow(2) + eps)
    else:
        norm = dx.abs() + dy.abs()
    height, width = sr.shape[-2:]
    per_patch = norm.sum(dim=(2, 3)).mean(dim=1) / (height * width)
    return _masked_mean(per_patch, valid)


def classification_loss(
    sr_logits: Tensor,
    hr_logits: Tensor | None,
    labels: Tensor,
    hr_valid: Tensor | None = None,
    literal: bool = False,
) -> Tensor:
    r"""D_cls's classification loss on SR (and HR) patches.

    Paper: $L_{cls} = \frac{1}{m} \sum_{i=1}^m \left[ - \left( \log \left( p^{(i)} p^{*(i)} + (1 - p^{(i)})(1 - p^{*(i)}) \right) - \log(D_{cls}(G_{\theta_G}(z_{LR}^{(i)}))) \right) + \log(D_{cls}(z_{HR}^{(i)})) \right]$

    How we read the symbols: p, p* are Faster R-CNN's notation for "predicted probability that the
    RoI is an object" and "1 if it is one (u_i >= 1), else 0"; we take p from D_cls on the SR patch,
    p = 1 - softmax(sr_logits)[background]. D_cls(x) is softmax(D's class logits on x) at the true
    class u_i. Expanded, the literal formula is

        -log(p p* + (1-p)(1-p*))  +  log D_cls(G(z_LR))_u  +  log D_cls(z_HR)_u

    i.e. a binary object/background cross-entropy on SR, *plus* the log-likelihoods of the true
    class on SR and HR. That is ill-posed as a loss to minimise:
      * the HR term log D_cls(z_HR)_u <= 0 goes to -inf when D puts zero probability on the true
        class of real patches, so D's loss is unbounded below and rewards misclassifying HR;
      * the first two terms cancel exactly for background RoIs (p* = 0: -log(1-p) = -log q_0), and
        for objects they equal log(q_u / p) <= 0, which G minimises by *lowering* the true class's
        share among the object classes; so G would learn to make SR patches harder to classify,
        the opposite of the method's aim (the ablation's "w/o clsloss" loses most of APs).
    Signs of the two D_cls terms were evidently meant as in SOD-MTGAN's L_cls, the cross-entropy
    of D_cls on the SR patch and on the HR patch, which also covers the object/background decision
    (softmax over C + 1 classes), so the p-term adds nothing and is dropped. We implement that:

        default:  mean_i CE(sr_logits_i, u_i)  +  mean_{valid i} CE(hr_logits_i, u_i)

    the second term only when ``hr_logits`` is given (D's step; it is constant in G, so G's
    objective passes None and gets the cross-entropy on SR patches). Each term is averaged over the
    RoIs it covers (HR: the HR-valid ones). ``literal=True`` computes the expanded formula above,
    with the same averaging, for study; do not train D with it.
    """
    sr_log_probs = F.log_softmax(sr_logits, dim=1)
    sr_log_q = sr_log_probs.gather(1, labels[:, None]).squeeze(1)  # log D_cls(G(z_LR)) at u_i
    hr_log_q = None
    if hr_logits is not None:
        hr_log_q = F.log_softmax(hr_logits, dim=1).gather(1, labels[:, None]).squeeze(1)

    if not literal:
        loss = _masked_mean(-sr_log_q, None)
        if hr_log_q is not None:
            loss = loss + _masked_mean(-hr_log_q, hr_valid)
        return loss

    is_object = labels >= 1
    log_p_background = sr_log_probs[:, 0]
    log_p_object = torch.log1p(-log_p_background.exp().clamp(max=1 - 1e-7))  # log(1 - q_0)
    # -log(p p* + (1-p)(1-p*)) with p* in {0, 1}: -log p for objects, -log(1-p) for background.
    binary_ce = -torch.where(is_object, log_p_object, log_p_background)
    loss = _masked_mean(binary_ce, None) + _masked_mean(sr_log_q, None)
    if hr_log_q is not None:
        loss = loss + _masked_mean(hr_log_q, hr_valid)
    return loss


def regression_loss(box_deltas: Tensor, t_star: Tensor, labels: Tensor) -> Tensor:
    r"""Smooth-L1 box regression of D's class-specific deltas against the proposal's targets.

    Paper: $L_{reg} = \frac{1}{m} \sum_{i=1}^m \sum_{j \in (x,y,w,h)} [u_i \geq 1] \left( S_{L_1} \left( t_{SR}^{i,j} - t^{*(i,j)} \right) \right)$

    Exactly torchvision's fastrcnn_loss box term: t_SR is D's [m, 4 * num_classes] output taken at
    the true class u_i; t* is BoxCoder(weights=(10, 10, 5, 5)).encode(matched GT, proposal); S_L1
    is smooth L1 with beta = 1/9, summed over the 4 coordinates and over the foreground RoIs
    ([u_i >= 1]) and divided by m = *all* sampled RoIs, background included, as the 1/m says.
    """
    m = labels.numel()
    if m == 0:
        return box_deltas.sum() * 0.0
    deltas = box_deltas.reshape(m, -1, 4)
    foreground = torch.where(labels >= 1)[0]
    t_sr = deltas[foreground, labels[foreground]]
    return F.smooth_l1_loss(t_sr, t_star[foreground], beta=1 / 9, reduction="sum") / m


def generator_objective(
    d_sr: dict[str, Tensor],
    sr: Tensor,
    hr: Tensor,
    hr_valid: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    weights: GANLossWeights | None = None,
    saturating_adv: bool = False,
    literal_cls: bool = False,
    d_hr: dict[str, Tensor] | None = None,
    mse_reduction: str = "mean",
) -> dict[str, Tensor]:
    """G's loss: alpha L_adv + beta L_cls + gamma L_reg + w_tv L_TV + w_mse L_MSE.

    Args:
        d_sr: D's outputs on the (non-detached) SR patches ``sr``.
        hr, hr_valid: HR targets and which of them are real (L_MSE and L_TV count only those).
        labels: u_i, [m] int64 (0 = background); regression_targets: t*, [m, 4].
        d_hr: D's outputs on the HR patches, only needed for ``literal_cls``.
    Returns:
        {"adv", "cls", "reg", "mse", "tv"} unweighted terms and "total" (the weighted sum to
        backpropagate). A term whose weight is 0 is not computed at all, so e.g. with adv=0 the
        adversarial head of D takes no part in G's gradient; it is logged as 0.
    """
    weights = weights or GANLossWeights()
    zero = sr.sum() * 0.0
    terms = {
        "adv": adversarial_loss_g(d_sr["adv"], saturating_adv) if weights.adv else zero,
        "cls": classification_loss(
            d_sr["cls"], d_hr["cls"] if (literal_cls and d_hr is not None) else None, labels, hr_valid, literal_cls
        )
        if weights.cls
        else zero,
        "reg": regression_loss(d_sr["box"], regression_targets, labels) if weights.reg else zero,
        "mse": mse_loss(sr, hr, hr_valid, mse_reduction) if weights.mse else zero,
        "tv": tv_loss(sr, hr_valid) if weights.tv else zero,
    }
    terms["total"] = (
        weights.adv * terms["adv"]
        + weights.cls * terms["cls"]
        + weights.reg * terms["reg"]
        + weights.mse * terms["mse"]
        + weights.tv * terms["tv"]
    )
    return terms


def discriminator_objective(
    d_hr: dict[str, Tensor],
    d_sr: dict[str, Tensor],
    labels: Tensor,
    regression_targets: Tensor,
    hr_valid: Tensor,
    weights: GANLossWeights | None = None,
    literal_cls: bool = False,
    generated: Tensor | None = None,
) -> dict[str, Tensor]:
    """D's loss: adversarial BCE (real HR vs SR) + class and box losses on the HR and SR patches.

    Args:
        d_hr: D's outputs on the HR patches; d_sr: D's outputs on the SR patches computed from
            ``sr.detach()`` (D's step must not move G). Preferably one forward over the
            concatenated batch, split afterwards (see MultiTaskDiscriminator on BN).
        hr_valid: which HR patches are real: only those are real samples and get class/box losses
            (an interpolated HR patch is just a blurry copy of the SR input's content).
        generated: which SR patches G made (None: all). The others are native cuts of RoIs too
            large for the LR patch (``SRConfig.large_rois``), which D judges for its class and box
            heads only: the adversarial term plays on G's RoIs alone, their real and fake patches
            alike, so real and fake stay the same RoIs and cannot be told apart by size.
    Returns:
        {"adv", "cls", "reg"} unweighted terms, "total", and the detached diagnostics
        "real_prob" / "fake_prob" (mean D(z_HR) over valid RoIs, mean D(G(z_LR))).
    """
    weights = weights or GANLossWeights()
    valid = hr_valid
    g = slice(None) if generated is None else generated
    terms = {
        "adv": discriminator_adv_loss(d_hr["adv"][g], d_sr["adv"][g], valid[g]),
        "cls": classification_loss(d_sr["cls"], d_hr["cls"], labels, valid, literal_cls),
        "reg": regression_loss(d_sr["box"], regression_targets, labels)
        + regression_loss(d_hr["box"][valid], regression_targets[valid], labels[valid]),
    }
    terms["total"] = weights.d_adv * terms["adv"] + weights.d_cls * terms["cls"] + weights.d_reg * terms["reg"]
    with torch.no_grad():
        terms["real_prob"] = _masked_mean(torch.sigmoid(d_hr["adv"][g]), valid[g])
        terms["fake_prob"] = _masked_mean(torch.sigmoid(d_sr["adv"][g]), None)
        # D's accuracy on real and on fake patches: the GAN health check watches for D pinned at 1.0.
        terms["real_acc"] = _masked_mean((d_hr["adv"][g] > 0).float(), valid[g])
        terms["fake_acc"] = _masked_mean((d_sr["adv"][g] < 0).float(), None)
    return terms

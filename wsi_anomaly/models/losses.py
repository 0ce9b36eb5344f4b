"""HaloAE training objective: classification + feature and image reconstruction, weighted by
the evolving weighting scheme (EWS) of the paper."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from wsi_anomaly.models.haloae_config import LOSS_TERMS

__all__ = [
    "EWS_EPOCHS",
    "LOSS_TERMS",
    "equal_weights",
    "ews_weights",
    "haloae_loss",
    "loss_weights",
    "ssim",
]

#: Length of the paper's schedule; EWS curves are defined on epochs 0 … EWS_EPOCHS − 1.
EWS_EPOCHS = 251
# (a, b, c, d) of w(e) = b + (a − b) / (1 + exp(d·(e − c/2))) for cls, fm, im.
_EWS_PARAMS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 0.4, 80.0, 0.07),
    (-1e-8, 1.2, 150.0, 0.05),
    (-1e-8, 2.0, 300.0, 0.05),
)


def _gaussian_window(
    window: int, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two ``B×C×H×W`` tensors (scalar tensor).

    Statistics are computed per channel under a ``window×window`` Gaussian (std ``sigma``),
    centred on every pixel with zero padding (the convention of the widely used ``pytorch-ssim``,
    which gives one value per pixel as the paper's eq. 2 sums), with ``C1 = 0.01²`` and
    ``C2 = 0.03²`` (dynamic range 1), then averaged over batch, channels and pixels. Computed in
    float32 whatever the input dtype, autocast or not: the variances are differences of nearly
    equal moments, which bf16 blurs round to zero or below, and the ratio then runs off to ±inf.
    """
    with torch.autocast(a.device.type, enabled=False):
        return _ssim_fp32(a.float(), b.float(), window, sigma)


def _ssim_fp32(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    channels = a.shape[1]
    g = _gaussian_window(window, sigma, a.dtype, a.device)
    # The 2-D Gaussian is separable: two 1-D depthwise passes cost 2·window instead of window².
    g_row = g.view(1, 1, 1, window).repeat(channels, 1, 1, 1)
    g_col = g.view(1, 1, window, 1).repeat(channels, 1, 1, 1)
    pad = window // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, g_row, padding=(0, pad), groups=channels)
        return F.conv2d(t, g_col, padding=(pad, 0), groups=channels)

    n = a.shape[0]
    # One blur call for the five moments.
    mu_a, mu_b, e_aa, e_bb, e_ab = blur(torch.cat([a, b, a * a, b * b, a * b])).split(n)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.mean()


def ews_weights(epoch: float, total_epochs: int = EWS_EPOCHS) -> tuple[float, float, float]:
    """Evolving weighting scheme: normalised (α_cls, α_fm, α_im) at ``epoch`` (0-based).

    Each raw weight is ``w(e) = b + (a − b) / (1 + exp(d·(e − c/2)))`` on the paper's 251-epoch
    axis; the three are normalised to sum to 1. A schedule of another length is mapped onto that
    axis (``e = 250·epoch / (total_epochs − 1)``), so a short run still moves from the
    classification phase to the reconstruction phase.
    """
    if total_epochs < 1 or not 0 <= epoch <= max(total_epochs - 1, 0):
        raise ValueError(
            f"EWS needs 0 <= epoch < total_epochs, got epoch {epoch} of {total_epochs}"
        )
    e = (EWS_EPOCHS - 1) * epoch / (total_epochs - 1) if total_epochs > 1 else 0.0
    raw = [b + (a - b) / (1.0 + math.exp(d * (e - c / 2))) for a, b, c, d in _EWS_PARAMS]
    total = sum(raw)
    return (raw[0] / total, raw[1] / total, raw[2] / total)


def equal_weights(
    epoch: float = 0, total_epochs: int = EWS_EPOCHS, terms: Iterable[str] = LOSS_TERMS
) -> tuple[float, float, float]:
    """Equal weighting (the paper's ablation baseline): ``1/n`` for each of the ``n`` active
    ``terms``, 0 for the others; same signature as :func:`ews_weights` plus ``terms``."""
    del epoch, total_epochs
    active = set(_check_terms(terms))
    return _as_triple([1.0 / len(active) if name in active else 0.0 for name in LOSS_TERMS])


def _check_terms(terms: Iterable[str]) -> tuple[str, ...]:
    terms = tuple(terms)
    if not terms or set(terms) - set(LOSS_TERMS):
        raise ValueError(f"loss terms must be a non-empty subset of {LOSS_TERMS}, got {terms}")
    return terms


def _as_triple(values: Sequence[float]) -> tuple[float, float, float]:
    return (values[0], values[1], values[2])


def loss_weights(
    scheme: str, epoch: float, total_epochs: int, terms: Iterable[str] = LOSS_TERMS
) -> tuple[float, float, float]:
    """``(α_cls, α_fm, α_im)`` of ``scheme`` at ``epoch`` of ``total_epochs`` for the active
    ``terms`` (loss ablations): inactive terms get 0 and the active ones sum to 1.

    ``"ews"``: the EWS curves of the active terms renormalised over them (with all three, exactly
    :func:`ews_weights`). ``"equal"``: ``1/n`` for each of the ``n`` active terms
    (:func:`equal_weights`); one term alone is that loss unscaled.
    """
    schemes = {"ews": ews_weights, "equal": equal_weights}
    if scheme not in schemes:
        raise ValueError(f"loss weighting must be one of {sorted(schemes)}, got {scheme!r}")
    active = set(_check_terms(terms))
    if scheme == "equal":
        return equal_weights(epoch, total_epochs, active)
    weights = ews_weights(epoch, total_epochs)
    if active == set(LOSS_TERMS):
        return weights
    total = sum(w for name, w in zip(LOSS_TERMS, weights) if name in active)
    return _as_triple(
        [w / total if name in active else 0.0 for name, w in zip(LOSS_TERMS, weights)]
    )


def _reconstruction_loss(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """MSE + (1 − SSIM). With a gradient to take, its float32 intermediates (SSIM's five
    moments and their blurs, 704 channels deep for the features) are recomputed in the backward
    pass instead of being kept (activation checkpointing; a pure function, so the gradient is
    the same)."""
    if torch.is_grad_enabled() and prediction.requires_grad:
        return checkpoint(_mse_plus_ssim, target, prediction, use_reentrant=False)
    return _mse_plus_ssim(target, prediction)


def _mse_plus_ssim(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float()) + (1.0 - ssim(target, prediction))


def haloae_loss(
    out: Mapping[str, torch.Tensor],
    images_norm: torch.Tensor,
    labels: torch.Tensor,
    weights: Sequence[float],
    terms: Iterable[str] = LOSS_TERMS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = α_cls·L_cls + α_fm·L_fm + α_im·L_im`` over the enabled ``terms``.

    Args:
        out: :meth:`HaloAE.forward` output for ``N = 3B`` images (``fm``, ``fm_hat``
            ``N×704×64×64``, ``im_hat`` ``N×3×256×256``, ``logits`` ``N×2``).
        images_norm: the ``N×3×256×256`` normalised inputs that produced ``out``.
        labels: ``N`` int64, 0 for originals and 1 for Cut&Paste copies. Cross-entropy uses all
            ``N`` images; the reconstruction terms (MSE + 1 − SSIM) use the originals only.
        weights: ``(α_cls, α_fm, α_im)``, e.g. from :func:`loss_weights` for the same
            ``terms`` (which renormalises them over the active terms); used as given.
        terms: the enabled subset of ``("cls", "fm", "im")`` (loss ablations).

    Returns:
        ``(total, parts)``: the scalar loss to back-propagate and every term, detached, for
        logging (disabled terms are reported but do not enter ``total``).
    """
    terms = tuple(terms)
    unknown = set(terms) - set(LOSS_TERMS)
    if unknown or not terms or len(weights) != len(LOSS_TERMS):
        raise ValueError(
            f"loss terms must be a non-empty subset of {LOSS_TERMS} with 3 weights, "
            f"got terms {terms} and {len(weights)} weights"
        )
    originals = labels == 0
    if not bool(originals.any()):
        raise ValueError("a training batch needs at least one original image (label 0)")
    # fm comes from the frozen backbone; detach anyway so no gradient ever flows into it.
    losses = {
        "cls": F.cross_entropy(out["logits"].float(), labels),
        "fm": _reconstruction_loss(out["fm"][originals].detach(), out["fm_hat"][originals]),
        "im": _reconstruction_loss(images_norm[originals], out["im_hat"][originals]),
    }
    total = torch.stack(
        [w * losses[name] for name, w in zip(LOSS_TERMS, weights) if name in terms]
    ).sum()
    return total, {name: value.detach() for name, value in losses.items()}

"""Per-sample training losses: l2 / l1 / Huber / smooth-L1, the Huber threshold schedule, loss masks.

Order inside a step: element-wise loss on float32 copies → × w(σ) → × mask → mean over every non-batch axis →
× per-sample weight (prior_loss_weight for regularisation images) → the trainer takes the batch mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.errors import AnimaError, check_choice

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def check_loss_options(
    loss_type: str = "l2", huber_schedule: str = "snr", huber_c: float = 0.1, huber_scale: float = 1.0
) -> None:
    """Validate the loss flags up front (AnimaError naming the flag)."""
    check_choice("--loss_type", loss_type, LOSS_TYPES)
    if loss_type in ("huber", "smooth_l1"):
        check_choice("--huber_schedule", huber_schedule, HUBER_SCHEDULES)
        if not huber_c > 0:
            raise AnimaError(f"--huber_c must be > 0 (got {huber_c})")
        if not huber_scale > 0:
            raise AnimaError(f"--huber_scale must be > 0 (got {huber_scale})")


def huber_threshold(
    huber_schedule: str, sigmas: torch.Tensor, huber_c: float = 0.1, huber_scale: float = 1.0
) -> torch.Tensor:
    """Per-sample Huber threshold c(σ), float32 [B]  [--huber_schedule, --huber_c, --huber_scale].

    Defined on the flow-matching σ ∈ [0, 1] (σ = 1 is pure noise), so every schedule works with this model:
      constant:    c = huber_c · huber_scale
      exponential: c(σ) = huber_scale · huber_c^σ               (huber_scale at σ=0 → huber_c·huber_scale at σ=1)
      snr:         c(σ) = huber_scale · ((1 − huber_c)·(1 − σ)² + huber_c)
    The snr form is the diffusion rule (1 − c)/(1 + r)² + c with the noise-to-signal ratio r = σ/(1 − σ) of the
    flow path, i.e. 1/(1 + r)² = (1 − σ)². Both schedules move from an L2-like loss on clean inputs to a robust
    (small c) loss on noisy ones. Note: the original Anima recipe crashes on snr (its default) and makes
    exponential ≈ huber_scale because it fed σ into a 0…1000 formula; this module uses the σ forms above.
    """
    check_loss_options("huber", huber_schedule, huber_c, huber_scale)
    sigmas = sigmas.float()
    if huber_schedule == "constant":
        return torch.full_like(sigmas, huber_c * huber_scale)
    if huber_schedule == "exponential":
        return huber_scale * torch.pow(torch.full_like(sigmas, huber_c), sigmas)
    return huber_scale * ((1 - huber_c) * (1 - sigmas) ** 2 + huber_c)


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise loss in float32, same shape as pred  [--loss_type].

    l2 = d², l1 = |d|, huber = 2c(√(d² + c²) − c), smooth_l1 = 2(√(d² + c²) − c) with d = pred − target and
    huber_c the per-sample threshold [B] from `huber_threshold` (needed for huber / smooth_l1).
    """
    check_choice("--loss_type", loss_type, LOSS_TYPES)
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    # huber / smooth_l1
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs the per-sample huber_c")
    c = huber_c.float().reshape(-1, *([1] * (diff.dim() - 1)))
    smooth = torch.sqrt(diff**2 + c**2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply the element-wise loss [B, C, h, w] by a pixel mask in [0, 1] ([B, H, W] or [B, 1, H, W]).

    The mask is resized to the latent size with area interpolation (a coverage average); it is not renormalised,
    so masked-out area lowers the mean loss rather than re-weighting the rest.
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = F.interpolate(mask.to(loss.dtype), size=loss.shape[-2:], mode="area")
    if loss.dim() == 5:  # [B, C, T, h, w]: same mask for every frame
        mask = mask.unsqueeze(2)
    return loss * mask


def per_sample_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    *,
    huber_c: torch.Tensor | None = None,
    weighting: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss per sample, float32 [B]: elementwise → × weighting [B] → × mask → mean over C,(T),H,W → × sample_weights [B].

    weighting: w(σ) from `flow_matching.loss_weighting`; mask: alpha / `--masked_loss` mask (see
    `apply_loss_mask`); sample_weights: `--prior_loss_weight` for regularisation images, 1 otherwise.
    """
    loss = elementwise_loss(pred, target, loss_type, huber_c)
    if weighting is not None:
        loss = loss * weighting.float().reshape(-1, *([1] * (loss.dim() - 1)))
    if mask is not None:
        loss = apply_loss_mask(loss, mask)
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss)
    return loss


@dataclass(frozen=True)
class ModelOutput:
    """One model call of a training step: what the loss compares, and how it is weighted."""

    prediction: torch.Tensor  # [B, C, h, w]
    target: torch.Tensor  # [B, C, h, w]
    sigmas: torch.Tensor  # [B] noise levels (Huber schedule, non-finite step logs)
    weighting: torch.Tensor | None  # [B] per-sample loss weight, or None

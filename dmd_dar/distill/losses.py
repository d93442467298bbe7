"""DMD / DMD2 losses as pure functions (no modules, no optimizers, no accelerate).

Notation: ``x`` is the generator's output (an x0 sample), ``x0_real`` the teacher's (CFG) x0 prediction and
``x0_fake`` the fake-score network's x0 prediction, both at the same noised ``x_t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dm_normalizer(x: torch.Tensor, x0_real: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Per-sample DMD weight denominator ``mean_{C,H,W} |x - x0_real|``, shape [B, 1, 1, 1]."""
    dims = tuple(range(1, x.ndim))
    return (x - x0_real).abs().mean(dim=dims, keepdim=True) + eps


@torch.no_grad()
def normalized_update(direction: torch.Tensor, x: torch.Tensor, x0_real: torch.Tensor,
                      floor: float = 0.0) -> torch.Tensor:
    """``direction / max(mean_{CHW}|x - x0_real|, floor)`` per sample, NaN/Inf entries set to 0.

    DMD2's weighting of its update, applied by Decoupled DMD to each term with that term's own ``x0_real``.
    ``floor`` (data units) bounds the weight where the teacher already reproduces ``x``: without it a sample
    with ``x == x0_real`` divides by zero (reported as NaNs by the anchors' users; nan_to_num then zeroes it).
    Computed in float32 (float64 inputs stay float64).
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    norm = dm_normalizer(x.to(dt), x0_real.to(dt))
    if floor > 0:
        norm = norm.clamp_min(floor)
    return torch.nan_to_num(direction.to(dt) / norm, nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient direction ``g = (x0_fake - x0_real) / mean_{CHW}|x - x0_real|``.

    Computed in float32 (float64 inputs stay float64); NaN/Inf entries (a zero normaliser) become 0, as in the
    official DMD2 code.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    return normalized_update(x0_fake.to(dt) - x0_real.to(dt), x, x0_real)


def proxy_loss(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The stop-gradient proxy ``0.5 * mean((x - sg(x - update))^2)``: its gradient w.r.t. ``x`` is
    ``update / numel(x)``, whatever produced ``update`` (DMD2's g, or Decoupled DMD's weighted sum of terms)."""
    update = update.detach()
    target = x.detach().to(update.dtype) - update
    return 0.5 * F.mse_loss(x.to(update.dtype), target, reduction="mean")


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x - sg(x - g))^2)``: its gradient with respect to ``x`` is exactly ``g / numel(x)``."""
    return proxy_loss(x, dm_gradient(x.detach(), x0_real, x0_fake))


def dm_term(x0_fake: torch.Tensor, x0_cond: torch.Tensor) -> torch.Tensor:
    """Decoupled DMD's "DM" term ``x0_fake - x0_cond``: true distribution matching, conditional, no CFG."""
    return x0_fake - x0_cond


def ca_term(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Decoupled DMD's "CA" (CFG augmentation) term ``-(w - 1)(x0_cond - x0_uncond)``: the teacher alone.

    ``dm_term + ca_term`` at one x_t is DMD2's ``x0_fake - [x0_u + w (x0_c - x0_u)]`` (before normalisation).
    """
    return -(scale - 1.0) * (x0_cond - x0_uncond)


def image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and (biased) variance over the spatial dims, each [B, C] (at least float32)."""
    flat = x.to(torch.promote_types(x.dtype, torch.float32)).flatten(2)
    return flat.mean(-1), flat.var(-1, unbiased=False)


def meanvar_kl(x: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor,
               min_var: float = 1e-6) -> torch.Tensor:
    """Decoupled DMD's non-parametric regulariser: ``mean_{B,C} KL(N(m_bc, v_bc) || N(mu_c, s_c))``.

    ``m_bc, v_bc``: image b's channel-c mean and variance (``image_moments``); ``mu_c, s_c``: the target
    statistics [C] measured from teacher samples. KL of two Gaussians:
    ``0.5 (log(s / v) + (v + (m - mu)^2) / s - 1)``; differentiable in ``x`` (no fake score is needed).
    """
    m, v = image_moments(x)
    mu = target_mean.to(m).view(1, -1)
    s = target_var.to(m).view(1, -1).clamp_min(min_var)
    v = v.clamp_min(min_var)
    return (0.5 * (torch.log(s / v) + (v + (m - mu) ** 2) / s - 1.0)).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean softplus(-D(x))``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``mean softplus(D(fake)) + mean softplus(-D(real))``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def regression_loss(x: torch.Tensor, target: torch.Tensor, kind: str = "mse", lpips_fn=None) -> torch.Tensor:
    """DMD1 regression of the generator output onto the teacher's ODE endpoint for the same noise."""
    if kind == "mse":
        return F.mse_loss(x.float(), target.float())
    if kind == "lpips":
        if lpips_fn is None:
            raise ValueError("regression kind 'lpips' needs an lpips_fn")
        return lpips_fn(x, target).mean()
    raise ValueError(f"unknown regression loss {kind!r}; use mse or lpips")

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
def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient direction ``g = (x0_fake - x0_real) / mean_{CHW}|x - x0_real|``.

    Computed in float32 (float64 inputs stay float64); NaN/Inf entries (a zero normaliser) become 0, as in the
    official DMD2 code.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    x, x0_real, x0_fake = x.to(dt), x0_real.to(dt), x0_fake.to(dt)
    g = (x0_fake - x0_real) / dm_normalizer(x, x0_real)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x - sg(x - g))^2)``: its gradient with respect to ``x`` is exactly ``g / numel(x)``."""
    g = dm_gradient(x.detach(), x0_real, x0_fake)
    target = (x.detach().to(g.dtype) - g)
    return 0.5 * F.mse_loss(x.to(g.dtype), target, reduction="mean")


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

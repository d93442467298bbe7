"""The denoising objective shared by teacher pretraining and the DMD2 fake-score network.

Both train a network in the teacher's own parameterisation: regress ``path.training_target(x0, eps, t)`` (the
velocity for flow, eps / v / x0 for VP) at ``x_t = path.add_noise(x0, eps, t)``, unweighted mean squared error, as
the official DMD2 critic and SiT/SD3 pretraining do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dmd_dar.diffusion.paths import NoisePath


def denoising_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], path: NoisePath,
                   x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``model_fn(x_t, t)`` against the path's training target. x0, eps: [B, C, H, W]; t: [B]."""
    x_t = path.add_noise(x0, eps, t).to(x0.dtype)
    pred = model_fn(x_t, t)  # [B, C, H, W]
    target = path.training_target(x0, eps, t)
    return (pred.float() - target.float()).pow(2).mean()

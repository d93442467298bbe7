"""Training-time timestep samplers and the flow timestep shift (all ``t`` in ``[0, 1]``, ``t = 1`` is noise)."""

from __future__ import annotations

import torch

from dmd_dar.errors import UserError

Tensor = torch.Tensor

__all__ = ["shift", "unshift", "sample_uniform", "sample_logit_normal", "sample_timesteps", "dm_timestep_range",
           "sample_dm_timesteps", "TIMESTEP_SAMPLERS"]


def shift(t: Tensor | float, s: float) -> Tensor:
    """Flow timestep shift (SD3 convention): ``s t / (1 + (s - 1) t)``. ``s > 1`` moves time towards noise."""
    t = torch.as_tensor(t)
    if s <= 0:
        raise UserError(f"timestep shift must be > 0, got {s}")
    return s * t / (1 + (s - 1) * t)


def unshift(u: Tensor | float, s: float) -> Tensor:
    """Inverse of :func:`shift`: ``u / (s - (s - 1) u)``."""
    u = torch.as_tensor(u)
    if s <= 0:
        raise UserError(f"timestep shift must be > 0, got {s}")
    return u / (s - (s - 1) * u)


def sample_uniform(n: int, t_min: float = 0.0, t_max: float = 1.0, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """``t ~ U[t_min, t_max]``, shape [n], float32."""
    u = torch.rand(n, generator=generator, device=device)
    return t_min + (t_max - t_min) * u


def sample_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """``t = sigmoid(mean + std z)``, ``z ~ N(0, 1)`` (SD3's logit-normal); median ``sigmoid(mean)``."""
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * z)


TIMESTEP_SAMPLERS = ("uniform", "logit_normal")


def sample_timesteps(n: int, kind: str = "uniform", *, t_min: float = 0.0, t_max: float = 1.0, mean: float = 0.0,
                     std: float = 1.0, shift_s: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Training timesteps by name, then the flow shift ``shift_s`` (1 = none). Logit-normal draws are
    rescaled into ``[t_min, t_max]`` so both samplers honour the same range."""
    if kind == "uniform":
        t = sample_uniform(n, t_min, t_max, generator, device)
    elif kind == "logit_normal":
        t = t_min + (t_max - t_min) * sample_logit_normal(n, mean, std, generator, device)
    else:
        raise UserError(f"unknown timestep sampler {kind!r}; use one of {list(TIMESTEP_SAMPLERS)}")
    return shift(t, shift_s) if shift_s != 1.0 else t


def dm_timestep_range(t_min: float = 0.02, t_max: float = 0.98, shift_s: float = 1.0) -> tuple[float, float]:
    """The distribution-matching time range after the teacher's shift: ``(shift(t_min), shift(t_max))``.

    DMD draws ``u ~ U[t_min, t_max]`` (0.02..0.98 of the range, as DMD2's ``min/max_step_percent``) and then
    applies the teacher's flow shift, so the range in the teacher's own time is the shifted one returned here.
    """
    if not 0.0 <= t_min < t_max <= 1.0:
        raise UserError(f"need 0 <= t_min < t_max <= 1 for the DM time range, got t_min={t_min}, t_max={t_max}")
    return float(shift(t_min, shift_s)), float(shift(t_max, shift_s))


def sample_dm_timesteps(n: int, t_min: float = 0.02, t_max: float = 0.98, shift_s: float = 1.0,
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Per-sample DMD timesteps: ``u ~ U[t_min, t_max]`` then ``shift(u, shift_s)``; shape [n]."""
    dm_timestep_range(t_min, t_max, shift_s)  # validates
    u = sample_uniform(n, t_min, t_max, generator, device)
    return shift(u, shift_s) if shift_s != 1.0 else u

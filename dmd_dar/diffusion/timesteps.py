"""Training-time timestep samplers and the flow timestep shift (all ``t`` in ``[0, 1]``, ``t = 1`` is noise)."""

from __future__ import annotations

import torch

from dmd_dar.errors import UserError

Tensor = torch.Tensor

__all__ = ["shift", "unshift", "sample_uniform", "sample_logit_normal", "sample_timesteps", "dm_timestep_range",
           "sample_dm_timesteps", "capped_range", "sample_capped_timesteps", "random_student_schedule",
           "TIMESTEP_SAMPLERS"]


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


def capped_range(t_min: float, t_max: float, cap: Tensor | float, shift_s: float = 1.0) -> tuple[Tensor, Tensor]:
    """The pre-shift interval ``[t_min, min(t_max, unshift(cap))]`` per sample (``cap``: a time after the shift).

    Decoupled DMD's CA times must not exceed the student's current time ``t_k`` in the teacher's (shifted) time;
    since the shift is increasing, ``shift(u) <= t_k`` exactly when ``u <= unshift(t_k)``. Returns (lo, hi), float64,
    with ``cap``'s shape; an interval may be empty (``hi <= lo``): ``sample_capped_timesteps`` refuses that.
    """
    hi = torch.clamp(unshift(torch.as_tensor(cap, dtype=torch.float64), shift_s), max=t_max)
    return torch.full_like(hi, t_min), hi


def sample_capped_timesteps(cap: Tensor, t_min: float, t_max: float, shift_s: float = 1.0,
                            generator: torch.Generator | None = None, key: str = "t_min") -> Tensor:
    """Per-sample ``u ~ U[t_min, min(t_max, unshift(cap_b))]``, then ``shift(u, shift_s)``; shape of ``cap``, float64.

    So ``tau_b <= cap_b`` and tau follows the shifted distribution restricted to the cap (the Z-Image authors'
    recipe for Decoupled DMD's CA times). ``key``: the config key of ``t_min``, named when an interval is empty.
    """
    cap = torch.as_tensor(cap, dtype=torch.float64).flatten()
    lo, hi = capped_range(t_min, t_max, cap, shift_s)
    if bool((hi <= lo).any()):
        worst = float(cap.min())
        raise UserError(f"{key}={t_min}: the capped timestep range is empty for a student time of {worst:.4g} "
                        f"(before the shift {float(unshift(worst, shift_s)):.4g}); lower {key} below that")
    u = lo + (hi - lo) * torch.rand(cap.shape[0], generator=generator, dtype=torch.float64)
    tau = shift(u, shift_s) if shift_s != 1.0 else u
    return torch.minimum(tau, cap)  # shift(unshift(cap)) may round one ulp above cap


def random_student_schedule(k_min: int, k_max: int, t_min: float, t_max: float, shift_s: float = 1.0,
                            generator: torch.Generator | None = None) -> list[float]:
    """A random few-step schedule (CDM's dynamic schedule): K ~ U{k_min..k_max} student times, the first 1 (pure
    noise), the K - 1 others ``u ~ U[t_min, t_max]`` sorted decreasing, all through the teacher's shift.

    Draw it from a generator every process shares, so that every process rolls out the same schedule.
    """
    if not 1 <= k_min <= k_max:
        raise UserError(f"need 1 <= k_min <= k_max for a random student schedule, got {k_min}, {k_max}")
    k = int(torch.randint(k_min, k_max + 1, (1,), generator=generator))
    inner = t_min + (t_max - t_min) * torch.rand(k - 1, generator=generator, dtype=torch.float64)
    u = torch.cat([torch.ones(1, dtype=torch.float64), inner.sort(descending=True).values])
    return [float(v) for v in (shift(u, shift_s) if shift_s != 1.0 else u)]

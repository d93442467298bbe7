"""Classifier-free guidance, ODE samplers (Euler, Heun, DDIM) and few-step student sampling.

Samplers are driven by ``denoise_fn(x_t, t) -> prediction`` where ``t`` has shape [B] and the prediction is in
``path.prediction``'s parameterisation. Wrap a conditional model with :func:`guided` to apply CFG.

CFG in prediction space, ``u + s (c - u)``, and in x0 space, ``x0_c + (s - 1)(x0_c - x0_u)``, give the same x0
whenever x0 is an affine function of the prediction at fixed ``(x_t, t)`` -- true for every parameterisation in
``paths.py`` (x0, eps, v, flow velocity) -- because CFG is an affine combination (weights ``s`` and ``1 - s`` sum to 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dmd_dar.diffusion.paths import NoisePath
from dmd_dar.diffusion.timesteps import shift as _shift
from dmd_dar.errors import UserError

Tensor = torch.Tensor
DenoiseFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["cfg", "cfg_x0", "cat_conditions", "check_guidance_interval", "guidance_mask", "where_guided", "guided",
           "timestep_grid", "euler_sample", "heun_sample", "ddim_sample", "sample_ode", "ODE_SAMPLERS",
           "student_timesteps", "network_x0_fn", "few_step_sample"]


def cfg(pred_cond: Tensor, pred_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in the prediction's own space: ``u + s (c - u)`` (``s = 1`` is no guidance)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def cfg_x0(x0_cond: Tensor, x0_uncond: Tensor, scale: float) -> Tensor:
    """CFG written in x0 space as DMD2 uses it: ``x0_c + (s - 1)(x0_c - x0_u)`` (algebraically ``cfg`` on x0)."""
    return x0_cond + (scale - 1) * (x0_cond - x0_uncond)


def cat_conditions(a: Any, b: Any) -> Any:
    """Concatenate conditioning along the batch: tensors, or dicts/lists/tuples of them, or None.
    A batch-1 ``b`` (a shared null condition) is expanded to ``a``'s batch."""
    if a is None:
        return None
    if isinstance(a, Tensor):
        if b.shape[0] == 1 and a.shape[0] != 1:
            b = b.expand(a.shape[0], *b.shape[1:])
        return torch.cat([a, b], 0)
    if isinstance(a, dict):
        return {k: cat_conditions(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(cat_conditions(x, y) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def check_guidance_interval(interval: Sequence[float] | None, name: str = "cfg_interval") -> tuple[float, float] | None:
    """``None`` (guidance at every noise level) or ``(lo, hi)`` with ``0 <= lo < hi <= 1``; ``name`` is the config key
    that the error message names."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UserError(f"{name}={interval!r}: give two noise levels [lo, hi] (guidance applies where lo <= t <= hi), "
                        f"or null for every step") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"{name}=[{lo:g}, {hi:g}]: need 0 <= lo < hi <= 1 (t = 1 is pure noise); [0, 1] guides "
                        f"every step")
    return lo, hi


def guidance_mask(t: Tensor, interval: Sequence[float] | None) -> Tensor | None:
    """Where guidance applies, [B] bool: ``lo <= t <= hi`` (guidance limited to an interval of noise levels,
    Kynkäänniemi et al., NeurIPS 2024); ``None`` when there is no interval (every sample is guided)."""
    if interval is None:
        return None
    lo, hi = interval
    return (t >= lo) & (t <= hi)


def where_guided(inside: Tensor | None, guided_pred: Tensor, cond_pred: Tensor) -> Tensor:
    """The guided prediction where ``inside``, the conditional one (exactly, not ``cfg`` with scale 1) elsewhere."""
    if inside is None or bool(inside.all()):
        return guided_pred
    return torch.where(inside.view(-1, *([1] * (guided_pred.ndim - 1))), guided_pred, cond_pred)


def guided(model_fn: Callable[[Tensor, Tensor, Any], Tensor], scale: float, cond: Any, null_cond: Any,
           interval: Sequence[float] | None = None) -> DenoiseFn:
    """Wrap ``model_fn(x_t, t, cond)`` as a CFG ``denoise_fn(x_t, t)`` that runs cond and uncond in one forward.

    ``cond``/``null_cond`` are tensors (e.g. labels [B]; the null label is ``num_classes``) or dicts/tuples of
    tensors; a batch-1 ``null_cond`` is broadcast. ``scale == 1`` skips the unconditional half. With an
    ``interval`` ``[lo, hi]`` only samples with ``lo <= t <= hi`` are guided; the others get the conditional
    prediction, and a call with no sample inside skips the unconditional half.
    """
    interval = check_guidance_interval(interval)

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])  # [B]
        inside = guidance_mask(t, interval)
        if scale == 1.0 or (inside is not None and not bool(inside.any())):
            return model_fn(x_t, t, cond)
        out = model_fn(torch.cat([x_t, x_t], 0), torch.cat([t, t], 0), cat_conditions(cond, null_cond))  # [2B, ...]
        c, u = out.chunk(2, 0)
        return where_guided(inside, cfg(c, u, scale), c)

    return denoise


def timestep_grid(num_steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``num_steps + 1`` times from ``t_start`` down to ``t_end``, uniform in t, then the flow shift."""
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = _shift(t, shift)
    return t.to(device=device, dtype=dtype)


def _steps(timesteps: Tensor | Sequence[float], progress: bool, desc: str):
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    pairs = list(zip(ts[:-1].tolist(), ts[1:].tolist()))
    if progress:
        # lazy: progress bars only; diffusion/ itself needs nothing but torch
        from tqdm.auto import tqdm

        return tqdm(pairs, desc=desc)
    return pairs


def _tvec(t: float, x: Tensor) -> Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64; bf16 times go float32
    return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)  # [B]


@torch.no_grad()
def euler_sample(denoise_fn: DenoiseFn, path: NoisePath, z: Tensor, timesteps: Tensor | Sequence[float],
                 progress: bool = False) -> Tensor:
    """Euler on the probability-flow ODE ``dx/dt = path.pred_to_velocity(pred)`` along ``timesteps`` (descending).
    Starts from ``z`` at ``timesteps[0]`` and returns ``x`` at ``timesteps[-1]``."""
    x = z
    for t, t_next in _steps(timesteps, progress, "euler"):
        v = path.pred_to_velocity(denoise_fn(x, _tvec(t, x)), x, _tvec(t, x))
        x = (x + (t_next - t) * v).to(z.dtype)
    return x


@torch.no_grad()
def heun_sample(denoise_fn: DenoiseFn, path: NoisePath, z: Tensor, timesteps: Tensor | Sequence[float],
                progress: bool = False) -> Tensor:
    """Heun's second-order method (trapezoidal corrector) on the probability-flow ODE; 2 evaluations per step."""
    x = z
    for t, t_next in _steps(timesteps, progress, "heun"):
        v = path.pred_to_velocity(denoise_fn(x, _tvec(t, x)), x, _tvec(t, x))
        x_e = x + (t_next - t) * v
        v2 = path.pred_to_velocity(denoise_fn(x_e.to(z.dtype), _tvec(t_next, x)), x_e, _tvec(t_next, x))
        x = (x + (t_next - t) * 0.5 * (v + v2)).to(z.dtype)
    return x


@torch.no_grad()
def ddim_sample(denoise_fn: DenoiseFn, path: NoisePath, z: Tensor, timesteps: Tensor | Sequence[float],
                progress: bool = False, final_x0: bool = True) -> Tensor:
    """Deterministic DDIM (eta = 0): ``x_next = alpha(t_next) x0_hat + sigma(t_next) eps_hat``.

    With ``final_x0`` the last step returns ``x0_hat`` when it ends at ``t = 0`` (a VP path still has
    sigma = 0.01 at t = 0; the data itself is the clean x0). On a flow path DDIM equals Euler.
    """
    x = z
    pairs = list(_steps(timesteps, progress, "ddim"))
    for i, (t, t_next) in enumerate(pairs):
        x0, eps = path.pred_to_x0_eps(denoise_fn(x, _tvec(t, x)), x, _tvec(t, x))
        if final_x0 and i == len(pairs) - 1 and t_next <= 0.0:
            return x0.to(z.dtype)
        x = path.add_noise(x0, eps, _tvec(t_next, x)).to(z.dtype)
    return x


ODE_SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "ddim": ddim_sample}


def sample_ode(method: str, denoise_fn: DenoiseFn, path: NoisePath, z: Tensor, num_steps: int,
               shift: float = 1.0, progress: bool = False) -> Tensor:
    """Sample with a named ODE sampler on a uniform (optionally shifted) grid from t = 1 to t = 0."""
    fn = ODE_SAMPLERS.get(method)
    if fn is None:
        raise UserError(f"unknown sampler {method!r}; use one of {sorted(ODE_SAMPLERS)}")
    return fn(denoise_fn, path, z, timestep_grid(num_steps, shift=shift, device=z.device), progress=progress)


def student_timesteps(num_steps: int, shift: float = 1.0, t_max: float = 1.0) -> list[float]:
    """Few-step student times ``t_max (1 - k / num_steps)``, k = 0..num_steps-1, then the flow shift.

    4 steps give ``[1.0, 0.75, 0.5, 0.25]`` (DMD2's 999, 749, 499, 249); 1 step gives ``[1.0]``.
    """
    if num_steps < 1:
        raise UserError(f"student num_steps must be >= 1, got {num_steps}")
    t = torch.tensor([t_max * (1 - k / num_steps) for k in range(num_steps)], dtype=torch.float64)
    if shift != 1.0:
        t = _shift(t, shift)
    return [float(v) for v in t]


def network_x0_fn(net: Callable[[Tensor, Tensor, Any], Tensor], path: NoisePath, cond: Any) -> DenoiseFn:
    """The ``x0_fn`` of :func:`few_step_sample` for a (student) network ``net(x_t, t, cond)`` under a fixed
    condition, no guidance: its prediction converted to x0 in ``x_t``'s dtype."""
    def x0_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return path.pred_to_x0(net(x_t, t, cond), x_t, t).to(x_t.dtype)

    return x0_fn


@torch.no_grad()
def few_step_sample(x0_fn: DenoiseFn, path: NoisePath, z: Tensor, timesteps: Sequence[float],
                    generator: torch.Generator | None = None) -> Tensor:
    """DMD2 multi-step sampling: at each student time ``t_k`` predict x0 with ``x0_fn(x_t, t)``, re-noise it
    with fresh Gaussian noise to ``t_{k+1}``; the last step returns the x0 prediction. ``z`` is the input at
    ``timesteps[0]`` (pure noise when it is 1). Runs under ``no_grad`` (inference and DMD2 backward simulation);
    a training step calls the student directly on the re-noised input."""
    ts = [float(t) for t in timesteps]
    if not ts:
        raise UserError("few_step_sample needs at least one student timestep")
    x = z
    for k, t in enumerate(ts):
        x0 = x0_fn(x, _tvec(t, x))
        if k == len(ts) - 1:
            return x0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = path.add_noise(x0, eps, _tvec(ts[k + 1], x0)).to(z.dtype)
    raise AssertionError("unreachable")

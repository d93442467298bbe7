"""Training-health quantities logged by default: they are how users see a DMD run collapse or diverge."""

from __future__ import annotations

import torch

from dmd_dar.distill.losses import image_moments
from dmd_dar.errors import UserError

T_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def per_bucket_rms(values: torch.Tensor, t: torch.Tensor, prefix: str, edges=T_BUCKETS) -> dict[str, float]:
    """RMS of per-sample ``values`` [B, ...] grouped by the sample's t into buckets [edges[i], edges[i+1])."""
    rms = values.float().pow(2).flatten(1).mean(1).sqrt()  # [B]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (t >= lo) & ((t < hi) | (hi >= 1.0))
        if mask.any():
            out[f"{prefix}/t{lo:.2f}-{hi:.2f}"] = rms[mask].mean().item()
    return out


def output_drift(x: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor,
                 ref_image_var: torch.Tensor | None = None) -> dict[str, float]:
    """How far the generator's per-channel mean/std drifted from the teacher's samples'; with ``ref_image_var``
    (the teacher samples' mean per-image, per-channel variance [C]) also the per-image variance ratio, which
    grows steadily when CFG augmentation drifts (oversaturation, then high-frequency noise)."""
    mean = x.float().mean(dim=(0, 2, 3))
    std = x.float().std(dim=(0, 2, 3))
    out = {"drift/mean_abs": (mean - ref_mean.to(mean)).abs().mean().item(),
           "drift/std_ratio": (std / ref_std.to(std).clamp_min(1e-8)).mean().item()}
    if ref_image_var is not None:
        image_mean, image_var = image_moments(x)
        out["drift/image_mean_abs"] = (image_mean.mean(0) - ref_mean.to(mean)).abs().mean().item()
        out["drift/image_var_ratio"] = (image_var.mean(0) / ref_image_var.to(mean).clamp_min(1e-8)).mean().item()
    return out


class VarianceDriftCheck:
    """Flags ``drift/image_var_ratio`` beyond ``factor`` (or below 1 / ``factor``) as ``health/variance_drift``
    (1 or 0) and warns once per excursion (``DistillConfig.variance_drift_factor``)."""

    def __init__(self, factor: float) -> None:
        self.factor, self.flagged = factor, False

    def __call__(self, logs: dict[str, float], warn=print) -> dict[str, float]:
        ratio = logs.get("drift/image_var_ratio")
        if ratio is None:
            return logs
        drifted = not 1.0 / self.factor <= ratio <= self.factor
        if drifted and not self.flagged:
            warn(f"warning: the generator's per-image variance is {ratio:.3g}x the teacher samples' (beyond "
                 f"variance_drift_factor={self.factor}): CA drift (oversaturation) or collapse; raise "
                 f"method.dm_weight or lower method.ca_weight / method.ca_guidance_scale")
        self.flagged = drifted
        return {**logs, "health/variance_drift": float(drifted)}


def grad_norm_wrt(loss: torch.Tensor, x: torch.Tensor) -> float:
    """||d loss / d x|| without touching parameter gradients."""
    (g,) = torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)
    return 0.0 if g is None else g.float().norm().item()


class NonFiniteTrainingError(UserError, FloatingPointError):
    """Too many non-finite steps in a row: a ``UserError`` (the CLI prints one line and exits 2)."""


class BadStepGuard:
    """Counts non-finite steps; the trainer skips them and stops after ``limit`` in a row of one ``phase``.

    Runs of bad steps are counted per phase (generator, critic), so a critic that fails every step still stops the
    run even though the generator steps between its failures are finite. ``total`` counts every bad step.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.total = limit, 0
        self.consecutive: dict[str, int] = {}

    def check(self, *values: torch.Tensor | float | None, phase: str = "step") -> bool:
        """True when every value is finite; otherwise count the bad step and return False (raise at the limit)."""
        ok = all(torch.isfinite(torch.as_tensor(v)).all() for v in values if v is not None)
        if ok:
            self.consecutive[phase] = 0
            return True
        run = self.consecutive[phase] = self.consecutive.get(phase, 0) + 1
        self.total += 1
        if run >= self.limit:
            raise NonFiniteTrainingError(
                f"{run} non-finite {phase} steps in a row (max_bad_steps={self.limit}, total {self.total}); "
                f"stopping. Lower the learning rates, raise method.ttur, or set run.mixed_precision=no; "
                f"the last checkpoint is intact")
        return False

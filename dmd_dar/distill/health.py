"""Training-health quantities logged by default: they are how users see a DMD run collapse or diverge."""

from __future__ import annotations

import torch

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


def output_drift(x: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor) -> dict[str, float]:
    """How far the generator's per-channel mean/std drifted from the teacher's samples'."""
    mean = x.float().mean(dim=(0, 2, 3))
    std = x.float().std(dim=(0, 2, 3))
    return {"drift/mean_abs": (mean - ref_mean.to(mean)).abs().mean().item(),
            "drift/std_ratio": (std / ref_std.to(std).clamp_min(1e-8)).mean().item()}


def grad_norm_wrt(loss: torch.Tensor, x: torch.Tensor) -> float:
    """||d loss / d x|| without touching parameter gradients."""
    (g,) = torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)
    return 0.0 if g is None else g.float().norm().item()


class BadStepGuard:
    """Counts consecutive non-finite steps; the trainer skips them and stops after ``limit`` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def check(self, *values: torch.Tensor | float) -> bool:
        """True when every value is finite; otherwise count the bad step and return False."""
        ok = all(torch.isfinite(torch.as_tensor(v)).all() for v in values if v is not None)
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"{self.consecutive} non-finite steps in a row (total {self.total}); stopping. Lower the learning "
                f"rates, raise method.ttur, or set run.mixed_precision=no; the last checkpoint is intact")
        return False

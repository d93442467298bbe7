"""AdamW with a linear warm-up, then a constant learning rate (DMD2's ``constant_with_warmup``, the default) or a
cosine decay to zero at the last step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmd_dar.errors import UserError, config_key

DECAYS = ("constant", "cosine")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    routing_lr: float | None = None  # DAR router parameters; None = same as lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    decay: str = "constant"  # after the warm-up: "constant" or "cosine" (to 0 at the run's last update)
    # Run steps at which a cosine decay reaches 0 (None: the run's run.steps). Set it to train in stages on one
    # schedule: a run resumed with a larger run.steps then continues the same curve.
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise UserError(f"{config_key('optim', 'decay')}={self.decay!r}; choose one of {', '.join(DECAYS)}")
        if self.lr <= 0:
            raise UserError(f"{config_key('optim', 'lr')}={self.lr} must be > 0")
        if self.routing_lr is not None and self.routing_lr <= 0:
            raise UserError(f"{config_key('optim', 'routing_lr')}={self.routing_lr} must be > 0, or null for lr")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"{config_key('optim', 'betas')}={list(self.betas)}: both must lie in [0, 1)")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise UserError(f"{config_key('optim', key)}={getattr(self, key)} must be >= 0")
        if self.warmup_steps < 0:
            raise UserError(f"{config_key('optim', 'warmup_steps')}={self.warmup_steps} must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise UserError(f"{config_key('optim', 'decay_steps')}={self.decay_steps} must be >= 1, or null for the "
                            f"run's run.steps")

    def horizon(self, run_steps: int) -> int:
        """The run step at which a cosine decay reaches 0."""
        return self.decay_steps if self.decay_steps is not None else run_steps


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups (each group may set its own lr / weight_decay)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_updates: int, first_updates: int = 0,
                first_scale: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``cfg.warmup_steps`` updates, then constant or a cosine decay from the full rate to 0
    just after update ``total_updates`` (so with ``decay=cosine`` the run length is part of the schedule). The
    first ``first_updates`` updates run at ``first_scale`` times that rate (the distill warm start's own rate)."""
    warmup = max(1, cfg.warmup_steps)

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup)
        scale = first_scale if step < first_updates else 1.0
        if cfg.decay == "constant" or step < cfg.warmup_steps:
            return scale * ramp
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps))
        return scale * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resumable_changes(keys: tuple[str, ...], *configs: OptimConfig) -> tuple[str, ...]:
    """``keys`` without ``run.steps`` when a cosine decay over the run's own length makes it part of the schedule
    (an explicit ``decay_steps`` fixes the schedule, so ``run.steps`` may then grow on resume)."""
    if any(c.decay == "cosine" and c.decay_steps is None for c in configs):
        return tuple(k for k in keys if k != "run.steps")
    return keys

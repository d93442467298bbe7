"""AdamW with a linear warm-up then constant learning rate (DMD2's ``constant_with_warmup``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmd_dar.errors import UserError


@dataclass
class OptimConfig:
    lr: float = 2e-4
    routing_lr: float | None = None  # DAR router parameters; None = same as lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise UserError(f"optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups (each group may set its own lr / weight_decay)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))

"""Exponential moving average of a network's parameters (buffers are copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def check_decay(decay: float) -> float:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return decay


def ema_decay(decay: float, warmup: bool, num_updates: int) -> float:
    """The decay of update ``num_updates``: ``decay``, or with ``warmup`` the ramp min(decay, (1+n)/(10+n))."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


class EMA:
    """Holds an EMA copy of ``model``: ``ema = decay * ema + (1 - decay) * param`` after each update.

    ``warmup`` uses the usual ``min(decay, (1 + step) / (10 + step))`` ramp so early averages are not dominated
    by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay, self.warmup = check_decay(decay), warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        return ema_decay(self.decay, self.warmup, self.num_updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = dict(self.model.named_parameters())
        pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
        targets = [e for e, _ in pairs]
        torch._foreach_lerp_(targets, [p.to(e.dtype) for e, p in pairs], 1.0 - d)  # one fused op for all params
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates

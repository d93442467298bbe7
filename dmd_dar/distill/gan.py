"""The DMD2 GAN head: a small classifier on the fake-score network's intermediate tokens (diffusion-GAN)."""

from __future__ import annotations

import torch
from torch import nn


class GANHead(nn.Module):
    """Per-token MLP -> logit, averaged over tokens. Input [B, T, D] (or [B, D]); output logits [B]."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.net(features.float()).squeeze(-1)  # [B, T] or [B]
        return logits.mean(-1) if logits.ndim == 2 else logits


def score_features(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond, which: str = "final") -> torch.Tensor:
    """Intermediate tokens of a score network for the GAN head.

    Networks may define ``gan_features(x_t, t, cond, which)``; native SiT models expose their routed hidden states
    through ``return_internals``: ``final`` is the output head's input, ``mid`` the input of the middle sublayer.
    """
    inner = getattr(net, "module", net)  # through DDP / accelerate wrappers
    if hasattr(inner, "gan_features"):
        return net.gan_features(x_t, t, cond, which) if net is inner else inner.gan_features(x_t, t, cond, which)
    _, internals = net(x_t, t, cond, return_internals=True)
    if which == "final":
        return internals.final_input
    return internals.inputs[len(internals.inputs) // 2]

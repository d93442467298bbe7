"""Seeded starting noise of the samplers.

Image i starts from noise seeded by ``seeds[i]`` alone, independent of the batch it is drawn in, so two models
sampled with the same seeds start from the same noise: that is what pairs a student's image with its teacher's
(LPIPS fidelity), and what makes a sample folder reproducible whatever the batch size.
"""

from __future__ import annotations

import torch


def make_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise [len(seeds), *shape], sample i drawn from its own generator seeded by ``seeds[i]``."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device)

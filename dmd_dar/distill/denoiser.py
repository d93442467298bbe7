"""The teacher interface: any network that maps (x_t, t, condition) to a prediction, with its parameterisation.

DMD needs x0 predictions from the teacher (real score) and the fake score. A network alone does not say what it
predicts, so every network used as a score is wrapped with the noise path and prediction type it was trained with;
``Denoiser.x0`` converts through ``dmd_dar.diffusion``. A user plugs in their own teacher with

    Denoiser(my_module, make_path("vp", "eps"), null_cond=my_null_condition)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmd_dar.diffusion.paths import NoisePath
from dmd_dar.diffusion.samplers import cat_conditions, cfg_x0, guidance_mask, where_guided
from dmd_dar.errors import UserError


def class_null_cond(num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The null condition of a class-conditional model: the label ``num_classes``."""
    def null(y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, num_classes)

    return null


@dataclass
class Denoiser:
    """A score network with its declared parameterisation.

    net:       ``net(x_t, t, cond) -> prediction`` in ``path.prediction``'s parameterisation.
    path:      the noise path it was trained on (flow / VP) and what it predicts.
    null_cond: maps a condition to the unconditional one (for CFG); None for unconditional networks.
    """

    net: nn.Module
    path: NoisePath | None
    null_cond: Callable[[Any], Any] | None = None
    # True for guidance-distilled teachers (Flux-dev) whose guidance scale is a network input of one pass:
    # they have no unconditional prediction (Decoupled DMD refuses CA with them).
    guidance_input = False  # a class attribute, not a field: the subclass that has it sets it

    def __post_init__(self) -> None:
        if self.path is None or not getattr(self.path, "prediction", None):
            raise UserError(f"{type(self.net).__name__} has no declared parameterisation; wrap it as "
                            f"Denoiser(net, make_path('flow'|'vp', 'velocity'|'eps'|'v'|'x0'))")

    def pred(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.net(x_t, t, cond)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float = 1.0,
           interval: Sequence[float] | None = None) -> torch.Tensor:
        """x0 prediction; ``guidance != 1`` applies CFG in x0 space (one batched forward for cond and uncond), to the
        samples with ``lo <= t <= hi`` when an ``interval`` ``[lo, hi]`` is given (the others: the conditional x0)."""
        inside = guidance_mask(t, interval)
        if guidance == 1.0 or (inside is not None and not bool(inside.any())):
            return self.path.pred_to_x0(self.pred(x_t, t, cond), x_t, t)
        x0_c, x0_u = self.x0_cond_uncond(x_t, t, cond)
        return where_guided(inside, cfg_x0(x0_c, x0_u, guidance), x0_c)

    def x0_cond_uncond(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional x0, unconditional x0), in one batched forward."""
        if self.null_cond is None:
            raise UserError("guidance != 1 needs a conditional network with a null condition")
        both = self.pred(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions(cond, self.null_cond(cond)))
        x0_c, x0_u = self.path.pred_to_x0(both, torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
        return x0_c, x0_u

"""The adapter registry and ``wrap_with_dar``, the one entry point for putting DAR into a diffusers model."""

from __future__ import annotations

from torch import nn

from dmd_dar.backbones.compat import warn_if_untested_diffusers
from dmd_dar.backbones.dit import DiTDAR
from dmd_dar.backbones.flux import FluxDAR
from dmd_dar.backbones.pixart import PixArtDAR
from dmd_dar.backbones.qwenimage import QwenImageDAR
from dmd_dar.backbones.sd3 import SD3DAR
from dmd_dar.backbones.wrapper import DARTransformer
from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig

#: diffusers model class name -> its DARTransformer subclass.
ADAPTERS: dict[str, type[DARTransformer]] = {
    cls.model_class: cls for cls in (DiTDAR, PixArtDAR, SD3DAR, FluxDAR, QwenImageDAR)
}


def adapter_for(model: nn.Module) -> type[DARTransformer]:
    """The adapter for ``model``'s class (or the nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise UserError(f"no DAR adapter for {type(model).__name__}; supported diffusers models: "
                    f"{', '.join(sorted(ADAPTERS))}")


def wrap_with_dar(diffusers_model: nn.Module, routing_cfg: RoutingConfig, route_text: bool = False) -> DARTransformer:
    """Wrap a stock diffusers transformer so that its residual connections are routed by ``routing_cfg``.

    The diffusers model is not modified (same module tree, same state-dict keys; it becomes ``wrapper.transformer``)
    and the DAR routers live beside it (``wrapper.router``, ``wrapper.text_router``). ``routing_cfg`` is made
    function-preserving (``RoutingConfig.for_retrofit``), so at step 0 the wrapper computes the stock model's
    function; ``routing_cfg.kind == "residual"`` gives the plain twin, equal to the stock model at every step.
    ``route_text`` also routes the text stream of two-stream models (SD3, Flux, Qwen-Image) with its own router.
    Warns when the installed diffusers is outside ``compat.TESTED_DIFFUSERS``.
    """
    if isinstance(diffusers_model, DARTransformer):
        raise UserError("the model is already wrapped with DAR; pass wrapper.transformer to re-wrap it")
    adapter = adapter_for(diffusers_model)
    warn_if_untested_diffusers()
    return adapter(diffusers_model, routing_cfg, route_text=route_text)

"""``DARTransformer``: a stock diffusers transformer plus the DAR routers that replace its residual connections.

The diffusers model is held untouched as ``.transformer`` (its module tree and state-dict keys unchanged, so
teacher weights, LoRA target names, ``_no_split_modules`` and ``_tp_plan`` paths keep resolving). The routers live
beside it as ``.router`` (image stream) and ``.text_router`` (text stream of two-stream models; a parameter-free
``ResidualRouter`` unless text routing is enabled). Each subclass (one per diffusers model class, in its own module)
re-implements the model's block loop and the block bodies at sublayer granularity, with the stock ``forward``
signature and outputs, so the wrapper can stand in for the transformer in a pipeline call path.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from dmd_dar.backbones.common import run_sublayer
from dmd_dar.errors import UserError
from dmd_dar.routing import DARRouter, RoutingConfig, build_router

# Attributes that must not silently fall through to the diffusers model: they would save or load the diffusers
# weights without the routers.
_NOT_DELEGATED = frozenset({"save_pretrained", "from_pretrained", "push_to_hub"})


class DARTransformer(nn.Module):
    """Base of the per-model adapters; build one with ``dmd_dar.backbones.wrap_with_dar``.

    Class attributes a subclass sets:
        model_class:  name of the diffusers class it adapts.
        mirrors:      "module:Qualname.forward" of every diffusers function whose body it re-implements
                      (fingerprinted in ``compat.RECORDED_FINGERPRINTS``).
        has_text_stream: the model carries a separately updated text (context) stream.
    and implements ``image_plan()`` / ``text_plan()`` (how many sublayers each router has) and ``forward``.

    The routing config is always made function-preserving with ``RoutingConfig.for_retrofit()`` (count scaling,
    sum summaries, zero-initialised learned time gain): at step 0 the wrapper computes the stock model's function.
    """

    model_class: ClassVar[str] = ""
    mirrors: ClassVar[tuple[str, ...]] = ()
    has_text_stream: ClassVar[bool] = False

    def __init__(self, transformer: nn.Module, routing_cfg: RoutingConfig, route_text: bool = False) -> None:
        super().__init__()
        if route_text and not self.has_text_stream:
            raise UserError(f"route_text=True, but {self.model_class} has no separate text stream to route; "
                            "drop route_text")
        self.transformer = transformer
        self.routing_cfg = routing_cfg.for_retrofit()
        self.route_text = bool(route_text)
        dim = transformer.inner_dim
        num_sublayers, parallel = self.image_plan()
        self.router = _build_router(self.routing_cfg, num_sublayers, dim, parallel)
        if self.has_text_stream:
            text_cfg = self.routing_cfg if route_text else RoutingConfig(kind="residual")
            self.text_router = _build_router(text_cfg, self.text_plan(), dim, ())
        else:
            self.text_router = None

    # --- what each adapter provides -------------------------------------------------------------------------
    def image_plan(self) -> tuple[int, tuple[int, ...]]:
        """(number of image-stream sublayers, 1-indexed sublayers that share the previous sublayer's input)."""
        raise NotImplementedError

    def text_plan(self) -> int:
        """Number of text-stream writes that precede the text stream's last read (see ``RoutedStream``)."""
        raise NotImplementedError

    # --- shared plumbing -------------------------------------------------------------------------------------
    def sublayer(self, fn, *args):
        """Run a sublayer computation, checkpointed when the diffusers model has gradient checkpointing on."""
        return run_sublayer(self.transformer, fn, *args)

    def extra_repr(self) -> str:
        cfg = self.routing_cfg
        return (f"model={self.model_class}, routing={cfg.kind}, query={cfg.query}, chunk_size={cfg.chunk_size}, "
                f"route_text={self.route_text}")

    def __getattr__(self, name: str):
        """Fall back to the diffusers model for anything the wrapper does not define (``config``, ``dtype``,
        ``device``, ``enable_gradient_checkpointing``, ``cache_context``, ...), so pipelines can call the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _NOT_DELEGATED:
                raise AttributeError(
                    f"DARTransformer.{name} is not delegated to the diffusers model: it would drop the DAR "
                    "routers; save the wrapper's state_dict (transformer.* and router.* keys) instead"
                ) from None
            # via __dict__: during copy/unpickling the instance may not be initialised yet; a shared base
            # (dmd_dar.t2i.task: one frozen transformer under several wrappers) is held outside _modules
            transformer = self.__dict__.get("_modules", {}).get("transformer")
            if transformer is None:
                transformer = self.__dict__.get("transformer")
            if transformer is None or name.startswith("__"):
                raise
            return getattr(transformer, name)


def _build_router(cfg: RoutingConfig, num_sublayers: int, dim: int, parallel: tuple[int, ...]) -> nn.Module:
    """A router for one stream. Sublayers in ``parallel`` read the same input as the sublayer before them (SD3.5's
    dual attention), so they are never asked for an input: their aggregators are removed (they could never get a
    gradient, and unused parameters upset DDP)."""
    router = build_router(cfg, num_sublayers, dim)
    if isinstance(router, DARRouter):
        for l in parallel:
            del router.aggregators[f"sublayer_{l}"]
    return router


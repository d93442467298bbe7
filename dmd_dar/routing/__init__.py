"""Diffusion-Adaptive Routing (DAR) and its plain-residual twin. Depends on torch (and Triton, for the fused kernel)."""

from dmd_dar.routing.aggregate import aggregate_lean, aggregate_reference
from dmd_dar.routing.config import RoutingConfig
from dmd_dar.routing.kernel import aggregate_fused
from dmd_dar.routing.router import (
    DARRouter,
    DepthAggregator,
    ResidualRouter,
    build_router,
    routing_entropy,
    routing_parameters,
)
from dmd_dar.routing.sources import SourceHistory, source_indices

__all__ = [
    "DARRouter", "DepthAggregator", "ResidualRouter", "RoutingConfig", "SourceHistory", "aggregate_fused",
    "aggregate_lean",
    "aggregate_reference", "build_router", "routing_entropy", "routing_parameters", "source_indices",
]

"""Routers: the object a transformer asks for each sublayer's input, and tells each sublayer's output.

Both routers share one interface, so a model is written once and runs with either:

    state = router.begin(v0)                  # v0: patch embedding (+ positions), [B, T, D]
    for l in 1..L:
        h = router.input_for(l, state, t_emb)  # the input of sublayer l
        v = sublayer_l(h)                      # raw output, gate included, residual NOT added
        router.push(state, v)
    h_final = router.output(state, t_emb)      # input of the output head

``ResidualRouter`` is the plain twin (h_l = v_0 + sum_{i<l} v_i). ``DARRouter`` holds one aggregator per sublayer
plus a dedicated final aggregator. The per-forward history lives in the returned state, never on the module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmd_dar.routing.aggregate import aggregate_lean, aggregate_reference
from dmd_dar.routing.config import RoutingConfig
from dmd_dar.routing.kernel import aggregate_fused, check_kernel_available, kernel_unavailable_reason
from dmd_dar.routing.sources import SourceHistory


class ResidualState:
    """Running residual stream of one forward pass."""

    def __init__(self, v0: torch.Tensor) -> None:
        self.h = v0
        self.count = 0
        self.weights = None


class ResidualRouter(nn.Module):
    """Plain residual connections behind the router interface (no parameters)."""

    def __init__(self, num_sublayers: int, dim: int) -> None:
        super().__init__()
        self.num_sublayers, self.dim = num_sublayers, dim

    def begin(self, v0: torch.Tensor, record_weights: bool = False) -> ResidualState:
        return ResidualState(v0)

    def input_for(self, sublayer: int, state: ResidualState, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        return state.h

    def push(self, state: ResidualState, v: torch.Tensor) -> None:
        state.h = state.h + v
        state.count += 1

    def output(self, state: ResidualState, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        return state.h


class DepthAggregator(nn.Module):
    """One DAR aggregator: a query (static vector, time gain, or dynamic projection) and an RMSNorm gain.

    Every query parameter starts at zero, so the weights start uniform.
    """

    def __init__(self, dim: int, cfg: RoutingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm_gain = nn.Parameter(torch.ones(dim))
        if cfg.query == "dynamic":
            self.query_proj = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.query_proj.weight)
        else:
            self.query = nn.Parameter(torch.zeros(dim))
            if cfg.query == "static_t" and cfg.time_gain == "learned":
                self.time_gain = nn.Parameter(torch.zeros(dim))

    def make_query(self, previous: torch.Tensor, t_emb: torch.Tensor | None) -> torch.Tensor:
        """The query, [B, 1, D] for static variants or [B, T, D] for dynamic."""
        batch = previous.shape[0]
        if self.cfg.query == "dynamic":
            return self.query_proj(previous)  # [B, T, D]
        q = self.query.view(1, 1, -1).expand(batch, 1, -1)  # [B, 1, D]
        if self.cfg.query == "static_t":
            if t_emb is None:
                raise ValueError("routing.query='static_t' needs the timestep embedding e(t)")
            e = t_emb.unsqueeze(1)  # [B, 1, D]
            q = q + (self.time_gain * e if self.cfg.time_gain == "learned" else e)
        return q

    def forward(self, sources: list[torch.Tensor], previous: torch.Tensor,
                t_emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.make_query(previous, t_emb)
        count_scale = self.cfg.scale == "count"
        if self._use_kernel(sources[0].device):
            return aggregate_fused(sources, query, self.norm_gain, self.cfg.norm_eps, count_scale)
        if not self.cfg.lean:
            return aggregate_reference(sources, query, self.norm_gain, self.cfg.norm_eps, count_scale)
        layout = None if self.cfg.lean_layout == "auto" else self.cfg.lean_layout
        return aggregate_lean(sources, query, self.norm_gain, self.cfg.norm_eps, count_scale, layout)

    def _use_kernel(self, device: torch.device) -> bool:
        """routing.kernel: "triton" always (a ``UserError`` naming the fix where it cannot run, e.g. run.cpu=true
        on a CUDA machine), "auto" for CUDA tensors of the lean path when Triton imports, "torch" never."""
        if self.cfg.kernel == "triton":
            check_kernel_available(device)
            return True
        return self.cfg.kernel == "auto" and self.cfg.lean and device.type == "cuda" \
            and kernel_unavailable_reason(device) is None


class DARRouter(nn.Module):
    """Diffusion-Adaptive Routing over ``num_sublayers`` sublayers of width ``dim``.

    ``aggregators["sublayer_l"]`` feeds sublayer l (l = 2..L) and ``aggregators["final"]`` is the dedicated final
    aggregator. Sublayer 1 has a single source, v_0, whose weight is 1 whatever the query, so it gets no
    parameters (they could never receive a gradient).
    """

    def __init__(self, num_sublayers: int, dim: int, cfg: RoutingConfig) -> None:
        super().__init__()
        self.num_sublayers, self.dim, self.cfg = num_sublayers, dim, cfg
        names = [f"sublayer_{l}" for l in range(2, num_sublayers + 1)] + ["final"]
        self.aggregators = nn.ModuleDict({name: DepthAggregator(dim, cfg) for name in names})

    def begin(self, v0: torch.Tensor, record_weights: bool = False) -> SourceHistory:
        state = SourceHistory(v0, self.cfg.chunk_size, self.cfg.summary)
        if record_weights:
            state.weights = []
        return state

    def _aggregate(self, name: str, sources: list[torch.Tensor], state: SourceHistory,
                   t_emb: torch.Tensor | None) -> torch.Tensor:
        h, alpha = self.aggregators[name](sources, state.last, t_emb)
        if state.weights is not None:
            state.weights.append(alpha.detach())
        return h

    def input_for(self, sublayer: int, state: SourceHistory, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        if sublayer != state.count + 1:
            raise RuntimeError(f"DAR routing out of order: asked for sublayer {sublayer} after {state.count} pushes")
        sources = state.sources()
        if sublayer == 1:  # the single source v_0 has weight 1
            if state.weights is not None:
                state.weights.append(torch.ones(1, *sources[0].shape[:2], device=sources[0].device))
            return sources[0]
        return self._aggregate(f"sublayer_{sublayer}", sources, state, t_emb)

    def push(self, state: SourceHistory, v: torch.Tensor) -> None:
        state.push(v)

    def output(self, state: SourceHistory, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        if state.count != self.num_sublayers:
            raise RuntimeError(f"DAR final aggregator called after {state.count} of {self.num_sublayers} sublayers")
        return self._aggregate("final", state.final_sources(), state, t_emb)


def build_router(cfg: RoutingConfig, num_sublayers: int, dim: int) -> nn.Module:
    """A ``ResidualRouter`` or ``DARRouter`` for a stack of ``num_sublayers`` sublayers of width ``dim``."""
    if cfg.is_dar:
        return DARRouter(num_sublayers, dim, cfg)
    return ResidualRouter(num_sublayers, dim)


def routing_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter of the DAR routers inside ``module`` (for their own optimizer group)."""
    params: list[nn.Parameter] = []
    for sub in module.modules():
        if isinstance(sub, DARRouter):
            params.extend(p for p in sub.parameters() if p.requires_grad)
    return params


def routing_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of routing weights alpha [N, B, T] (1 = uniform, 0 = one source), per (B, T)."""
    n = alpha.shape[0]
    if n == 1:
        return torch.zeros(alpha.shape[1:], device=alpha.device)
    ent = -(alpha.clamp_min(1e-12).log() * alpha).sum(0)
    return ent / math.log(n)

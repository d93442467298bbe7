"""Routing configuration: plain residual connections or Diffusion-Adaptive Routing (DAR)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dmd_dar.errors import UserError, config_key
from dmd_dar.routing.kernel import check_kernel_available

KINDS = ("residual", "dar")
QUERIES = ("static", "static_t", "dynamic")
SUMMARIES = ("last", "sum")
SCALES = ("convex", "count")
TIME_GAINS = ("fixed", "learned")
LEAN_LAYOUTS = ("auto", "stacked", "per_source")
KERNELS = ("auto", "triton", "torch")


@dataclass
class RoutingConfig:
    """How sublayer outputs are combined into the next sublayer's input.

    kind:       "residual" (h_l = v_0 + sum_i v_i) or "dar" (softmax-weighted aggregation over sources).
    query:      "static" q = w_l; "static_t" q = w_l + e(t); "dynamic" q = W_q v_{l-1}.
    chunk_size: S, counted in sublayers. 1 is dense (every earlier output is a source).
    summary:    what stands for a finished chunk: "last" (its last output, as in the paper) or "sum"
                (the sum of its outputs; keeps a chunked retrofit function-preserving).
    scale:      "convex" returns sum_i alpha_i v_i (the paper); "count" multiplies that by |S_l|, so that zero
                queries give exactly the residual stream (retrofit into pretrained models, consumers that do not
                normalise first).
    time_gain:  for static_t: "fixed" uses e(t) itself (the paper, for models trained from scratch with a
                zero-initialised t-embedder output layer); "learned" uses a zero-initialised per-aggregator gain
                g_l * e(t), so a pretrained t-embedder does not perturb the routing at step 0.
    lean:       use the memory-lean autograd function (recomputes the RMSNorm keys in backward).
    lean_layout: how the lean function walks the sources: "stacked" (batched ops over a transient stack, for
                accelerators), "per_source" (a loop, no stack: faster on CPU), "auto" (by device). Same results.
    kernel:     the aggregation's implementation: "triton" (the fused kernel, ``routing/kernel.py``: one pass over
                the sources, online softmax), "torch" (the lean autograd function, or the reference path with
                lean=false), "auto" (Triton for CUDA tensors when Triton imports and lean=true, torch elsewhere).
                Same results within float tolerance.
    """

    kind: str = "residual"
    query: str = "static_t"
    chunk_size: int = 1
    summary: str = "last"
    scale: str = "convex"
    time_gain: str = "fixed"
    norm_eps: float = 1e-6
    lean: bool = True
    lean_layout: str = "auto"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("query", self.query, QUERIES),
            ("summary", self.summary, SUMMARIES),
            ("scale", self.scale, SCALES),
            ("time_gain", self.time_gain, TIME_GAINS),
            ("lean_layout", self.lean_layout, LEAN_LAYOUTS),
            ("kernel", self.kernel, KERNELS),
        ):
            if value not in allowed:
                raise UserError(f"{config_key('routing', name)}={value!r} is not valid; choose one of "
                                f"{', '.join(allowed)}")
        if int(self.chunk_size) < 1:
            raise UserError(f"{config_key('routing', 'chunk_size')}={self.chunk_size} must be >= 1 (1 = dense DAR)")
        if self.kernel == "triton" and self.is_dar:
            check_kernel_available()

    @property
    def is_dar(self) -> bool:
        return self.kind == "dar"

    def for_retrofit(self) -> RoutingConfig:
        """The function-preserving variant of this config, for converting a trained residual model.

        Count scaling makes uniform weights reproduce the residual sum exactly (no reliance on LayerNorm's
        scale invariance, which its epsilon breaks at the 1e-4 level); sum summaries keep chunked sources
        complete; a learned zero gain keeps a pretrained e(t) out of the queries at step 0.
        """
        if not self.is_dar:
            return self
        return replace(self, scale="count", time_gain="learned",
                       summary="sum" if self.chunk_size > 1 else self.summary)

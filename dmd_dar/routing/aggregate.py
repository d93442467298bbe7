"""The DAR depth-softmax: h = sum_i alpha_i v_i, alpha = softmax_i(q . RMSNorm(v_i) / sqrt(d)).

Two implementations with identical results:
- ``aggregate_reference``: plain autograd over a stacked [N, B, T, D] tensor. Easy to read; keeps the stack and the
  normalised keys alive for backward.
- ``LeanAggregate``: a custom autograd function that saves only the softmax weights, the per-source inverse RMS
  and the logits ([N, B, T] each) besides the sources; backward recomputes the keys. Activation memory per
  aggregator drops from O(N*B*T*D) to O(N*B*T) (the sources are stored once, whoever holds them). It runs over a
  stack of the sources (accelerators) or source by source (CPU).

Weights and logits are computed in at least float32 whatever the sources' dtype (the softmax over depth is the
part that bf16 gets wrong); float64 sources stay in float64.
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def aggregate_reference(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float,
                        count_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference DAR aggregation. sources: N x [B, T, D]; query: [B, 1 or T, D]; gain: [D].

    Returns (h [B, T, D] in the sources' dtype, alpha [N, B, T] float32).
    """
    cd = _compute_dtype(sources[0].dtype)
    v = torch.stack(sources).to(cd)  # [N, B, T, D]
    dim = v.shape[-1]
    keys = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain.to(cd)  # [N, B, T, D]
    logits = (keys * query.to(cd).unsqueeze(0)).sum(-1) / math.sqrt(dim)  # [N, B, T]
    alpha = logits.softmax(dim=0)  # [N, B, T]
    h = (alpha.unsqueeze(-1) * v).sum(0)  # [B, T, D]
    if count_scale:
        h = h * len(sources)
    return h.to(sources[0].dtype), alpha


class LeanAggregate(torch.autograd.Function):
    """Memory-lean DAR aggregation (same maths as ``aggregate_reference``).

    Saves only the sources themselves (already alive as other layers' inputs) and three [N, B, T] tensors
    (weights, inverse RMS, logits); backward recomputes what it needs from the sources. Two layouts, same maths:

    - ``stacked``: every step is one batched op over a transient [N, B, T, D] stack, so the number of kernel
      launches per aggregator does not grow with N (with a Python loop over sources, launches dominated the step
      on GPU);
    - ``per_source``: a loop over the sources, no stack. On CPU launches are cheap and a fresh stack-sized buffer
      is not: each call page-faults it in (~20 ms for 37 MB, more than the aggregation's arithmetic).
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, gain: torch.Tensor, eps: float, count_scale: bool, layout: str,
                *sources: torch.Tensor):
        h, alpha, inv_rms, logits = _lean_forward(query, gain, eps, count_scale, layout, sources)
        ctx.save_for_backward(query, gain, alpha, inv_rms, logits, *sources)
        ctx.eps, ctx.count_scale, ctx.layout = eps, count_scale, layout
        ctx.mark_non_differentiable(alpha)
        return h.to(sources[0].dtype), alpha

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, _grad_alpha: torch.Tensor | None):
        query, gain, alpha, inv_rms, logits, *sources = ctx.saved_tensors
        n, dim = len(sources), sources[0].shape[-1]
        cd = alpha.dtype
        g = grad_h.to(cd)  # [B, T, D]
        if ctx.count_scale:
            g = g * n
        scale = 1.0 / math.sqrt(dim)
        a = query.to(cd) * gain.to(cd) * scale  # [B, 1|T, D]
        v = _in_layout(sources, cd, ctx.layout)  # rebuilt
        # d loss / d alpha_i = <g, v_i>;  d loss / d logit_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j)
        dalpha = _dots(v, g)  # [N, B, T]
        dlogit = alpha * (dalpha - (alpha * dalpha).sum(0, keepdim=True))  # [N, B, T]
        # logit_i = r_i (a . v_i), r_i = (mean v_i^2 + eps)^-1/2  =>  d logit_i / d v_i = r_i a - r_i^2 logit_i v_i / D
        w = dlogit * inv_rms  # [N, B, T]
        # d loss / d v_i = alpha_i g + w_i a - (w_i r_i logit_i / D) v_i
        grad_sources = _source_grads(v, -(w * inv_rms * logits) / dim, alpha, g, w, a, sources[0].dtype)
        grad_query = grad_gain = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_qg = _weighted_sum(w, v)  # sum_i dlogit_i * u_i, [B, T, D]
            if ctx.needs_input_grad[0]:
                gq = grad_qg * gain.to(cd) * scale  # [B, T, D]
                if query.shape[1] == 1:
                    gq = gq.sum(1, keepdim=True)
                grad_query = gq.to(query.dtype)
            if ctx.needs_input_grad[1]:
                grad_gain = (grad_qg * query.to(cd) * scale).sum((0, 1)).to(gain.dtype)
        return (grad_query, grad_gain, None, None, None, *grad_sources)


def _lean_forward(query: torch.Tensor, gain: torch.Tensor, eps: float, count_scale: bool, layout: str,
                  sources: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(h [B, T, D] in the compute dtype, alpha, inverse RMS, logits [N, B, T]): the lean forward's maths."""
    n, dim = len(sources), sources[0].shape[-1]
    cd = _compute_dtype(sources[0].dtype)
    v = _in_layout(sources, cd, layout)  # [N, B, T, D] or N x [B, T, D]
    a = query.to(cd) * gain.to(cd) / math.sqrt(dim)  # [B, 1|T, D]: logit_i = r_i * (a . v_i)
    inv_rms = _inverse_rms(v, eps)  # [N, B, T]
    logits = inv_rms * _dots(v, a)  # [N, B, T]
    alpha = logits.softmax(dim=0)  # [N, B, T]
    h = _weighted_sum(alpha, v)  # [B, T, D]
    if count_scale:
        h = h * n
    return h, alpha, inv_rms, logits


# The layout-specific pieces. ``v`` is a stacked [N, B, T, D] tensor or a list of N [B, T, D] tensors.
Sources = torch.Tensor | list[torch.Tensor]


def _in_layout(sources: tuple[torch.Tensor, ...], dtype: torch.dtype, layout: str) -> Sources:
    if layout == "per_source":
        return [s.to(dtype) for s in sources]
    out = torch.empty((len(sources), *sources[0].shape), dtype=dtype, device=sources[0].device)
    return torch.stack(sources, out=out)  # cast in the same pass (no low-precision copy)


def _inverse_rms(v: Sources, eps: float) -> torch.Tensor:
    """(mean_D v_i^2 + eps)^-1/2 -> [N, B, T]."""
    if isinstance(v, list):
        return torch.stack([_inverse_rms(x, eps) for x in v])
    return torch.rsqrt(torch.linalg.vector_norm(v, dim=-1).square() / v.shape[-1] + eps)


def _dots(v: Sources, a: torch.Tensor) -> torch.Tensor:
    """<a, v_i> per source and token -> [N, B, T]; a is [B, 1 or T, D] (broadcast over tokens when 1)."""
    if a.shape[1] == 1:  # one batched matmul: [.., B, T, D] @ [B, D, 1]
        if isinstance(v, list):
            return torch.stack([torch.matmul(x, a.transpose(1, 2)).squeeze(-1) for x in v])
        return torch.matmul(v, a.transpose(1, 2)).squeeze(-1)
    if isinstance(v, list):  # vecdot: on CPU ~10x faster than einsum, which lowers this to B*T tiny matmuls
        return torch.stack([torch.linalg.vecdot(x, a) for x in v])
    return torch.einsum("nbtd,btd->nbt", v, a)


def _weighted_sum(weights: torch.Tensor, v: Sources) -> torch.Tensor:
    """sum_i weights_i v_i: weights [N, B, T] -> [B, T, D]."""
    if isinstance(v, list):
        out = v[0] * weights[0].unsqueeze(-1)
        for w_i, v_i in zip(weights[1:], v[1:]):
            out.addcmul_(v_i, w_i.unsqueeze(-1))
        return out
    return torch.einsum("nbt,nbtd->btd", weights, v)


def _source_grads(v: Sources, c: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                  a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """c_i v_i + alpha_i g + w_i a for each source (c, alpha, w: [N, B, T]), cast to the sources' dtype."""
    if isinstance(v, list):
        grads = []
        for i, v_i in enumerate(v):
            grad = v_i * c[i].unsqueeze(-1)
            grad.addcmul_(alpha[i].unsqueeze(-1), g)
            grad.addcmul_(w[i].unsqueeze(-1), a)
            grads.append(grad.to(dtype))
        return tuple(grads)
    grad_v = v * c.unsqueeze(-1)  # [N, B, T, D]
    grad_v.addcmul_(alpha.unsqueeze(-1), g.unsqueeze(0))
    grad_v.addcmul_(w.unsqueeze(-1), a.unsqueeze(0))
    return grad_v.to(dtype).unbind(0)


LAYOUTS = ("stacked", "per_source")


def aggregate_lean(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float,
                   count_scale: bool, layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-lean DAR aggregation; same signature and results as ``aggregate_reference``.

    ``layout``: ``stacked`` or ``per_source`` (see ``LeanAggregate``); None picks ``per_source`` on CPU and
    ``stacked`` on accelerators.
    """
    if layout is None:
        layout = "per_source" if sources[0].device.type == "cpu" else "stacked"
    elif layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (query, gain, *sources))):
        # Nothing to differentiate (teacher and no-grad passes): the same maths without the autograd function,
        # which saves nothing and which torch.compile traces without a graph break (it cannot inline the
        # function's forward under no_grad).
        h, alpha, _, _ = _lean_forward(query, gain, eps, count_scale, layout, tuple(sources))
        return h.to(sources[0].dtype), alpha
    return LeanAggregate.apply(query, gain, eps, count_scale, layout, *sources)

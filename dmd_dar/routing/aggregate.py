"""The DAR depth-softmax: h = sum_i alpha_i v_i, alpha = softmax_i(q . RMSNorm(v_i) / sqrt(d)).

Two implementations with identical results:
- ``aggregate_reference``: plain autograd over a stacked [N, B, T, D] tensor. Easy to read; keeps the stack and the
  normalised keys alive for backward.
- ``LeanAggregate``: a custom autograd function that saves only the softmax weights, the per-source inverse RMS
  and the logits ([N, B, T] each) besides the sources; backward recomputes the keys. Activation memory per
  aggregator drops from O(N*B*T*D) to O(N*B*T) (the sources are stored once, whoever holds them).

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
    (weights, inverse RMS, logits); the [N, B, T, D] stack is rebuilt transiently in backward. Every step runs as
    one batched op over all sources (stack, norm, batched matmuls), so the number of kernel launches per
    aggregator does not grow with N: with a Python loop over sources, launches dominated the step on GPU.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, gain: torch.Tensor, eps: float, count_scale: bool,
                *sources: torch.Tensor):
        n, dim = len(sources), sources[0].shape[-1]
        cd = _compute_dtype(sources[0].dtype)
        v = _stack(sources, cd)  # [N, B, T, D], transient
        a = query.to(cd) * gain.to(cd) / math.sqrt(dim)  # [B, 1|T, D]: logit_i = r_i * (a . v_i)
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1).square() / dim + eps)  # [N, B, T]
        logits = inv_rms * _dot_query(v, a)  # [N, B, T]
        alpha = logits.softmax(dim=0)  # [N, B, T]
        h = torch.einsum("nbt,nbtd->btd", alpha, v)  # [B, T, D]
        if count_scale:
            h = h * n
        ctx.save_for_backward(query, gain, alpha, inv_rms, logits, *sources)
        ctx.eps, ctx.count_scale = eps, count_scale
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
        v = _stack(sources, cd)  # [N, B, T, D], rebuilt
        # d loss / d alpha_i = <g, v_i>;  d loss / d logit_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j)
        dalpha = torch.einsum("btd,nbtd->nbt", g, v)  # [N, B, T]
        dlogit = alpha * (dalpha - (alpha * dalpha).sum(0, keepdim=True))  # [N, B, T]
        # logit_i = r_i (a . v_i), r_i = (mean v_i^2 + eps)^-1/2  =>  d logit_i / d v_i = r_i a - r_i^2 logit_i v_i / D
        w = dlogit * inv_rms  # [N, B, T]
        grad_v = v * (-(w * inv_rms * logits) / dim).unsqueeze(-1)  # [N, B, T, D]
        grad_v.addcmul_(alpha.unsqueeze(-1), g.unsqueeze(0))
        grad_v.addcmul_(w.unsqueeze(-1), a.unsqueeze(0))
        grad_query = grad_gain = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_qg = torch.einsum("nbt,nbtd->btd", w, v)  # sum_i dlogit_i * u_i, [B, T, D]
            if ctx.needs_input_grad[0]:
                gq = grad_qg * gain.to(cd) * scale  # [B, T, D]
                if query.shape[1] == 1:
                    gq = gq.sum(1, keepdim=True)
                grad_query = gq.to(query.dtype)
            if ctx.needs_input_grad[1]:
                grad_gain = (grad_qg * query.to(cd) * scale).sum((0, 1)).to(gain.dtype)
        grad_sources = grad_v.to(sources[0].dtype).unbind(0)
        return (grad_query, grad_gain, None, None, *grad_sources)


def _stack(sources: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """Sources stacked along a new leading dim, cast to ``dtype`` in the same pass (no low-precision copy)."""
    out = torch.empty((len(sources), *sources[0].shape), dtype=dtype, device=sources[0].device)
    return torch.stack(sources, out=out)


def _dot_query(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """<a, v_i> per source and token: v [N, B, T, D], a [B, 1 or T, D] -> [N, B, T], as one batched matmul."""
    if a.shape[1] == 1:
        return torch.matmul(v, a.transpose(1, 2)).squeeze(-1)  # [N, B, T, D] @ [B, D, 1] -> [N, B, T]
    return torch.einsum("nbtd,btd->nbt", v, a)


def aggregate_lean(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float,
                   count_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-lean DAR aggregation; same signature and results as ``aggregate_reference``."""
    return LeanAggregate.apply(query, gain, eps, count_scale, *sources)

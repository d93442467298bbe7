"""The DAR depth-softmax: h = sum_i alpha_i v_i, alpha = softmax_i(q . RMSNorm(v_i) / sqrt(d)).

Two implementations with identical results:
- ``aggregate_reference``: plain autograd over a stacked [N, B, T, D] tensor. Easy to read; keeps the stack and the
  normalised keys alive for backward.
- ``LeanAggregate``: a custom autograd function that streams over the sources and saves only the softmax weights
  and the per-source inverse RMS ([N, B, T] each); backward recomputes the keys. Activation memory per aggregator
  drops from O(N*B*T*D) to O(N*B*T).

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
    """Memory-lean DAR aggregation (same maths as ``aggregate_reference``)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, gain: torch.Tensor, eps: float, count_scale: bool,
                *sources: torch.Tensor):
        dim = sources[0].shape[-1]
        cd = _compute_dtype(sources[0].dtype)
        a = query.to(cd) * gain.to(cd) / math.sqrt(dim)  # [B, 1|T, D]: logits_i = r_i * (a . v_i)
        logits, inv_rms = [], []
        for v in sources:
            vf = v.to(cd)
            r = torch.rsqrt(vf.pow(2).mean(-1) + eps)  # [B, T]
            inv_rms.append(r)
            logits.append(r * (vf * a).sum(-1))  # [B, T]
        alpha = torch.stack(logits).softmax(dim=0)  # [N, B, T]
        h = torch.zeros_like(sources[0], dtype=cd)
        for i, v in enumerate(sources):
            h.add_(alpha[i].unsqueeze(-1) * v.to(cd))
        if count_scale:
            h.mul_(len(sources))
        ctx.save_for_backward(query, gain, alpha, torch.stack(inv_rms), *sources)
        ctx.eps, ctx.count_scale = eps, count_scale
        ctx.mark_non_differentiable(alpha)
        return h.to(sources[0].dtype), alpha

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, _grad_alpha: torch.Tensor | None):
        query, gain, alpha, inv_rms, *sources = ctx.saved_tensors
        n, dim = len(sources), sources[0].shape[-1]
        cd = alpha.dtype
        g = grad_h.to(cd)  # [B, T, D]
        if ctx.count_scale:
            g = g * n
        scale = 1.0 / math.sqrt(dim)
        a = query.to(cd) * gain.to(cd) * scale  # [B, 1|T, D]
        # d loss / d alpha_i = <g, v_i>;  d loss / d logit_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j)
        dalpha = torch.stack([(g * v.to(cd)).sum(-1) for v in sources])  # [N, B, T]
        dlogit = alpha * (dalpha - (alpha * dalpha).sum(0, keepdim=True))  # [N, B, T]
        grad_sources = []
        grad_qg = torch.zeros(g.shape, dtype=cd, device=g.device)  # sum_i dlogit_i * u_i, [B, T, D]
        for i, v in enumerate(sources):
            vf = v.to(cd)
            r = inv_rms[i].unsqueeze(-1)  # [B, T, 1]
            u = vf * r  # normalised source (without gain), [B, T, D]
            s = (u * a).sum(-1, keepdim=True)  # logit_i, [B, T, 1]
            dl = dlogit[i].unsqueeze(-1)  # [B, T, 1]
            # logit_i = r_i (a . v_i), r_i = (mean v_i^2 + eps)^-1/2  =>  d logit / d v_i = r_i (a - s_i u_i / D)
            gv = alpha[i].unsqueeze(-1) * g + dl * r * (a - s * u / dim)
            grad_sources.append(gv.to(v.dtype))
            grad_qg.add_(dl * u)
        grad_query = grad_gain = None
        if ctx.needs_input_grad[0]:
            gq = grad_qg * gain.to(cd) * scale  # [B, T, D]
            if query.shape[1] == 1:
                gq = gq.sum(1, keepdim=True)
            grad_query = gq.to(query.dtype)
        if ctx.needs_input_grad[1]:
            grad_gain = (grad_qg * query.to(cd) * scale).sum((0, 1)).to(gain.dtype)
        return (grad_query, grad_gain, None, None, *grad_sources)


def aggregate_lean(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float,
                   count_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-lean DAR aggregation; same signature and results as ``aggregate_reference``."""
    return LeanAggregate.apply(query, gain, eps, count_scale, *sources)

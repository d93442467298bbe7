"""The fused DAR aggregation kernel (Triton): one pass over the sources per token, online softmax over depth.

Same maths and results as ``aggregate_reference`` / ``aggregate_lean`` (``aggregate.py``):

    h = s * sum_i alpha_i v_i,   alpha = softmax_i(logit_i),   logit_i = r_i (a . v_i),
    a = q * gain / sqrt(D),      r_i = (mean_D v_i^2 + eps)^-1/2,   s = |S| (count scale) or 1.

Forward: each program takes a block of token rows, loads each source row once, and keeps a running maximum, a
running denominator and a running weighted sum (online softmax), so neither the [N, B, T, D] stack nor the
normalised keys ever exist. It writes h, the logits and the inverse RMS per source ([N, B*T], fp32 or fp64), and
the log-sum-exp per token. The sources are read through a table of their addresses, so they stay where the model
put them. Backward recomputes the keys from the raw sources (two passes: sum_j alpha_j <g, v_j>, then each
source's gradient and sum_i dlogit_i r_i v_i for the query and gain); the weights are exp(logit - lse). Saved for
backward besides the sources (alive anyway as other layers' inputs): the logits and inverse RMS ([N, B, T]) and
the log-sum-exp ([B, T]), less than the lean path saves.

Both passes are ``torch.library`` custom ops (``dmd_dar::dar_fused_forward`` / ``dar_fused_backward``) with fake
implementations, so ``torch.compile`` sees the kernel as one opaque node instead of breaking the graph on the
address table. Runs on CUDA, or anywhere under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton
is imported: how the tests run it on CPU).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from dmd_dar.errors import UserError, config_key

try:  # Triton ships with the CUDA builds of torch; CPU-only builds (and some platforms) lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None


def triton_importable() -> bool:
    return triton is not None


def interpreter_on() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (numpy): the CPU test mode."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the Triton kernel cannot run (on ``device``, or on this machine when None), or None when it can."""
    if triton is None:
        return "Triton is not installed (it ships with torch's CUDA builds)"
    if interpreter_on():
        return None
    if device is not None:
        return None if device.type == "cuda" else f"the tensors are on {device.type}, not CUDA"
    return None if torch.cuda.is_available() else "no CUDA device is available"


def check_kernel_available(device: torch.device | None = None, section: str = "routing") -> None:
    """A ``UserError`` naming ``routing.kernel`` and the fix when the Triton kernel cannot run."""
    reason = kernel_unavailable_reason(device)
    if reason is not None:
        raise UserError(f"{config_key(section, 'kernel')}=triton needs Triton and a CUDA device, but {reason}; "
                        f"set {config_key(section, 'kernel')}=torch (or auto)")


if triton is not None:

    @triton.jit
    def _dar_forward_kernel(src_table, q_ptr, gain_ptr, h_ptr, logit_ptr, rinv_ptr, lse_ptr,
                            n_src, rows, tokens, dim, eps, scale, out_scale,
                            SRC_T: tl.constexpr, COMPUTE: tl.constexpr, STATIC_Q: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # token rows of this program
        d = tl.arange(0, BLOCK_D)
        rmask, dmask = r < rows, d < dim
        mask = rmask[:, None] & dmask[None, :]
        offs = r[:, None] * dim + d[None, :]  # [BLOCK_R, BLOCK_D] into a [rows, D] source
        q_rows = r // tokens if STATIC_Q else r  # static queries: one row per sample
        q = tl.load(q_ptr + q_rows[:, None] * dim + d[None, :], mask=mask, other=0.0).to(COMPUTE)
        gain = tl.load(gain_ptr + d, mask=dmask, other=0.0).to(COMPUTE)
        a = q * gain[None, :] * scale  # logit_i = r_i (a . v_i)
        run_max = tl.full([BLOCK_R], float("-inf"), COMPUTE)
        denom = tl.zeros([BLOCK_R], COMPUTE)
        acc = tl.zeros([BLOCK_R, BLOCK_D], COMPUTE)
        for i in range(n_src):
            src = tl.load(src_table + i).to(tl.pointer_type(SRC_T))
            v = tl.load(src + offs, mask=mask, other=0.0).to(COMPUTE)
            rinv = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / dim + eps)
            logit = rinv * tl.sum(v * a, axis=1)
            new_max = tl.maximum(run_max, logit)
            correction = tl.exp(run_max - new_max)  # 0 at the first source (run_max = -inf)
            p = tl.exp(logit - new_max)
            denom = denom * correction + p
            acc = acc * correction[:, None] + p[:, None] * v
            run_max = new_max
            tl.store(logit_ptr + i * rows + r, logit, mask=rmask)
            tl.store(rinv_ptr + i * rows + r, rinv, mask=rmask)
        h = acc * (out_scale / denom)[:, None]
        tl.store(h_ptr + offs, h.to(SRC_T), mask=mask)
        tl.store(lse_ptr + r, run_max + tl.log(denom), mask=rmask)

    @triton.jit
    def _dar_backward_kernel(src_table, grad_table, q_ptr, gain_ptr, gh_ptr, logit_ptr, rinv_ptr, lse_ptr, gqg_ptr,
                             n_src, rows, tokens, dim, scale, out_scale,
                             SRC_T: tl.constexpr, COMPUTE: tl.constexpr, STATIC_Q: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rmask, dmask = r < rows, d < dim
        mask = rmask[:, None] & dmask[None, :]
        offs = r[:, None] * dim + d[None, :]
        q_rows = r // tokens if STATIC_Q else r
        q = tl.load(q_ptr + q_rows[:, None] * dim + d[None, :], mask=mask, other=0.0).to(COMPUTE)
        gain = tl.load(gain_ptr + d, mask=dmask, other=0.0).to(COMPUTE)
        a = q * gain[None, :] * scale
        g = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * out_scale  # d loss / d (unscaled h)
        lse = tl.load(lse_ptr + r, mask=rmask, other=0.0)
        # Pass 1: s = sum_j alpha_j <g, v_j>  (d loss / d logit_i = alpha_i (<g, v_i> - s))
        s = tl.zeros([BLOCK_R], COMPUTE)
        for i in range(n_src):
            src = tl.load(src_table + i).to(tl.pointer_type(SRC_T))
            v = tl.load(src + offs, mask=mask, other=0.0).to(COMPUTE)
            alpha = tl.exp(tl.load(logit_ptr + i * rows + r, mask=rmask, other=0.0) - lse)
            s += alpha * tl.sum(v * g, axis=1)
        # Pass 2: d loss / d v_i = alpha_i g + w_i a - (w_i r_i logit_i / D) v_i, w_i = dlogit_i r_i;
        # and sum_i w_i v_i, from which the wrapper forms the query and gain gradients.
        gqg = tl.zeros([BLOCK_R, BLOCK_D], COMPUTE)
        for i in range(n_src):
            src = tl.load(src_table + i).to(tl.pointer_type(SRC_T))
            v = tl.load(src + offs, mask=mask, other=0.0).to(COMPUTE)
            logit = tl.load(logit_ptr + i * rows + r, mask=rmask, other=0.0)
            rinv = tl.load(rinv_ptr + i * rows + r, mask=rmask, other=0.0)
            alpha = tl.exp(logit - lse)
            w = alpha * (tl.sum(v * g, axis=1) - s) * rinv
            grad = alpha[:, None] * g + w[:, None] * a - (w * rinv * logit / dim)[:, None] * v
            dst = tl.load(grad_table + i).to(tl.pointer_type(SRC_T))
            tl.store(dst + offs, grad.to(SRC_T), mask=mask)
            gqg += w[:, None] * v
        tl.store(gqg_ptr + offs, gqg, mask=mask)


def _tl_dtype(dtype: torch.dtype):
    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
    if dtype not in table:
        raise TypeError(f"the fused DAR kernel takes float16, bfloat16, float32 or float64 sources, not {dtype}")
    return table[dtype]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # as the lean path: at least fp32


@functools.cache
def _blocks(dim: int) -> tuple[int, int, int]:
    """(rows per program, D block, warps): a whole row in one block, ~4k elements per program."""
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))
    return block_r, block_d, 4 if block_r * block_d <= 2048 else 8


def _address_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def _check_sources(sources: list[torch.Tensor]) -> None:
    first = sources[0]
    for s in sources[1:]:
        if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"DAR sources differ: {tuple(s.shape)} {s.dtype} {s.device} vs "
                             f"{tuple(first.shape)} {first.dtype} {first.device}")


# cudagraph_unsafe: each call copies the sources' addresses to the device, which a captured CUDA graph (inductor's
# max-autotune on CUDA) would replay with stale addresses; inductor runs the graph around these ops uncaptured.
_TAGS = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("dmd_dar::dar_fused_forward", mutates_args=(), tags=_TAGS)
def dar_fused_forward(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float,
                      out_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [B, T, D] in the sources' dtype, logits [N, B, T], inverse RMS [N, B, T], log-sum-exp [B, T])."""
    _check_sources(sources)
    sources = [s.contiguous() for s in sources]
    first = sources[0]
    batch, tokens, dim = first.shape
    rows, n, cd = batch * tokens, len(sources), _compute_dtype(first.dtype)
    query, gain = query.contiguous(), gain.contiguous()
    h = torch.empty_like(first)
    logits = torch.empty((n, batch, tokens), dtype=cd, device=first.device)
    rinv = torch.empty_like(logits)
    lse = torch.empty((batch, tokens), dtype=cd, device=first.device)
    block_r, block_d, warps = _blocks(dim)
    _dar_forward_kernel[(triton.cdiv(rows, block_r),)](
        _address_table(sources, first.device), query, gain, h, logits, rinv, lse,
        n, rows, tokens, dim, eps, 1.0 / math.sqrt(dim), out_scale,
        SRC_T=_tl_dtype(first.dtype), COMPUTE=_tl_dtype(cd), STATIC_Q=query.shape[1] == 1,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return h, logits, rinv, lse


@dar_fused_forward.register_fake
def _(sources, query, gain, eps, out_scale):
    first = sources[0]
    batch, tokens, _ = first.shape
    cd = _compute_dtype(first.dtype)
    logits = first.new_empty((len(sources), batch, tokens), dtype=cd)
    return first.new_empty(first.shape), logits, torch.empty_like(logits), first.new_empty((batch, tokens), dtype=cd)


@torch.library.custom_op("dmd_dar::dar_fused_backward", mutates_args=(), tags=_TAGS)
def dar_fused_backward(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, grad_h: torch.Tensor,
                       logits: torch.Tensor, rinv: torch.Tensor, lse: torch.Tensor, out_scale: float
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the sources' gradients, sum_i dlogit_i r_i v_i [B, T, D] in the compute dtype)."""
    sources = [s.contiguous() for s in sources]
    first = sources[0]
    batch, tokens, dim = first.shape
    rows = batch * tokens
    grads = [torch.empty_like(first) for _ in sources]
    gqg = torch.empty(first.shape, dtype=logits.dtype, device=first.device)
    block_r, block_d, warps = _blocks(dim)
    _dar_backward_kernel[(triton.cdiv(rows, block_r),)](
        _address_table(sources, first.device), _address_table(grads, first.device), query.contiguous(),
        gain.contiguous(), grad_h.contiguous(), logits, rinv, lse, gqg,
        len(sources), rows, tokens, dim, 1.0 / math.sqrt(dim), out_scale,
        SRC_T=_tl_dtype(first.dtype), COMPUTE=_tl_dtype(logits.dtype), STATIC_Q=query.shape[1] == 1,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return grads, gqg


@dar_fused_backward.register_fake
def _(sources, query, gain, grad_h, logits, rinv, lse, out_scale):
    first = sources[0]
    return [first.new_empty(first.shape) for _ in sources], first.new_empty(first.shape, dtype=logits.dtype)


def _setup_context(ctx, inputs, output) -> None:
    sources, query, gain, _eps, out_scale = inputs
    _h, logits, rinv, lse = output
    ctx.save_for_backward(query, gain, logits, rinv, lse, *sources)
    ctx.out_scale = out_scale


def _backward(ctx, grad_h, _grad_logits, _grad_rinv, _grad_lse):
    query, gain, logits, rinv, lse, *sources = ctx.saved_tensors
    grads, gqg = dar_fused_backward(sources, query, gain, grad_h, logits, rinv, lse, ctx.out_scale)
    scale = 1.0 / math.sqrt(sources[0].shape[-1])
    cd = gqg.dtype
    grad_query = grad_gain = None
    if ctx.needs_input_grad[1]:
        gq = gqg * (gain.to(cd) * scale)  # [B, T, D]
        grad_query = (gq.sum(1, keepdim=True) if query.shape[1] == 1 else gq).to(query.dtype)
    if ctx.needs_input_grad[2]:
        grad_gain = (gqg * query.to(cd) * scale).sum((0, 1)).to(gain.dtype)
    return list(grads), grad_query, grad_gain, None, None


dar_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def aggregate_fused(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float,
                    count_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DAR aggregation; same signature and results as ``aggregate_reference`` (alpha: not differentiable).

    Needs Triton and CUDA tensors, or Triton's interpreter (``TRITON_INTERPRET=1``) for CPU tensors.
    """
    reason = kernel_unavailable_reason(sources[0].device)
    if reason is not None:
        raise RuntimeError(f"the fused DAR kernel cannot run: {reason}")
    out_scale = float(len(sources)) if count_scale else 1.0
    h, logits, _rinv, lse = dar_fused_forward(list(sources), query, gain, float(eps), out_scale)
    alpha = torch.exp(logits.detach() - lse.detach().unsqueeze(0))  # [N, B, T], fp32 (fp64 for fp64 sources)
    return h, alpha

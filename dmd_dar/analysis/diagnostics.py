"""Routing diagnostics of a native SiT (residual or DAR) over depth x timestep: pure computations, no I/O.

Follows the DAR paper's diagnosis protocol (docs: shared/reference/dar_paper.md §2):

- ``rms[k]``       forward magnitude of z_k, the state block k hands to block k+1 (``ModelInternals.block_outputs``;
                   for DAR the aggregated input of block k+1, the final aggregate for the last block): per-token RMS
                   over channels, averaged over samples and tokens.
- ``grad_rms[k]``  the same statistic of dL/dz_k, L = the model's own denoising loss (its parameterisation's MSE,
                   mean over all ``N`` samples and elements, true labels, no label dropout). Gradients of a mean
                   loss scale as 1/N; ``grad_rms_per_sample`` = N * grad_rms is batch-size free.
- ``cos[k]``       per-token cosine between z_k and z_{k+1}, averaged (k = 1..depth-1).
- ``gate_drop[l]`` counterfactual importance of sublayer l: L(v_l := 0) - L (the loss change when its output is
                   dropped; 0 for a sublayer whose adaLN gate is zero).
- ``gate_grad[l]`` dL/dg_l at g = 1 for a scalar gate on v_l: sum <dL/dv_l, v_l> (first order: drop ~ -gate_grad).
- residual only: ``source_importance[l, i]`` = dL/dg_{i->l} for a gate on source v_i in the copy of the residual
                   stream fed to sublayer l only (the paper's Fig. 3 counterfactual router; pass-through untouched):
                   sum <dL/d(input of f_l), v_i>, i < l; v_0 = the patch embedding.
- DAR only: ``weights[a, i]`` mean routing weight of source v_i for aggregator a (sublayers 1..L, then the final
                   one; chunk summaries sit at the index of their chunk's last output), and ``entropy[a]`` the
                   normalised routing entropy (1 = uniform, 0 = one source).
- ``attn_entropy[k]``  normalised entropy of block k's self-attention maps, -sum_j a_ij log a_ij / log T, averaged
                   over samples, heads and query tokens (1 = every query attends uniformly, 0 = to one token).
- ``attn_distance[k]`` mean attention distance of block k in patch units, sum_j a_ij |p_i - p_j| averaged likewise;
                   ``attn_distance_uniform`` is its value for uniform attention on the same patch grid. Together
                   they show whether attention is local (mixes neighbouring patches) or a global average: a small
                   pixel-space transformer whose attention stays near uniform cannot make neighbouring patches agree,
                   and its samples come out as a mosaic of patches.
- ``class_loss[c]``  the denoising loss restricted to the samples of class c (NaN for a class with no samples).

Every statistic is computed on the same (x0, eps, y) at every t, so differences along t come from t alone.
Timesteps follow docs/CONVENTIONS.md: t = 1 is pure noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dmd_dar.routing.router import routing_entropy
from dmd_dar.routing.sources import source_indices

__all__ = ["attention_locality", "capture_attention_locality", "diagnose_model", "dropped_sublayer", "per_token_rms",
           "timestep_diagnostics", "token_cosine", "uniform_attention_distance"]


def per_token_rms(x: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of sqrt(mean over channels of x^2). x: [B, T, D] -> scalar (float64)."""
    return x.detach().double().pow(2).mean(-1).sqrt().mean()


def token_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over batch and tokens of the per-token cosine between a and b ([B, T, D]) -> scalar (float64)."""
    a, b = a.detach().double(), b.detach().double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return (num / den.clamp_min(eps)).mean()


def _sublayer_modules(model: nn.Module) -> list[nn.Module]:
    """The module whose output is sublayer l's raw branch (attention / MLP before the gate), l = 1..L."""
    return [m for block in model.blocks for m in (block.attn, block.mlp)]


def _input_norms(model: nn.Module) -> list[nn.Module]:
    """The first module each sublayer applies to its input h_l (the pre-norm LayerNorms), l = 1..L."""
    return [m for block in model.blocks for m in (block.norm1, block.norm2)]


@contextmanager
def dropped_sublayer(model: nn.Module, sublayer: int):
    """Within the block, sublayer ``sublayer`` (1-indexed) outputs zeros (v_l = gate * 0 = 0)."""
    handle = _sublayer_modules(model)[sublayer - 1].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _no_checkpointing(model: nn.Module):
    # Hooks and alias tensors must see a single forward per sublayer; checkpoint recomputation would rerun them.
    old = model.cfg.gradient_checkpointing
    model.cfg.gradient_checkpointing = False
    try:
        yield
    finally:
        model.cfg.gradient_checkpointing = old


def _patch_distances(grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, T] Euclidean distances between the patches of a grid x grid token layout (row-major), in patches."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([r.reshape(-1), c.reshape(-1)], dim=1).double()
    return torch.cdist(pos, pos).to(device)


def uniform_attention_distance(grid: int) -> float:
    """Mean attention distance of uniform attention on a grid x grid patch layout (about 0.52 * grid)."""
    return float(_patch_distances(grid).mean())


def attention_locality(weights: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised entropy, mean distance in patches) of attention maps ``weights`` [B, H, T, T] (rows sum to 1)
    on a grid x grid patch layout, each averaged over samples, heads and queries (float64 scalars)."""
    w = weights.double()
    n = w.shape[-1]
    entropy = -(w * w.clamp_min(1e-30).log()).sum(-1) / math.log(n) if n > 1 else torch.zeros(w.shape[:-1])
    distance = (w * _patch_distances(grid, w.device)).sum(-1)
    return entropy.mean(), distance.mean()


@contextmanager
def capture_attention_locality(model: nn.Module, store: list[tuple[torch.Tensor, torch.Tensor]]):
    """Append ``attention_locality`` of every block's attention, in block order, during the forwards inside."""
    grid = model.cfg.image_size // model.cfg.patch_size

    def hook(module, args):
        with torch.no_grad():
            store.append(attention_locality(module.attention_weights(args[0]), grid))

    handles = [block.attn.register_forward_pre_hook(hook) for block in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _capture_sublayer_inputs(model: nn.Module, store: list[torch.Tensor]):
    """Replace each sublayer's input by an alias (h.view_as(h)) that only f_l consumes, and collect the aliases:
    the gradient at the alias is dL/d(input of f_l), without the residual pass-through."""
    def pre_hook(module, args):
        alias = args[0].view_as(args[0])
        store.append(alias)
        return (alias, *args[1:])

    handles = [m.register_forward_pre_hook(pre_hook) for m in _input_norms(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _loss_fn(model: nn.Module, path, x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None,
             t: torch.Tensor) -> Callable[[bool], tuple[torch.Tensor, object]]:
    """A closure ``run(internals) -> (per-sample MSE [B], ModelInternals or None)`` of the model's training
    objective at (x0, eps, t) (the per-sample form of ``dmd_dar.diffusion.objective.denoising_loss``)."""
    x_t = path.add_noise(x0, eps, t).to(x0.dtype)
    target = path.training_target(x0, eps, t).float()

    def run(internals: bool):
        out = model(x_t, t, y, return_internals=internals)
        pred, inner = out if internals else (out, None)
        pred = pred[:, :target.shape[1]]  # learn_sigma models: the first C channels are the prediction (DiT)
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)  # [B]
        return per_sample, inner

    return run


def timestep_diagnostics(model: nn.Module, path, x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None,
                         t: float, *, total: int | None = None, counterfactual: bool = True,
                         source_map: bool = True) -> dict[str, torch.Tensor]:
    """All statistics of one batch at one timestep ``t``.

    ``total`` is the number of samples the loss is averaged over (default: this batch), so several batches can
    be merged into the statistics of one mean loss (see :func:`diagnose_model`). Returns float64 tensors:
    per-token means (``rms``, ``grad_rms``, ``cos``, ``weights``, ``entropy``) for this batch, the batch's
    contribution to sums over samples (``gate_grad``, ``source_importance``), its mean ``loss`` and ``gate_drop``.
    """
    b = x0.shape[0]
    total = b if total is None else total
    tt = torch.full((b,), float(t), device=x0.device, dtype=x0.dtype)
    run = _loss_fn(model, path, x0, eps, y, tt)
    residual = not model.cfg.routing.is_dar
    aliases: list[torch.Tensor] = []
    locality: list[tuple[torch.Tensor, torch.Tensor]] = []
    was_training = model.training
    model.eval()  # no label dropout
    try:
        with _no_checkpointing(model), torch.enable_grad():
            ctx = _capture_sublayer_inputs(model, aliases) if (residual and source_map) else _null()
            with ctx, capture_attention_locality(model, locality):
                per_sample, inner = run(True)
            loss = per_sample.sum() / total  # this batch's share of the mean over `total` samples
            zs = inner.block_outputs()
            vs = inner.outputs
            wrt = list(zs) + list(vs) + aliases
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        gz, gv, ga = grads[:len(zs)], grads[len(zs):len(zs) + len(vs)], grads[len(zs) + len(vs):]
        zero = torch.zeros((), dtype=torch.float64)
        out: dict[str, torch.Tensor] = {
            "loss": per_sample.detach().double().mean(),
            "rms": torch.stack([per_token_rms(z) for z in zs]),
            "grad_rms": torch.stack([zero if g is None else per_token_rms(g) for g in gz]),
            "cos": torch.stack([token_cosine(zs[k], zs[k + 1]) for k in range(len(zs) - 1)])
            if len(zs) > 1 else torch.zeros(0, dtype=torch.float64),
            "gate_grad": torch.stack([zero if g is None else (g.double() * v.detach().double()).sum()
                                      for g, v in zip(gv, vs)]),
            "attn_entropy": torch.stack([e for e, _ in locality]).cpu(),
            "attn_distance": torch.stack([d for _, d in locality]).cpu(),
        }
        if y is not None and model.cfg.num_classes > 0:  # per-class sums; diagnose_model divides by the counts
            onehot = torch.nn.functional.one_hot(y, model.cfg.num_classes).double()  # [B, C]
            out["class_loss_sum"] = (onehot * per_sample.detach().double()[:, None]).sum(0).cpu()
            out["class_count"] = onehot.sum(0).cpu()
        num_l = len(vs)
        if residual and source_map:
            srcs = [inner.v0.detach().double()] + [v.detach().double() for v in vs]
            imp = torch.full((num_l, num_l + 1), math.nan, dtype=torch.float64)
            for l in range(1, num_l + 1):
                g = ga[l - 1].double()
                for i in range(l):
                    imp[l - 1, i] = (g * srcs[i]).sum()
            out["source_importance"] = imp
        if inner.weights is not None:
            w = torch.full((num_l + 1, num_l + 1), math.nan, dtype=torch.float64)
            ent = torch.empty(num_l + 1, dtype=torch.float64)
            for a, alpha in enumerate(inner.weights):  # a = sublayer index - 1; a = L is the final aggregator
                idx = source_indices(a + 1, num_l, model.cfg.routing.chunk_size)
                w[a, idx] = alpha.double().mean(dim=(1, 2))
                ent[a] = routing_entropy(alpha.double()).mean()
            out["weights"], out["entropy"] = w, ent
        if counterfactual:
            base = out["loss"]
            drops = []
            with torch.no_grad():
                for l in range(1, num_l + 1):
                    with dropped_sublayer(model, l):
                        drops.append(run(False)[0].double().mean() - base)
            out["gate_drop"] = torch.stack(drops)
    finally:
        model.train(was_training)
    return out


@contextmanager
def _null():
    yield


# Statistics that are means per sample/token (merge: weighted by batch size) vs sums over samples (merge: add).
_SUMMED = ("gate_grad", "source_importance", "class_loss_sum", "class_count")


def diagnose_model(model: nn.Module, path, x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None,
                   t_grid: Sequence[float], *, batch_size: int = 64, counterfactual: bool = True,
                   source_map: bool = True, progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """Statistics over ``t_grid`` for N samples (x0, eps, y), processed in batches; each entry is stacked over t
    (first dim = len(t_grid)). The gradients are those of one mean loss over all N samples."""
    n = x0.shape[0]
    per_t: list[dict[str, torch.Tensor]] = []
    steps = [(ti, s) for ti in range(len(t_grid)) for s in range(0, n, batch_size)]
    it = progress(steps) if progress is not None else steps
    acc: dict[str, torch.Tensor] = {}
    for ti, s in it:
        sl = slice(s, s + batch_size)
        part = timestep_diagnostics(model, path, x0[sl], eps[sl], None if y is None else y[sl], float(t_grid[ti]),
                                    total=n, counterfactual=counterfactual, source_map=source_map)
        frac = x0[sl].shape[0] / n
        for k, v in part.items():
            contrib = v if k in _SUMMED else v * frac
            acc[k] = contrib if k not in acc else acc[k] + contrib
        if s + batch_size >= n:
            per_t.append(acc)
            acc = {}
    out = {k: torch.stack([d[k] for d in per_t]) for k in per_t[0]}
    out["grad_rms_per_sample"] = out["grad_rms"] * n
    if "class_loss_sum" in out:
        count = out.pop("class_count")
        total = out.pop("class_loss_sum")
        out["class_loss"] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
    out["attn_distance_uniform"] = torch.tensor(uniform_attention_distance(model.cfg.image_size
                                                                           // model.cfg.patch_size))
    out["t"] = torch.tensor([float(t) for t in t_grid], dtype=torch.float64)
    return out

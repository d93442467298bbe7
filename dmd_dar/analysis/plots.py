"""PNG plots of routing diagnostics (matplotlib, Agg backend): heatmaps over depth x t (and class x t), line plots
over depth, and per-t [aggregator x source] routing maps. Input: the dict of :func:`dmd_dar.analysis.diagnostics.diagnose_model`
(tensors or nested lists)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    # lazy: matplotlib takes ~1 s to import; only writing plots needs it
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _t_labels(t: np.ndarray) -> list[str]:
    return [f"{v:.2f}" for v in t]


def heatmap(values: np.ndarray, path: Path, *, title: str, ylabel: str, yticks: list[str], xticks: list[str],
            xlabel: str = "t (1 = noise)", log: bool = False, diverging: bool = False, cbar: str = "") -> Path:
    """values [rows, cols] -> PNG; rows are drawn top = first. NaN cells are blank."""
    plt = _plt()
    # lazy: as in _plt()
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    v = np.array(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * v.shape[1] + 2.5), max(3.0, 0.3 * v.shape[0] + 1.5)))
    norm, cmap = None, "viridis"
    finite = v[np.isfinite(v)]
    if log and finite.size and (finite > 0).any():
        pos = finite[finite > 0]
        v = np.where(v > 0, v, np.nan)
        norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * (1 + 1e-9)))
    elif diverging and finite.size:
        lim = max(float(np.abs(finite).max()), 1e-30)
        norm, cmap = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim), "RdBu_r"
    im = ax.imshow(v, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_xticks(range(len(xticks)), xticks, rotation=90 if len(xticks) > 8 else 0, fontsize=7)
    step = max(1, len(yticks) // 30)
    ax.set_yticks(range(0, len(yticks), step), yticks[::step], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def depth_lines(res: dict[str, Any], path: Path, title: str = "") -> Path:
    """Three panels over depth (one line per t): RMS(z_k), RMS(dL/dz_k) (log y), cos(z_k, z_k+1)."""
    plt = _plt()
    t = _np(res["t"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    cmap = plt.get_cmap("plasma")
    for key, ax, name, log in (("rms", axes[0], "forward RMS(z_k)", True),
                               ("grad_rms", axes[1], "gradient RMS(dL/dz_k)", True),
                               ("cos", axes[2], "cos(z_k, z_k+1)", False)):
        v = _np(res[key])  # [n_t, K]
        for i, tv in enumerate(t):
            ax.plot(np.arange(1, v.shape[1] + 1), v[i], color=cmap(i / max(1, len(t) - 1)), lw=1.2,
                    label=f"t={tv:.2f}")
        if log and (v > 0).any():
            ax.set_yscale("log")
        ax.set_xlabel("block k")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_t_maps(maps: np.ndarray, t: np.ndarray, path: Path, *, title: str, ylabel: str, xlabel: str,
               diverging: bool = False, normalise_rows: bool = False) -> Path:
    """A grid of [rows x cols] heatmaps, one per t (routing weights, or source importance)."""
    plt = _plt()
    # lazy: as in _plt()
    from matplotlib.colors import TwoSlopeNorm

    m = np.array(maps, dtype=np.float64)
    if normalise_rows:  # I / max_i |I| per target, so shallow and deep targets share a colour scale
        den = np.nanmax(np.abs(m), axis=-1, keepdims=True)
        m = m / np.where(np.isfinite(den) & (den > 0), den, 1.0)
    n = len(t)
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols + 1, 2.7 * rows + 0.6), squeeze=False,
                             layout="constrained")
    finite = m[np.isfinite(m)]
    if diverging:
        lim = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-30)
        kw: dict[str, Any] = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)}
    else:
        kw = {"cmap": "magma", "vmin": 0.0, "vmax": float(finite.max()) if finite.size else 1.0}
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        r, c = m[k].shape  # rows are 1-indexed (sublayer / aggregator l), columns 0-indexed (source v_i)
        im = ax.imshow(m[k], aspect="auto", interpolation="nearest", extent=(-0.5, c - 0.5, r + 0.5, 0.5), **kw)
        ax.set_title(f"t = {t[k]:.2f}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(res: dict[str, Any], out_dir: str | Path, name: str = "",
             class_names: list[str] | None = None) -> list[Path]:
    """Every plot for one model's diagnostics; returns the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = _np(res["t"])
    tx = _t_labels(t)
    pre = f"{name}: " if name else ""
    files = [depth_lines(res, out / "depth_lines.png", title=f"{pre}diagnostics over depth")]
    depth = _np(res["rms"]).shape[1]
    blocks = [str(k) for k in range(1, depth + 1)]
    files.append(heatmap(_np(res["rms"]).T, out / "heatmap_rms.png", title=f"{pre}forward RMS(z_k)",
                         ylabel="block k", yticks=blocks, xticks=tx, log=True))
    files.append(heatmap(_np(res["grad_rms"]).T, out / "heatmap_grad_rms.png",
                         title=f"{pre}gradient RMS(dL/dz_k), mean loss", ylabel="block k", yticks=blocks, xticks=tx,
                         log=True))
    files.append(heatmap(_np(res["cos"]).T, out / "heatmap_cos.png", title=f"{pre}cos(z_k, z_k+1)",
                         ylabel="block k", yticks=blocks[:-1], xticks=tx))
    if "attn_entropy" in res:
        files.append(heatmap(_np(res["attn_entropy"]).T, out / "heatmap_attention_entropy.png",
                             title=f"{pre}attention entropy (1 = uniform)", ylabel="block k",
                             yticks=blocks, xticks=tx))
        uniform = float(_np(res["attn_distance_uniform"]))
        files.append(heatmap(_np(res["attn_distance"]).T, out / "heatmap_attention_distance.png",
                             title=f"{pre}attention distance, patches\n(uniform attention: {uniform:.2f})",
                             ylabel="block k", yticks=blocks, xticks=tx))
    if "class_loss" in res:
        loss = _np(res["class_loss"]).T  # [classes, t]
        names = list(class_names) if class_names and len(class_names) == loss.shape[0] else \
            [str(c) for c in range(loss.shape[0])]
        files.append(heatmap(loss, out / "heatmap_class_loss.png", title=f"{pre}denoising loss per class",
                             ylabel="class", yticks=names, xticks=tx, log=True))
    num_l = _np(res["gate_grad"]).shape[1]
    subl = [f"{l} {'attn' if l % 2 else 'mlp'}" for l in range(1, num_l + 1)]
    if "gate_drop" in res:
        files.append(heatmap(_np(res["gate_drop"]).T, out / "heatmap_gate_drop.png",
                             title=f"{pre}loss change when sublayer output is dropped", ylabel="sublayer l",
                             yticks=subl, xticks=tx, diverging=True, cbar="L(v_l=0) - L"))
    files.append(heatmap(_np(res["gate_grad"]).T, out / "heatmap_gate_grad.png",
                         title=f"{pre}dL/dg_l (scalar gate on v_l, at g=1)", ylabel="sublayer l", yticks=subl,
                         xticks=tx, diverging=True))
    if "entropy" in res:
        aggs = subl + ["final"]
        files.append(heatmap(_np(res["entropy"]).T, out / "heatmap_entropy.png",
                             title=f"{pre}DAR routing entropy (1 = uniform)", ylabel="aggregator", yticks=aggs,
                             xticks=tx))
        files.append(per_t_maps(_np(res["weights"]), t, out / "routing_weights.png",
                                title=f"{pre}mean DAR routing weight [aggregator x source v_i]",
                                ylabel="aggregator l (L+1 = final)", xlabel="source v_i"))
    if "source_importance" in res:
        files.append(per_t_maps(_np(res["source_importance"]), t, out / "source_importance.png",
                                title=f"{pre}residual source importance dL/dg(i->l), / max_i |.| per target",
                                ylabel="target sublayer l", xlabel="source v_i", diverging=True,
                                normalise_rows=True))
    return files

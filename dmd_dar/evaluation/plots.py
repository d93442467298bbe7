"""Report plots (matplotlib, Agg backend): RAPSD overlay, spectral gap curves, HF gap per class.

Each function takes the :class:`~dmd_dar.evaluation.results.Evaluation` of ``dmd-dar eval`` and returns PNG
bytes (or None when the data is not there), so the HTML can embed them and the caller can write them next to it.
"""

from __future__ import annotations

import io
import math
from types import ModuleType

from dmd_dar.evaluation.results import Evaluation


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display), imported on first use."""
    # lazy: matplotlib takes ~0.5 s to import and only a report needs it (not `dmd-dar --help`, not the metrics)
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """A figure as PNG bytes (110 dpi, tight); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and y > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def _frequency_axes(fig, ax, cutoff: float, ylabel: str, title: str) -> bytes:
    """The common frame of a plot over radial frequency (the HF cutoff dotted), as PNG bytes."""
    ax.axvline(cutoff, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("radial frequency rho (fraction of Nyquist)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return figure_png(fig)


def rapsd_plot(result: Evaluation) -> bytes | None:
    """Mean radial spectra of every set, log-log; the reference dashed black."""
    sets = {n: e for n, e in result.sets.items() if e.spectral is not None}
    if not sets:
        return None
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for name, e in sets.items():
        x, y = _finite(e.spectral.rho, e.spectral.mean_rapsd)
        ref = e.role == "reference"
        ax.loglog(x, y, "k--" if ref else "-", lw=2.2 if ref else 1.4, label=f"{name} (n={e.n})")
    return _frequency_axes(fig, ax, result.hf_cutoff, "mean RAPSD (luma, [0,1] scale)",
                           "Radially averaged power spectra")


def gap_plot(result: Evaluation) -> bytes | None:
    """Per-bin spectral gap in dB of each comparison (0 = same energy as its reference)."""
    comps = [c for c in result.comparisons if c.spectral is not None]
    if not comps:
        return None
    rho = next(e.spectral.rho for e in result.sets.values() if e.spectral is not None)
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for c in comps:
        pts = [(x, y) for x, y in zip(rho, c.spectral.gap_db_curve) if y is not None and math.isfinite(y)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c.name, lw=1.4,
                ls="-" if c.kind == "reference" else "--")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    return _frequency_axes(fig, ax, result.hf_cutoff, "gap 10 log10(P_samples / P_ref) [dB]",
                           "Spectral gap (negative = missing energy)")


def hf_gap_per_group_plot(result: Evaluation, max_groups: int = 24) -> bytes | None:
    """HF gap (dB) per class / prompt for each comparison, with its bootstrap CI as error bars."""
    comps = [c for c in result.comparisons if c.spectral is not None and c.spectral.per_group_hf_gap_db]
    if not comps:
        return None
    groups: list[str] = []
    for c in comps:
        groups += [g for g in c.spectral.per_group_hf_gap_db if g not in groups]
    groups = groups[:max_groups]
    width = 0.8 / len(comps)
    fig, ax = pyplot().subplots(figsize=(max(6.4, 0.55 * len(groups) * max(1, len(comps) / 2)), 4.2))
    for k, c in enumerate(comps):
        per = c.spectral.per_group_hf_gap_db
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            if g not in per or not math.isfinite(per[g].gap.estimate):
                continue
            d = per[g].gap
            xs.append(i + (k - (len(comps) - 1) / 2) * width)
            ys.append(d.estimate)
            # A percentile interval need not contain the estimate (few images per group): matplotlib refuses a
            # negative error bar, so such a side is drawn as none.
            lo.append(max(0.0, d.estimate - d.low) if math.isfinite(d.low) else 0.0)
            hi.append(max(0.0, d.high - d.estimate) if math.isfinite(d.high) else 0.0)
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=c.name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g if len(g) <= 24 else g[:22] + ".." for g in groups], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("HF gap [dB] (rho >= cutoff)")
    ax.set_title("High-frequency gap per class / prompt (95% bootstrap CI)")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=8)
    return figure_png(fig)


PLOTS = {"rapsd.png": rapsd_plot, "gap_db.png": gap_plot, "hf_gap_per_group.png": hf_gap_per_group_plot}

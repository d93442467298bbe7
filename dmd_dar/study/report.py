"""The study's outputs: ``results.json`` (every number), ``results.md`` (table, command, reading), ``report.html``
(tables, spectra overlays, health curves side by side, sample grids, FD vs iterations) and the plot PNGs."""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dmd_dar.data.manifest import read_manifest
from dmd_dar.evaluation.plots import figure_png, pyplot
from dmd_dar.evaluation.report import ci_cell, fmt, png_bytes
from dmd_dar.evaluation.results import Evaluation, from_json
from dmd_dar.metrics.bootstrap import Interval
from dmd_dar.study import aggregate as A
from dmd_dar.study.config import StudyConfig, StudySuite
from dmd_dar.study.pretraining import read_points, stages
from dmd_dar.utils.io import atomic_write, atomic_write_json, atomic_write_text

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.na{color:#888}
h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:30px}img.grid{image-rendering:pixelated}
figure{display:inline-block;margin:4px 10px 10px 0;vertical-align:top}figcaption{font-size:12px;text-align:center}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}li{margin:3px 0}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str, cls: str = "") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(r) + "</tr>" for r in rows) + "</tbody></table>"


def _label(suite: StudySuite, name: str, pre: bool = False) -> str:
    vs = suite.pretraining.variants if pre else suite.distill.variants
    v = next((v for v in vs if v.name == name), None)
    return (v.label or v.name) if v is not None else name


# ----------------------------------------------------------------------------------------------- collect


def collect_detail(suite: StudySuite, runs, metric_files: dict[str, Path]) -> dict[str, Any]:
    """Per (variant, student steps): metrics over seeds, per-class metrics over seeds, health; teacher/data rows."""
    conf = suite.confidence
    d = suite.distill
    loaded = {n: Evaluation.load(p) for n, p in metric_files.items()}
    rows, per_class, health = [], [], {}
    for k in d.student_steps:
        for v in d.variants:
            rs = [r for r in runs if r.variant.name == v.name and r.student_steps == k]
            ex = [A.extract(loaded[r.name], r.name) if r.name in loaded else None for r in rs]
            cells = {m: A.over_seeds([e[m] if e else None for e in ex], conf, [r.seed for r in rs]) for m in A.METRICS}
            hs = [A.read_health(r.run_dir, d.health.keys, d.health.blowup_factor, d.health.drift_factor) for r in rs]
            for r, h in zip(rs, hs):
                health[r.name] = h
            rows.append({"variant": v.name, "label": v.label or v.name, "student_steps": k, "seeds": [r.seed for r in rs],
                         "evaluated": [r.seed for r in rs if r.name in loaded], "metrics": cells,
                         "diverged": sum(h["diverged"] for h in hs), "stopped": sum(h["stopped"] for h in hs),
                         "flagged": sum(bool(h["flags"]) for h in hs),
                         "runs": {r.name: str(r.run_dir) for r in rs}})
            pcs = [A.extract_per_class(loaded[r.name], r.name) for r in rs if r.name in loaded]
            groups = list(dict.fromkeys(g for pc in pcs for g in pc))
            per_class.append({"variant": v.name, "student_steps": k, "classes": {
                g: {m: A.over_seeds([pc.get(g, {}).get(m) for pc in pcs], conf)
                    for m in ("hf_gap_db_vs_teacher", "hf_gap_db_vs_data", "hf_ratio")} for g in groups}})
    anchors = A.anchors(next(iter(loaded.values())), suite.eval.teacher.name) if loaded else {}
    reading = detail_reading(suite, rows, health)
    # Which perceptual distance filled the "LPIPS" columns (ST-LPIPS when the standard AlexNet trunk is absent).
    lpips_used = next((m.protocol.get("models", {}).get("lpips") for m in loaded.values()), None)
    return {"rows": rows, "per_class": per_class, "anchors": anchors, "reading": reading, "lpips_model": lpips_used,
            "health": {n: {k: v for k, v in h.items() if k != "curves"} for n, h in health.items()},
            "_curves": {n: h["curves"] for n, h in health.items()}}


def detail_reading(suite: StudySuite, rows: list[dict[str, Any]], health: dict[str, Any]) -> dict[str, Any]:
    d = suite.distill
    out: dict[str, Any] = {"rule": "a variant differs from the baseline when the paired interval of the per-seed "
                                   "differences excludes 0 (one seed: when the two bootstrap intervals do not "
                                   "overlap); the claim verdicts also correct the paired t-tests on HF gap vs "
                                   "teacher for multiple comparisons (Holm-Bonferroni over every variant and "
                                   "step count)", "by_steps": {}}
    for k in d.student_steps:
        base = next(r for r in rows if r.get("variant") == d.baseline and r["student_steps"] == k)
        entries = []
        for r in rows:
            if r["student_steps"] != k or r["variant"] == d.baseline:
                continue
            cmps = []
            for key in suite.eval.key_metrics:
                a, b = r["metrics"].get(key), base["metrics"].get(key)
                if a is not None and b is not None:
                    cmps.append(A.compare_cells(key, a, b, r["label"], base["label"], suite.confidence))
            entries.append({"variant": r["variant"], "label": r["label"], "comparisons": cmps})
        div = [f"{r['label']} in {r['diverged']}/{len(r['seeds'])} seeds" for r in rows
               if r["student_steps"] == k and r["diverged"]]
        text = ("diverged (non-finite losses): " + "; ".join(div)) if div else \
            "no variant diverged (no non-finite losses or skipped steps)"
        flagged = [f"{r['label']}: " + ", ".join(f for n in r["runs"] for f in health[n]["flags"])
                   for r in rows if r["student_steps"] == k and r["flagged"]]
        if flagged:
            text += "; warning flags: " + "; ".join(flagged)
        out["by_steps"][str(k)] = {"baseline": base["label"], "variants": entries, "health": text}
    # The claim is tested once per variant and step count: correct that family before any verdict is read.
    entries = [e for block in out["by_steps"].values() for e in block["variants"]]
    claims = [next((c for c in e["comparisons"] if c["metric"] == "hf_gap_db_vs_teacher"), None) for e in entries]
    tested = [c for c in claims if c is not None and c["paired"] is not None]
    p_values = [c["paired"]["p_value"] for c in tested]
    family = sum(math.isfinite(p) for p in p_values)
    for c, p_holm in zip(tested, A.holm_adjust(p_values)):
        c["p_holm"], c["family_size"] = p_holm, family
    for e in entries:
        e["claim"] = A.claim_verdict(e["comparisons"], alpha=1 - suite.confidence)
    return out


def _fd_point(point: dict[str, Any] | None) -> Interval | None:
    """The FD interval of one point of a pretraining run's ``fd.json`` (None: not measured, or diverged)."""
    fd = (point or {}).get("fd")
    return from_json(Interval, fd, "fd.json point") if fd is not None else None


def _fd_estimate(point: dict[str, Any] | None) -> float | None:
    fd = _fd_point(point)
    return fd.estimate if fd is not None else None


def collect_pretraining(suite: StudySuite, pre_runs) -> dict[str, Any]:
    p = suite.pretraining
    steps = stages(suite)
    curves: dict[str, Any] = {}
    for v in p.variants:
        pts = {r.seed: read_points(r) for r in pre_runs if r.variant.name == v.name}
        per_step = {}
        for s in steps:
            cis = [A.headline_ci(_fd_point(pts[seed].get(s))) for seed in pts]
            per_step[str(s)] = A.over_seeds(cis, suite.confidence, list(pts))
        failed = {str(r.seed): json.loads((r.run_dir / "failed.json").read_text())["error"]
                  for r in pre_runs if r.variant.name == v.name and (r.run_dir / "failed.json").is_file()}
        curves[v.name] = {"label": v.label or v.name, "fd": per_step, "diverged_seeds": failed,
                          "per_seed": {str(seed): {str(s): _fd_estimate(pt.get(s)) for s in steps}
                                       for seed, pt in pts.items()}}
    return {"steps": steps, "curves": curves, "reading": pretraining_reading(suite, curves, steps),
            "feature_space": "in-domain CLIP (eval suite clip settings)"}


def pretraining_reading(suite: StudySuite, curves: dict[str, Any], steps: list[int]) -> list[str]:
    p = suite.pretraining
    base = curves.get(p.baseline)
    if base is None:
        return []
    last = str(steps[-1])
    lines = []
    b_last = base["fd"].get(last)
    for c in curves.values():
        if c["diverged_seeds"]:
            lines.append(f"{c['label']} diverged in {len(c['diverged_seeds'])}/{len(p.seeds)} seeds "
                         f"(seeds {', '.join(c['diverged_seeds'])}: non-finite loss)")
    for name, c in curves.items():
        if name == p.baseline:
            continue
        a_last = c["fd"].get(last)
        if a_last is None or b_last is None:
            lines.append(f"{c['label']}: no FD at {last} iterations")
            continue
        same, paired, _ = A.no_difference(a_last, b_last, suite.confidence)  # same seed: same data and noise
        cmp = "no significant difference" if same else (
            "lower (better)" if a_last["estimate"] < b_last["estimate"] else "higher (worse)")
        if paired:
            cmp += (f" (paired difference {paired['estimate']:+.3g} [{A._fmt(paired['low'])}, "
                    f"{A._fmt(paired['high'])}] over {paired['n']} seeds)")
        line = (f"{c['label']} at {last} it: FD {A._fmt(a_last['estimate'])} [{A._fmt(a_last['low'])}, "
                f"{A._fmt(a_last['high'])}] vs {base['label']} {A._fmt(b_last['estimate'])} "
                f"[{A._fmt(b_last['low'])}, {A._fmt(b_last['high'])}]: {cmp}")
        reach = _iterations_to_reach(c, b_last["estimate"], steps)
        if reach is not None and reach <= steps[0]:
            line += f"; already at or below {base['label']}'s final mean FD at the first point ({steps[0]} it)"
        elif reach is not None and reach >= int(last):
            line += f"; reaches {base['label']}'s final mean FD only at the last point"
        elif reach is not None:
            line += (f"; reaches {base['label']}'s final mean FD at ~{reach:.0f} it (mean curves, linear "
                     f"interpolation: {int(last) / reach:.2g}x fewer iterations)")
        else:
            line += f"; does not reach {base['label']}'s final mean FD within {last} it"
        lines.append(line)
    return lines


def _iterations_to_reach(curve: dict[str, Any], target: float, steps: list[int]) -> float | None:
    xs = [s for s in steps if curve["fd"].get(str(s))]
    ys = [curve["fd"][str(s)]["estimate"] for s in xs]
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y)) if y0 != y else float(x)
    return None


# ----------------------------------------------------------------------------------------------- plots


def _arr(xs) -> np.ndarray:
    """A JSON curve (None where a bin was empty) as floats with NaN."""
    return np.array([np.nan if x is None else float(x) for x in xs], dtype=np.float64)


def _plot_finite(ax, x: np.ndarray, y: np.ndarray, *args, positive: bool = False, **kw):
    ok = np.isfinite(y) & ((y > 0) if positive else True)
    return ax.plot(x[ok], y[ok], *args, **kw)[0]


def spectra_plot(suite: StudySuite, runs, metric_files: dict[str, Path], k: int) -> bytes | None:
    """Mean RAPSD of the teacher, the data and every variant (mean over seeds), plus gap-to-teacher curves."""
    plt = pyplot()
    loaded = {r.name: Evaluation.load(metric_files[r.name]) for r in runs
              if r.student_steps == k and r.name in metric_files}
    if not loaded:
        return None
    first = next(iter(loaded.values()))
    t = suite.eval.teacher.name
    spectra = {n: e.spectral for n, e in first.sets.items() if e.spectral is not None}
    if t not in spectra:
        return None
    rho = _arr(spectra[t].rho)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for name, style in ((t, "k-"), ("reference", "k--")):
        if name in spectra:
            _plot_finite(ax, rho, _arr(spectra[name].mean_rapsd), style, lw=2, positive=True,
                         label="data (held-out)" if name == "reference" else f"teacher ({t})")
    t_curve = _arr(spectra[t].mean_rapsd)
    for v in suite.distill.variants:
        curves = [_arr(m.sets[r.name].spectral.mean_rapsd)
                  for r in runs if r.variant.name == v.name and r.student_steps == k and (m := loaded.get(r.name))]
        if not curves:
            continue
        line = _plot_finite(ax, rho, np.mean(curves, axis=0), lw=1.4, positive=True,
                            label=f"{v.label or v.name} (n={len(curves)} seeds)")
        with np.errstate(divide="ignore", invalid="ignore"):
            gaps = [10 * np.log10(c / t_curve) for c in curves]
        _plot_finite(ax2, rho, np.mean(gaps, axis=0), color=line.get_color(), lw=1.4, label=v.label or v.name)
        for g in gaps if len(gaps) > 1 else []:
            _plot_finite(ax2, rho, g, color=line.get_color(), lw=0.5, alpha=0.4)
    c = first.hf_cutoff
    for a in (ax, ax2):
        a.axvline(c, color="0.6", lw=0.8, ls=":")
        a.grid(True, which="both", alpha=0.25)
        a.set_xlabel("radial frequency rho (fraction of Nyquist)")
    ax.set_ylabel("mean RAPSD")
    ax.set_title(f"{k}-step students: spectra")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel("gap to teacher (dB); thin lines: seeds")
    ax2.set_title(f"{k}-step students: spectral gap vs teacher")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def health_plot(suite: StudySuite, runs, curves: dict[str, Any], k: int) -> bytes | None:
    """Training-health curves of every variant side by side: one panel per quantity, thin lines per seed."""
    plt = pyplot()
    keys = [key for key in suite.distill.health.keys
            if any(curves.get(r.name, {}).get(key) for r in runs if r.student_steps == k)]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, v in enumerate(suite.distill.variants):
            first = True
            for r in runs:
                if r.variant.name != v.name or r.student_steps != k or not curves.get(r.name, {}).get(key):
                    continue
                xy = np.asarray(curves[r.name][key], dtype=np.float64)
                ax.plot(xy[:, 0], xy[:, 1], color=colors[i % len(colors)], lw=1.0, alpha=0.8,
                        label=(v.label or v.name) if first else None)
                first = False
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.25)
        ys = np.array([y for r in runs for _, y in curves.get(r.name, {}).get(key, []) if r.student_steps == k])
        ys = ys[np.isfinite(ys)]
        if ys.size and ys.min() > 0 and ys.max() / ys.min() > 100:  # a blow-up is visible only on a log axis
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{k}-step students: training health (one line per seed)")
    fig.tight_layout()
    return figure_png(fig)


def fd_plot(pre: dict[str, Any]) -> bytes | None:
    plt = pyplot()
    if not pre["curves"]:
        return None
    if not any(c["fd"].get(str(s)) for c in pre["curves"].values() for s in pre["steps"]):
        return None  # every run diverged before its first point
    fig, ax = plt.subplots(figsize=(6.6, 4.3))
    for c in pre["curves"].values():
        xs = [s for s in pre["steps"] if c["fd"].get(str(s))]
        if not xs:
            continue
        ys = np.array([c["fd"][str(s)]["estimate"] for s in xs])
        lo = np.array([c["fd"][str(s)]["low"] for s in xs])
        hi = np.array([c["fd"][str(s)]["high"] for s in xs])
        line = ax.plot(xs, ys, "o-", lw=1.6, label=c["label"])[0]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        for per in c["per_seed"].values():
            px = [s for s in pre["steps"] if per.get(str(s)) is not None]
            ax.plot(px, [per[str(s)] for s in px], color=line.get_color(), lw=0.6, alpha=0.5)
    ax.set_xlabel("pretraining iteration")
    ax.set_ylabel("FD vs held-out data (in-domain CLIP)")
    ax.set_title("Teacher pretraining: FD vs iterations (band: interval over seeds)")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return figure_png(fig)


def sample_grid(folders: list[tuple[str, Path]], per_class: int) -> list[tuple[str, bytes]]:
    """One image per model: classes as rows, the first ``per_class`` seeds as columns, upscaled x2."""
    out = []
    for label, folder in folders:
        try:
            recs = read_manifest(folder)
        except Exception:  # a missing folder is simply not shown
            continue
        by_class: dict[Any, list[dict[str, Any]]] = {}
        for r in recs:
            by_class.setdefault(r.get("class_id"), []).append(r)
        rows = []
        for items in by_class.values():
            tiles = [np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in items[:per_class]]
            rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in tiles], 1))
        if not rows:
            continue
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        arr = np.concatenate(rows, 0).repeat(2, 0).repeat(2, 1)
        out.append((label, png_bytes(arr)))
    return out


# ----------------------------------------------------------------------------------------------- writers


def _cell_md(c: dict[str, Any] | None) -> str:
    if c is None:
        return "n/a"
    if c.get("n", 1) > 1 and "half_width" in c:
        return f"{fmt(c['estimate'])} ± {fmt(c['half_width'])}"
    return f"{fmt(c['estimate'])} [{fmt(c['low'])}, {fmt(c['high'])}]"


def _md_table(det: dict[str, Any], suite: StudySuite, cols: list[str]) -> list[str]:
    lines = ["| variant | student steps | seeds | " + " | ".join(A.METRICS[c][0] for c in cols) + " | diverged / flagged |",
             "|" + "---|" * (len(cols) + 4)]
    for r in det["rows"]:
        cells = [_cell_md(r["metrics"].get(c)) for c in cols]
        lines.append(f"| {r['label']} | {r['student_steps']} | {len(r['evaluated'])}/{len(r['seeds'])} | "
                     + " | ".join(cells) + f" | {r['diverged']} / {r['flagged']} of {len(r['seeds'])} |")
    anchors = det.get("anchors", {})
    for name, label in (("teacher", f"teacher ({suite.eval.teacher.name})"), ("data", "held-out data")):
        if name in anchors:
            a = anchors[name]
            lines.append(f"| {label} | — | — | " + " | ".join(_cell_md(a.get(c)) if c in a else "—" for c in cols)
                         + " | — |")
    return lines


def _routing_text(r: dict[str, Any]) -> str:
    if r["kind"] != "dar":
        return "residual"
    return f"DAR {r['query']} c{r['chunk_size']}"


def _md_recipes(recipes: dict[str, Any], suite: StudySuite) -> list[str]:
    """Each variant's routing and the shared DMD2 recipe, as resolved from the base config when the study ran."""
    if not recipes:
        return []
    lines = ["Variants (resolved from the base config at run time; every run's config.yaml has the rest):", ""]
    shared = None
    for name, by_k in recipes.items():
        r = next(iter(by_k.values()))
        lines.append(f"- {_label(suite, name)}: student {_routing_text(r['student_routing'])}, fake score "
                     f"{_routing_text(r['fake_routing'])}")
        shared = shared or r
    if shared:
        lines += ["", f"Recipe: {shared['steps']} iterations, batch {shared['batch_size']}, TTUR {shared['ttur']}, "
                  f"lr {shared['generator_lr']:g} / {shared['fake_lr']:g} (generator / fake score), guidance "
                  f"{shared['guidance_scale']:g}, regression weight {shared['regression_weight']:g}, GAN weight "
                  f"{shared['gan_weight']:g}."]
    return lines


def _md_lpips_note(lpips_model: Any) -> list[str]:
    """One line naming the perceptual distance behind the LPIPS columns (it may be ST-LPIPS offline)."""
    if not isinstance(lpips_model, dict):
        return []
    name = lpips_model.get("name") or lpips_model.get("model") or lpips_model.get("net")
    ran = (lpips_model.get("selection") or {}).get("ran")
    comparable = lpips_model.get("comparable_with_lpips", ran != "stlpips_alex")
    if not name and not ran:
        return []
    note = "" if comparable else " (not comparable with published LPIPS numbers)"
    return [f"LPIPS columns: {name or ran}{note}.", ""]


def write_results_md(suite: StudySuite, cfg: StudyConfig, out: Path, det: dict[str, Any] | None,
                     pre: dict[str, Any] | None, command: str, elapsed: float | None) -> Path:
    lines = [f"# Study: {suite.name}", "", suite.description.strip(), "", "Command (from the repository root):", "",
             "```", command, "```", ""]
    if elapsed is not None:
        lines += [f"Wall time of the last invocation: {elapsed / 60:.1f} min (finished runs are skipped on rerun).", ""]
    if det is not None:
        d = suite.distill
        cols = list(A.METRICS)
        lines += ["## Detail: DMD2 students vs the teacher's samples and vs the data", "",
                  f"Mean ± half-width of the {suite.confidence:.0%} Student-t interval over seeds (one seed: "
                  "`estimate [low, high]`, the run's bootstrap interval over images). Distill budget: "
                  f"{d.steps if d.steps is not None else 'base config'} iterations per run; seeds {list(d.seeds)}.",
                  "", *_md_table(det, suite, cols), "", *_md_lpips_note(det.get("lpips_model")),
                  *_md_recipes(det.get("recipes", {}), suite)]
        groups = list(dict.fromkeys(g for pc in det["per_class"] for g in pc["classes"]))
        if groups:
            lines += ["", f"Per class: {A.METRICS['hf_gap_db_vs_teacher'][0]} (same interval convention; the other "
                      "per-class metrics are in report.html and results.json):", "",
                      "| variant | student steps | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
            for pc in det["per_class"]:
                lines.append(f"| {_label(suite, pc['variant'])} | {pc['student_steps']} | " + " | ".join(
                    _cell_md((pc["classes"].get(g) or {}).get("hf_gap_db_vs_teacher")) for g in groups) + " |")
        lines += ["", "### Reading (automatic)", "", f"Rule: {det['reading']['rule']}.", ""]
        for k, block in det["reading"]["by_steps"].items():
            lines.append(f"**{k}-step students** (baseline: {block['baseline']}); health: {block['health']}.")
            lines.append("")
            for e in block["variants"]:
                lines.append(f"- **{e['label']}**: claim (DAR preserves HF detail): {e['claim']}.")
                lines += [f"  - {c['text']}" for c in e["comparisons"]]
            lines.append("")
    if pre is not None:
        p = suite.pretraining
        lines += ["## Teacher pretraining: FD vs iterations", "",
                  f"FD against the held-out data in the in-domain CLIP feature space, {p.fd_num_per_class} samples per "
                  f"class ({p.fd_sample_steps} Euler steps) per point; mean ± t interval over seeds {list(p.seeds)}. "
                  "Plot: `fd_vs_iterations.png`; numbers: `fd_vs_iterations.json`.", "",
                  "| variant | " + " | ".join(f"{s} it" for s in pre["steps"]) + " |",
                  "|---|" + "---|" * len(pre["steps"])]
        for c in pre["curves"].values():
            lines.append(f"| {c['label']} | " + " | ".join(_cell_md(c["fd"].get(str(s))) for s in pre["steps"]) + " |")
        lines += ["", *[f"- {x}" for x in pre["reading"]], ""]
    path = out / "results.md"
    atomic_write_text("\n".join(lines).rstrip() + "\n", path)
    return path


def write_html(suite: StudySuite, out: Path, det: dict[str, Any] | None, pre: dict[str, Any] | None, command: str,
               plots: dict[str, bytes], grids: dict[int, list[tuple[str, bytes]]]) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>study {_e(suite.name)}</title>"
             f"<style>{_CSS}</style></head><body><h1>Study: {_e(suite.name)}</h1><p>{_e(suite.description)}</p>"
             f"<pre>{_e(command)}</pre><p>Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}"
             "; every number is in results.json, per-run metrics under eval/runs/.</p>"]
    if det is not None:
        cols = list(A.METRICS)
        rows = []
        for r in det["rows"]:
            rows.append([f"<td>{_e(r['label'])}</td>", f"<td>{r['student_steps']}</td>",
                         f"<td>{len(r['evaluated'])}/{len(r['seeds'])}</td>",
                         *[ci_cell(r["metrics"].get(c)) for c in cols],
                         f"<td>{r['diverged']} / {r['flagged']} of {len(r['seeds'])}</td>"])
        for name, a in det.get("anchors", {}).items():
            rows.append([f"<td>{_e(name)}</td>", "<td>—</td>", "<td>—</td>",
                         *[ci_cell(a.get(c)) if c in a else '<td class="na">—</td>' for c in cols], "<td>—</td>"])
        parts += ["<h2>Table</h2><p>Mean and interval over seeds (Student t; one seed: bootstrap over images). "
                  "* marks an interval excluding 0.</p>",
                  _table(["variant", "student steps", "seeds", *[A.METRICS[c][0] for c in cols],
                          "diverged / flagged"], rows)]
        parts.append("<h2>Reading (automatic)</h2>")
        for k, block in det["reading"]["by_steps"].items():
            parts.append(f"<h3>{_e(k)}-step students (baseline {_e(block['baseline'])})</h3>"
                         f"<p>Health: {_e(block['health'])}</p><ul>")
            for e in block["variants"]:
                items = "".join(f"<li>{_e(c['text'])}</li>" for c in e["comparisons"])
                parts.append(f"<li><b>{_e(e['label'])}</b>: claim: {_e(e['claim'])}<ul>{items}</ul></li>")
            parts.append("</ul>")
        parts.append("<h2>Per class</h2>")
        groups = list(dict.fromkeys(g for pc in det["per_class"] for g in pc["classes"]))
        for metric in ("hf_gap_db_vs_teacher", "hf_gap_db_vs_data", "hf_ratio"):
            prow = [[f"<td>{_e(_label(suite, pc['variant']))}</td>", f"<td>{pc['student_steps']}</td>",
                     *[ci_cell((pc["classes"].get(g) or {}).get(metric)) for g in groups]] for pc in det["per_class"]]
            parts += [f"<h3>{_e(A.METRICS[metric][0])}</h3>", _table(["variant", "steps", *groups], prow)]
        for k in suite.distill.student_steps:
            for key, title in ((f"spectra_{k}step", "Spectra"), (f"health_{k}step", "Training health")):
                if key in plots:
                    parts.append(f"<h2>{title}: {k}-step students</h2>{_img(plots[key], key)}")
            if grids.get(k):
                parts.append(f"<h2>Samples: {k}-step students (seed 0 of each variant; rows = classes)</h2>")
                parts += [f"<figure>{_img(png, label, 'grid')}<figcaption>{_e(label)}</figcaption></figure>"
                          for label, png in grids[k]]
        hl = [[f"<td>{_e(n)}</td>", f"<td>{'yes' if h['diverged'] else 'no'}</td>", f"<td>{h['bad_steps_total']}</td>",
               f"<td>{_e(', '.join(h['flags']) or '—')}</td>",
               *[f'<td class="num">{fmt(h["final"].get(k))}</td>' for k in suite.distill.health.keys]]
              for n, h in det["health"].items()]
        parts += ["<h2>Health per run</h2>",
                  _table(["run", "diverged", "non-finite steps", "warning flags",
                          *[f"final {k}" for k in suite.distill.health.keys]], hl)]
    if pre is not None:
        parts.append("<h2>Teacher pretraining: FD vs iterations</h2>")
        if "fd_vs_iterations" in plots:
            parts.append(_img(plots["fd_vs_iterations"], "fd_vs_iterations"))
        prow = [[f"<td>{_e(c['label'])}</td>", *[ci_cell(c["fd"].get(str(s))) for s in pre["steps"]]]
                for c in pre["curves"].values()]
        parts += [_table(["variant", *[f"{s} it" for s in pre["steps"]]], prow),
                  "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in pre["reading"]) + "</ul>"]
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_text("".join(parts), path)
    return path


def write_study_outputs(suite: StudySuite, cfg: StudyConfig, out: Path, runs, metric_files: dict[str, Path],
                        pre_runs, teacher: Path | None, command: str, recipes: dict[str, Any] | None = None) -> Path:
    """Write ``results.json``, ``results.md``, ``report.html`` and the plots of a study; ``command`` is the
    command line that reproduces it (the runner's, passed in as text)."""
    plots: dict[str, bytes] = {}
    grids: dict[int, list[tuple[str, bytes]]] = {}
    det = pre = None
    if runs:
        det = collect_detail(suite, runs, metric_files)
        det["recipes"] = recipes or {}
        curves = det.pop("_curves")
        samples = out / "eval" / "samples"
        for k in suite.distill.student_steps:
            for key, png in ((f"spectra_{k}step", spectra_plot(suite, runs, metric_files, k)),
                             (f"health_{k}step", health_plot(suite, runs, curves, k))):
                if png is not None:
                    plots[key] = png
            seed0 = suite.distill.seeds[0]
            folders = [(f"teacher ({suite.eval.teacher.name})", samples / suite.eval.teacher.name),
                       ("held-out data", out / "eval" / "reference")]
            folders += [(r.variant.label or r.variant.name, samples / r.name) for r in runs
                        if r.student_steps == k and r.seed == seed0]
            grids[k] = sample_grid(folders, suite.eval.grid_per_class)
    if pre_runs:
        pre = collect_pretraining(suite, pre_runs)
        png = fd_plot(pre)
        if png is not None:
            plots["fd_vs_iterations"] = png
            atomic_write(out / "fd_vs_iterations.png", lambda tmp: Path(tmp).write_bytes(png))
        atomic_write_json({"steps": pre["steps"], "curves": pre["curves"], "reading": pre["reading"],
                           "confidence": suite.confidence}, out / "fd_vs_iterations.json")
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for key, png in plots.items():
        atomic_write(plot_dir / f"{key}.png", lambda tmp, b=png: Path(tmp).write_bytes(b))
    record = {}
    if (out / "study_run.json").is_file():
        record = json.loads((out / "study_run.json").read_text())
    # asdict, not OmegaConf: variant overrides may hold (escaped) interpolations meant for the run configs
    atomic_write_json({"format": "dmd_dar.study/1", "command": command, "suite": dataclasses.asdict(suite),
                       "teacher": str(teacher) if teacher else None, "detail": det, "pretraining": pre,
                       "elapsed_s": record.get("elapsed_s")}, out / "results.json")
    write_results_md(suite, cfg, out, det, pre, command, record.get("elapsed_s"))
    return write_html(suite, out, det, pre, command, plots, grids)

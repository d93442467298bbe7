"""A self-contained ``report.html`` from the :class:`~dmd_dar.evaluation.results.Evaluation` of ``dmd-dar eval``.

Everything is embedded (base64 PNG images and plots), so the file can be mailed or attached as is; the plots are
also written as PNG files next to it. Number cells carry their exact values in ``data-value`` (and ``data-low`` /
``data-high`` for intervals) so the report can be parsed back and checked against ``metrics.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dmd_dar.errors import UserError
from dmd_dar.evaluation.images import ImageSet
from dmd_dar.evaluation.plots import PLOTS
from dmd_dar.evaluation.results import (
    ClipScoreResult,
    Comparison,
    Diversity,
    Evaluation,
    Fidelity,
    Paired,
    Unavailable,
    headline,
)
from dmd_dar.metrics.bootstrap import Interval
from dmd_dar.utils.io import atomic_write, atomic_write_text

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.sig{color:#a00}.na{color:#888}img.grid{image-rendering:pixelated;max-width:100%}
.verdict{font-size:15px;margin:4px 0}pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:480px;font-size:12px}
h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:30px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def fmt(x: Any) -> str:
    """How numbers are shown: 4 significant digits."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def ci_cell(d: Interval | Unavailable | float | None) -> str:
    """A table cell for an interval ``estimate [low, high]`` (``*`` when it excludes 0), an unavailable metric,
    or a plain number; anything else (a metric that was not computed) is a dash."""
    if isinstance(d, Interval):
        sig = math.isfinite(d.low) and math.isfinite(d.high) and d.excludes(0.0)
        return (f'<td class="num" data-value="{d.estimate!r}" data-low="{d.low!r}" data-high="{d.high!r}">'
                f'{fmt(d.estimate)} [{fmt(d.low)}, {fmt(d.high)}]{" *" if sig else ""}</td>')
    if isinstance(d, Unavailable):
        return f'<td class="na" title="{_e(d.reason)}">unavailable: needs {_e(d.needs)}</td>'
    if isinstance(d, int | float) and not isinstance(d, bool):
        return f'<td class="num" data-value="{d!r}">{fmt(d)}</td>'
    return '<td class="na">—</td>'


def _table(header: list[str], rows: list[list[str]], caption: str = "", cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(x: Any) -> str:
    return f"<td>{_e(x)}</td>"


def _img_tag(png: bytes, alt: str, cls: str = "") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def png_bytes(arr: np.ndarray) -> bytes:
    """An ``[H, W, 3]`` uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _display(arr: np.ndarray, crop: int = 256, min_side: int = 96) -> np.ndarray:
    """Small images are enlarged (nearest, integer factor); large ones centre-cropped at native pixels."""
    h, w = arr.shape[:2]
    if max(h, w) > crop:
        t, l = (h - min(h, crop)) // 2, (w - min(w, crop)) // 2
        arr = arr[t:t + crop, l:l + crop]
    elif max(h, w) < min_side:
        k = math.ceil(min_side / max(h, w))
        arr = arr.repeat(k, 0).repeat(k, 1)
    return arr


def _grid(arrs: list[np.ndarray], pad: int = 2) -> np.ndarray:
    h, w = arrs[0].shape[:2]
    out = np.full((h, len(arrs) * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrs):
        out[:, i * (w + pad):i * (w + pad) + w] = a
    return out


def _grids_section(result: Evaluation, per_group: int, max_groups: int) -> str:
    sets = []
    for name, e in result.sets.items():
        try:
            sets.append(ImageSet(name, e.path))
        except UserError as err:  # the report must not fail because a folder moved since the evaluation
            return f'<p class="na">image grids skipped: {_e(err)}</p>'
    sets.sort(key=lambda s: result.sets[s.name].role != "reference")
    labels: list[str] = []
    for s in sets:
        labels += [g for g in s.group_indices() if g not in labels]
    rows = []
    cropped = False
    for g in (labels[:max_groups] if labels else [None]):
        cells = [_td(g if g is not None else "all")]
        for s in sets:
            idx = s.group_indices().get(g, [])[:per_group] if g is not None else list(range(min(len(s), 2 * per_group)))
            if not idx:
                cells.append('<td class="na">—</td>')
                continue
            x = s.load(idx)  # [n, 3, H, W] in [-1, 1]
            arrs = [((i.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for i in x]
            cropped |= max(arrs[0].shape[:2]) > 256
            cells.append(f"<td>{_img_tag(png_bytes(_grid([_display(a) for a in arrs])), f'{s.name} {g}', 'grid')}</td>")
        rows.append(cells)
    note = " Large images are shown as native-resolution centre crops." if cropped else ""
    more = f" (first {max_groups} of {len(labels)} groups)" if len(labels) > max_groups else ""
    return (f"<p>Up to {per_group} images per class / prompt from each set{more}.{note}</p>"
            + _table(["group", *[s.name for s in sets]], rows, cls="grids"))


def _spectral_table(result: Evaluation) -> str:
    sets = {n: e.spectral for n, e in result.sets.items() if e.spectral is not None}
    if not sets:
        return ""
    names = list(next(iter(sets.values())).scalars)
    rows = [[_td(n), _td(sp.n), *[ci_cell(sp.scalars[k]) for k in names]] for n, sp in sets.items()]
    return _table(["set", "n", *names], rows, "per-image spectral scalars: mean [95% CI]")


def _lpips_label(result: Evaluation) -> str:
    """"LPIPS" or "ST-LPIPS": the perceptual model that ran (their values are not comparable)."""
    for value in [*(c.lpips_fidelity for c in result.comparisons), *(e.lpips_diversity for e in result.sets.values())]:
        if isinstance(value, Fidelity | Diversity):
            return value.model.label
    return "LPIPS"


def _comparison_table(result: Evaluation) -> str:
    def spectral(c: Comparison, attr: str) -> Interval | Unavailable | None:
        return getattr(c.spectral, attr) if c.spectral is not None else None

    cols = [("HF gap dB", lambda c: spectral(c, "hf_gap_db")), ("LSD dB", lambda c: spectral(c, "lsd_db")),
            ("paired log HF ratio", lambda c: spectral(c, "paired_log_hf_ratio")),
            (f"{_lpips_label(result)} fidelity", lambda c: headline(c.lpips_fidelity)),
            ("CLIP cos diff (paired)", lambda c: c.clip_score_diff),
            ("FD", lambda c: headline(c.fd)), ("CMMD", lambda c: headline(c.cmmd))]
    rows = [[_td(c.name), _td(c.kind), _td(c.pairing.n if isinstance(c.pairing, Paired) else "no"),
             *[ci_cell(f(c)) for _, f in cols]] for c in result.comparisons]
    return _table(["comparison", "kind", "pairs", *[n for n, _ in cols]], rows,
                  "estimate [95% CI]; * = the CI excludes 0")


def _per_group_gap_table(result: Evaluation) -> str:
    comps = [c for c in result.comparisons if c.spectral is not None and c.spectral.per_group_hf_gap_db]
    if not comps:
        return "<p class='na'>no class / prompt labels in the manifests</p>"
    groups: list[str] = []
    for c in comps:
        groups += [g for g in c.spectral.per_group_hf_gap_db if g not in groups]
    rows = [[_td(g), *[ci_cell(c.spectral.per_group_hf_gap_db[g].gap if g in c.spectral.per_group_hf_gap_db
                               else None) for c in comps]] for g in groups]
    return _table(["group", *[c.name for c in comps]], rows, "HF gap in dB per class / prompt [95% CI]")


def _per_group_sets_table(result: Evaluation) -> str:
    key = f"hf_ratio@{result.hf_cutoff:g}"
    cols: list[tuple[str, dict[str, Any]]] = []
    for n, e in result.sets.items():
        if e.spectral is not None and e.spectral.per_group and key in e.spectral.per_group:
            cols.append((f"{n}: {key}", e.spectral.per_group[key]))
        cs = e.clip_score
        if isinstance(cs, ClipScoreResult) and cs.per_group:
            cols.append((f"{n}: CLIP cos", cs.per_group))
        if isinstance(cs, ClipScoreResult) and cs.top1 is not None and cs.top1.per_group:
            cols.append((f"{n}: CLIP top-1", cs.top1.per_group))
        if isinstance(e.lpips_diversity, Diversity):
            cols.append((f"{n}: {_lpips_label(result)} diversity", e.lpips_diversity.per_group))
    if not cols:
        return ""
    groups: list[str] = []
    for _, d in cols:
        groups += [g for g in d if g not in groups]
    rows = [[_td(g), *[ci_cell(d.get(g)) for _, d in cols]] for g in groups]
    return _table(["group", *[n for n, _ in cols]], rows, "per class / prompt breakdown")


def _set_metric_tables(result: Evaluation) -> str:
    rows = []
    for n, e in result.sets.items():
        cs, dv = e.clip_score, e.lpips_diversity
        top1 = cs.top1 if isinstance(cs, ClipScoreResult) else None
        rows.append([_td(n), ci_cell(headline(cs)), ci_cell(cs.x100 if isinstance(cs, ClipScoreResult) else None),
                     ci_cell(top1.accuracy) if top1 else _td(""),
                     _td(f"1/{top1.candidates}") if top1 else _td(""), ci_cell(headline(dv))])
    lp = _lpips_label(result)
    return _table(["set", "CLIP score (mean cos)", "CLIP score x100", "CLIP top-1 (own text closest)", "chance",
                   f"{lp} diversity"], rows, f"per-set CLIP score, CLIP top-1 and {lp} diversity [95% CI]")


def _bench_table(bench: dict[str, Any]) -> str:
    rows = [[_td(r.get("metric")), _td(r.get("impl")), _td(r.get("resolution")), _td(r.get("batch")),
             ci_cell(r.get("images_per_s")), _td(r.get("note", ""))] for r in bench.get("results", [])]
    env = {k: v for k, v in bench.items() if k != "results"}
    return (_table(["metric", "implementation", "resolution", "batch", "images/s", "note"], rows, "metric throughput")
            + f"<pre>{_e(json.dumps(env, indent=1, default=str))}</pre>")


def _sets_table(result: Evaluation) -> str:
    rows = [[_td(n), _td(e.role), _td(e.path), _td(e.n), _td("x".join(map(str, e.resolution[::-1]))),
             _td("yes" if e.manifest else "no"), _td(e.groups), _td(json.dumps(e.resize) if e.resize else "")]
            for n, e in result.sets.items()]
    return _table(["set", "role", "folder", "n", "WxH", "manifest", "groups", "resize"], rows)


def render_html(result: Evaluation, plots: dict[str, bytes], per_group: int = 4, max_groups: int = 8) -> str:
    """The report as one HTML string."""
    p = result.protocol
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dmd-dar eval report</title>"
             f"<style>{_CSS}</style></head><body><h1>dmd-dar evaluation</h1>",
             f"<p>{_e(p.get('created', ''))} · resolution {_e('x'.join(map(str, p['resolution'][::-1])))} · "
             f"bootstrap {p['bootstrap']['n_boot']} resamples, {int(p['bootstrap']['confidence'] * 100)}% CIs</p>",
             "<h2>Verdicts</h2>", *[f'<p class="verdict">{_e(v)}</p>' for v in result.verdicts]]
    missing = [(m, r) for m, r in result.availability.items() if isinstance(r, Unavailable)]
    if missing:
        parts += ["<h2>Unavailable metrics</h2>",
                  _table(["metric", "needs", "reason"], [[_td(m), _td(r.needs), _td(r.reason)] for m, r in missing])]
    parts += ["<h2>Sets</h2>", _sets_table(result), "<h2>Images</h2>", _grids_section(result, per_group, max_groups)]
    parts += ["<h2>Spectra</h2>"] + [_img_tag(png, name, "plot") for name, png in plots.items()]
    parts += [_spectral_table(result), "<h2>Comparisons</h2>", _comparison_table(result),
              "<h2>High-frequency gap per class / prompt</h2>", _per_group_gap_table(result),
              f"<h2>CLIP score and {_lpips_label(result)} diversity</h2>", _set_metric_tables(result),
              "<h2>Per class / prompt</h2>", _per_group_sets_table(result)]
    if result.bench:
        parts += ["<h2>Metric throughput</h2>", _bench_table(result.bench)]
    parts += ["<h2>Protocol</h2><details><summary>models, weights, preprocessing, versions, seeds</summary>",
              f"<pre>{_e(json.dumps(p, indent=1, default=str))}</pre></details></body></html>"]
    return "\n".join(parts)


def write_report(result: Evaluation | str | Path, out_dir: str | Path | None = None, per_group: int | None = None,
                 max_groups: int = 8) -> Path:
    """Write ``report.html`` and the plot PNGs (``rapsd.png``, ``gap_db.png``, ``hf_gap_per_group.png``) into
    ``out_dir`` (default: beside ``metrics.json``); ``result`` is the evaluation or the path of its
    ``metrics.json`` (read through :class:`Evaluation`, so a file of another format fails with its field)."""
    if not isinstance(result, Evaluation):
        path = Path(result)
        result = Evaluation.load(path)
        out_dir = out_dir or (path if path.is_dir() else path.parent)
    out = Path(out_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, bytes] = {}
    for name, fn in PLOTS.items():
        png = fn(result)
        if png is not None:
            plots[name] = png
            atomic_write(out / name, lambda tmp, b=png: Path(tmp).write_bytes(b))
    if per_group is None:
        per_group = int(result.protocol["config"].get("grid_per_group", 4))
    return atomic_write_text(render_html(result, plots, per_group, max_groups), out / "report.html")

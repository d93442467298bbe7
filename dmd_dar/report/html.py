"""A self-contained ``report.html`` from the metrics dict of ``dmd-dar eval``.

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

from dmd_dar.report.plots import PLOTS
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


def _is_ci(d: Any) -> bool:
    return isinstance(d, dict) and "estimate" in d and "low" in d and "high" in d


def ci_cell(d: Any) -> str:
    """A table cell for a CI dict ``estimate [low, high]``, an availability record, or a plain number."""
    if _is_ci(d):
        sig = d["low"] is not None and d["high"] is not None and (d["low"] > 0 or d["high"] < 0)
        return (f'<td class="num" data-value="{d["estimate"]!r}" data-low="{d["low"]!r}" data-high="{d["high"]!r}">'
                f'{fmt(d["estimate"])} [{fmt(d["low"])}, {fmt(d["high"])}]{" *" if sig else ""}</td>')
    if isinstance(d, dict) and d.get("available") is False:
        return f'<td class="na" title="{_e(d.get("reason", ""))}">unavailable: needs {_e(d.get("needs"))}</td>'
    if isinstance(d, int | float):
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


def _png_bytes(arr: np.ndarray) -> bytes:
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


def _grids_section(metrics: dict[str, Any], per_group: int, max_groups: int) -> str:
    from dmd_dar.evaluation.images import ImageSet

    sets = []
    for name, e in metrics["sets"].items():
        try:
            sets.append(ImageSet(name, e["path"]))
        except Exception as err:  # the report must not fail because a folder moved since the evaluation
            return f'<p class="na">image grids skipped: {_e(err)}</p>'
    sets.sort(key=lambda s: metrics["sets"][s.name]["role"] != "reference")
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
            cells.append(f"<td>{_img_tag(_png_bytes(_grid([_display(a) for a in arrs])), f'{s.name} {g}', 'grid')}</td>")
        rows.append(cells)
    note = " Large images are shown as native-resolution centre crops." if cropped else ""
    more = f" (first {max_groups} of {len(labels)} groups)" if len(labels) > max_groups else ""
    return (f"<p>Up to {per_group} images per class / prompt from each set{more}.{note}</p>"
            + _table(["group", *[s.name for s in sets]], rows, cls="grids"))


def _spectral_table(metrics: dict[str, Any]) -> str:
    sets = {n: e for n, e in metrics["sets"].items() if "scalars" in e.get("spectral", {})}
    if not sets:
        return ""
    names = list(next(iter(sets.values()))["spectral"]["scalars"])
    rows = [[_td(n), _td(e["n"]), *[ci_cell(e["spectral"]["scalars"][k]) for k in names]] for n, e in sets.items()]
    return _table(["set", "n", *names], rows, "per-image spectral scalars: mean [95% CI]")


def _lpips_label(metrics: dict[str, Any]) -> str:
    """"LPIPS" or "ST-LPIPS": the perceptual model that ran (their values are not comparable)."""
    rec = metrics.get("protocol", {}).get("models", {}).get("lpips")
    return rec.get("label", "LPIPS") if isinstance(rec, dict) else "LPIPS"


def _comparison_table(metrics: dict[str, Any]) -> str:
    cols = [("HF gap dB", lambda c: c.get("spectral", {}).get("hf_gap_db")),
            ("LSD dB", lambda c: c.get("spectral", {}).get("lsd_db")),
            ("paired log HF ratio", lambda c: c.get("spectral", {}).get("paired_log_hf_ratio")),
            (f"{_lpips_label(metrics)} fidelity", lambda c: c.get("lpips_fidelity", {}).get("mean", c.get("lpips_fidelity"))),
            ("CLIP cos diff (paired)", lambda c: c.get("clip_score_diff")),
            ("FD", lambda c: c.get("fd")), ("CMMD", lambda c: c.get("cmmd"))]
    rows = [[_td(c["name"]), _td(c["kind"]),
             _td(c["pairing"].get("n", "no") if c["pairing"].get("available") else "no"),
             *[ci_cell(f(c)) for _, f in cols]] for c in metrics["comparisons"]]
    return _table(["comparison", "kind", "pairs", *[n for n, _ in cols]], rows,
                  "estimate [95% CI]; * = the CI excludes 0")


def _per_group_gap_table(metrics: dict[str, Any]) -> str:
    comps = [c for c in metrics["comparisons"] if c.get("spectral", {}).get("per_group_hf_gap_db")]
    if not comps:
        return "<p class='na'>no class / prompt labels in the manifests</p>"
    groups: list[str] = []
    for c in comps:
        groups += [g for g in c["spectral"]["per_group_hf_gap_db"] if g not in groups]
    rows = [[_td(g), *[ci_cell(c["spectral"]["per_group_hf_gap_db"].get(g)) for c in comps]] for g in groups]
    return _table(["group", *[c["name"] for c in comps]], rows, "HF gap in dB per class / prompt [95% CI]")


def _per_group_sets_table(metrics: dict[str, Any]) -> str:
    c = metrics["protocol"]["config"]["hf_cutoff"]
    key = f"hf_ratio@{c:g}"
    sets = metrics["sets"]
    cols = []
    for n, e in sets.items():
        sp = e.get("spectral", {}).get("per_group", {}).get(key)
        if sp:
            cols.append((f"{n}: {key}", sp))
        cs = e.get("clip_score", {}).get("per_group") if isinstance(e.get("clip_score"), dict) else None
        if cs:
            cols.append((f"{n}: CLIP cos", cs))
        top1 = e.get("clip_score", {}).get("top1", {}).get("per_group") if isinstance(e.get("clip_score"), dict) \
            else None
        if top1:
            cols.append((f"{n}: CLIP top-1", top1))
        dv = e.get("lpips_diversity", {}).get("per_group") if isinstance(e.get("lpips_diversity"), dict) else None
        if dv:
            cols.append((f"{n}: {_lpips_label(metrics)} diversity", dv))
    if not cols:
        return ""
    groups: list[str] = []
    for _, d in cols:
        groups += [g for g in d if g not in groups]
    rows = [[_td(g), *[ci_cell(d.get(g)) for _, d in cols]] for g in groups]
    return _table(["group", *[n for n, _ in cols]], rows, "per class / prompt breakdown")


def _set_metric_tables(metrics: dict[str, Any]) -> str:
    rows = []
    for n, e in metrics["sets"].items():
        cs, dv = e.get("clip_score"), e.get("lpips_diversity")
        top1 = cs.get("top1") if isinstance(cs, dict) else None
        rows.append([_td(n), ci_cell(cs.get("mean_cos", cs) if isinstance(cs, dict) else None),
                     ci_cell(cs.get("x100") if isinstance(cs, dict) else None),
                     ci_cell(top1.get("accuracy")) if top1 else _td(""),
                     _td(f"1/{top1['candidates']}") if top1 else _td(""),
                     ci_cell(dv.get("mean", dv) if isinstance(dv, dict) else None)])
    lp = _lpips_label(metrics)
    return _table(["set", "CLIP score (mean cos)", "CLIP score x100", "CLIP top-1 (own text closest)", "chance",
                   f"{lp} diversity"], rows, f"per-set CLIP score, CLIP top-1 and {lp} diversity [95% CI]")


def _bench_table(bench: dict[str, Any]) -> str:
    rows = [[_td(r.get("metric")), _td(r.get("impl")), _td(r.get("resolution")), _td(r.get("batch")),
             ci_cell(r.get("images_per_s")), _td(r.get("note", ""))] for r in bench.get("results", [])]
    env = {k: v for k, v in bench.items() if k != "results"}
    return (_table(["metric", "implementation", "resolution", "batch", "images/s", "note"], rows, "metric throughput")
            + f"<pre>{_e(json.dumps(env, indent=1, default=str))}</pre>")


def _sets_table(metrics: dict[str, Any]) -> str:
    rows = [[_td(n), _td(e["role"]), _td(e["path"]), _td(e["n"]), _td("x".join(map(str, e["resolution"][::-1]))),
             _td("yes" if e["manifest"] else "no"), _td(e["groups"]),
             _td(json.dumps(e["resize"]) if e.get("resize") else "")] for n, e in metrics["sets"].items()]
    return _table(["set", "role", "folder", "n", "WxH", "manifest", "groups", "resize"], rows)


def render_html(metrics: dict[str, Any], plots: dict[str, bytes], per_group: int = 4, max_groups: int = 8) -> str:
    """The report as one HTML string."""
    p = metrics["protocol"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dmd-dar eval report</title>"
             f"<style>{_CSS}</style></head><body><h1>dmd-dar evaluation</h1>",
             f"<p>{_e(p.get('created', ''))} · resolution {_e('x'.join(map(str, p['resolution'][::-1])))} · "
             f"bootstrap {p['bootstrap']['n_boot']} resamples, {int(p['bootstrap']['confidence'] * 100)}% CIs</p>",
             "<h2>Verdicts</h2>", *[f'<p class="verdict">{_e(v)}</p>' for v in metrics["verdicts"]]]
    missing = [(m, r) for m, r in metrics["availability"].items() if not r.get("available", True)]
    if missing:
        parts += ["<h2>Unavailable metrics</h2>",
                  _table(["metric", "needs", "reason"], [[_td(m), _td(r.get("needs")), _td(r.get("reason"))]
                                                       for m, r in missing])]
    parts += ["<h2>Sets</h2>", _sets_table(metrics), "<h2>Images</h2>", _grids_section(metrics, per_group, max_groups)]
    parts += ["<h2>Spectra</h2>"] + [_img_tag(png, name, "plot") for name, png in plots.items()]
    parts += [_spectral_table(metrics), "<h2>Comparisons</h2>", _comparison_table(metrics),
              "<h2>High-frequency gap per class / prompt</h2>", _per_group_gap_table(metrics),
              f"<h2>CLIP score and {_lpips_label(metrics)} diversity</h2>", _set_metric_tables(metrics),
              "<h2>Per class / prompt</h2>", _per_group_sets_table(metrics)]
    if metrics.get("bench"):
        parts += ["<h2>Metric throughput</h2>", _bench_table(metrics["bench"])]
    parts += ["<h2>Protocol</h2><details><summary>models, weights, preprocessing, versions, seeds</summary>",
              f"<pre>{_e(json.dumps(p, indent=1, default=str))}</pre></details></body></html>"]
    return "\n".join(parts)


def write_report(metrics: dict[str, Any] | str | Path, out_dir: str | Path | None = None, per_group: int | None = None,
                 max_groups: int = 8) -> Path:
    """Write ``report.html`` and the plot PNGs (``rapsd.png``, ``gap_db.png``, ``hf_gap_per_group.png``) into
    ``out_dir`` (default: beside ``metrics.json``); ``metrics`` is the dict or the path of ``metrics.json``."""
    if not isinstance(metrics, dict):
        path = Path(metrics)
        metrics = json.loads(path.read_text())
        out_dir = out_dir or path.parent
    out = Path(out_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, bytes] = {}
    for name, fn in PLOTS.items():
        png = fn(metrics)
        if png is not None:
            plots[name] = png
            atomic_write(out / name, lambda tmp, b=png: Path(tmp).write_bytes(b))
    if per_group is None:
        per_group = int(metrics["protocol"]["config"].get("grid_per_group", 4))
    return atomic_write_text(render_html(metrics, plots, per_group, max_groups), out / "report.html")

"""From per-run metrics to the study's table: statistics over seeds, training health, the automatic reading.

Intervals over seeds are Student-t intervals of the mean of the per-run estimates (``confidence``, n - 1 degrees of
freedom); with a single seed the run's own bootstrap interval (over images) is shown instead and labelled so.

The reading compares each variant with the baseline. The runs of one seed are paired across variants (same data
order, same noise, same initial function: DAR starts equal to the residual model), so with two or more common seeds
it calls a difference when the paired interval of the per-seed differences (variant - baseline, Student t) excludes
0; that removes what the seeds share, which unpaired intervals leave in. With one seed it falls back to the
conservative rule that the two bootstrap intervals do not overlap. The paper's claim (HF gap vs teacher) is tested
once per variant and step count; its verdicts also carry the Holm-Bonferroni-adjusted p-value of the paired t-tests
over that family (``holm_adjust``), and a difference that does not survive the correction is reported as such.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from dmd_dar.evaluation.results import Comparison, Evaluation, SetResult, headline
from dmd_dar.metrics.bootstrap import Interval

# key -> (label, better): better = "higher" | "lower" | "zero" (closer to 0 is better) | "" (no preference)
METRICS: dict[str, tuple[str, str]] = {
    "hf_gap_db_vs_teacher": ("HF gap vs teacher (dB)", "zero"),
    "hf_gap_db_vs_data": ("HF gap vs data (dB)", "zero"),
    "hf_ratio": ("hf_ratio", ""),
    "paired_log_hf_ratio": ("paired log HF ratio vs teacher", "zero"),
    "lpips_fidelity": ("LPIPS fidelity vs teacher", "lower"),
    "lpips_diversity": ("LPIPS diversity", "higher"),
    "clip_score": ("CLIP score (cos)", "higher"),
    "fd_vs_data": ("FD vs data", "lower"),
    "fd_vs_teacher": ("FD vs teacher", "lower"),
    "cmmd_vs_data": ("CMMD vs data", "lower"),
    "cmmd_vs_teacher": ("CMMD vs teacher", "lower"),
}
HEALTH_LOSSES = ("gen/dm_loss", "critic/fake_loss")
HEALTH_GRADS = ("gen/grad_norm", "critic/grad_norm")


def headline_ci(result: Any) -> dict[str, float] | None:
    """The headline interval of an evaluation result as the study's ``{estimate, low, high}``, or None where the
    metric was not computed, is unavailable, or has no finite estimate."""
    iv = headline(result)
    if isinstance(iv, Interval) and math.isfinite(iv.estimate):
        return {"estimate": float(iv.estimate), "low": _num(iv.low), "high": _num(iv.high)}
    return None


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else math.nan


def _spectral(c: Comparison | None, attr: str) -> Any:
    return getattr(c.spectral, attr) if c is not None and c.spectral is not None else None


def _hf_ratio(s: SetResult | None, key: str) -> Interval | None:
    return s.spectral.scalars.get(key) if s is not None and s.spectral is not None else None


def hf_key(metrics: Evaluation) -> str:
    return f"hf_ratio@{metrics.hf_cutoff:g}"


def extract(metrics: Evaluation, name: str) -> dict[str, dict[str, float] | None]:
    """Every table metric of sample set ``name`` as a CI dict (None where unavailable)."""
    base, ref = metrics.comparison(name, "baseline"), metrics.comparison(name, "reference")
    s = metrics.sets.get(name)
    return {
        "hf_gap_db_vs_teacher": headline_ci(_spectral(base, "hf_gap_db")),
        "hf_gap_db_vs_data": headline_ci(_spectral(ref, "hf_gap_db")),
        "hf_ratio": headline_ci(_hf_ratio(s, hf_key(metrics))),
        "paired_log_hf_ratio": headline_ci(_spectral(base, "paired_log_hf_ratio")),
        "lpips_fidelity": headline_ci(base.lpips_fidelity if base else None),
        "lpips_diversity": headline_ci(s.lpips_diversity if s else None),
        "clip_score": headline_ci(s.clip_score if s else None),
        "fd_vs_data": headline_ci(ref.fd if ref else None),
        "fd_vs_teacher": headline_ci(base.fd if base else None),
        "cmmd_vs_data": headline_ci(ref.cmmd if ref else None),
        "cmmd_vs_teacher": headline_ci(base.cmmd if base else None),
    }


def anchors(metrics: Evaluation, teacher: str, reference: str = "reference") -> dict[str, dict[str, Any]]:
    """The teacher's and the data's own rows of the study table (what the students are read against)."""
    tref, ts, rs = metrics.comparison(teacher, "reference"), metrics.sets.get(teacher), metrics.sets.get(reference)
    return {"teacher": {"hf_gap_db_vs_data": headline_ci(_spectral(tref, "hf_gap_db")),
                        "hf_ratio": headline_ci(_hf_ratio(ts, hf_key(metrics))),
                        "clip_score": headline_ci(ts.clip_score if ts else None),
                        "lpips_diversity": headline_ci(ts.lpips_diversity if ts else None),
                        "fd_vs_data": headline_ci(tref.fd if tref else None), "cmmd_vs_data": headline_ci(tref.cmmd if tref else None)},
            "data": {"hf_ratio": headline_ci(_hf_ratio(rs, hf_key(metrics))), "clip_score": headline_ci(rs.clip_score if rs else None)}}


def extract_per_class(metrics: Evaluation, name: str) -> dict[str, dict[str, dict[str, float] | None]]:
    """Per class: HF gap vs teacher and vs data (dB), hf_ratio."""
    base, ref = metrics.comparison(name, "baseline"), metrics.comparison(name, "reference")
    s = metrics.sets.get(name)
    per_ratio = (s.spectral.per_group or {}).get(hf_key(metrics), {}) if s is not None and s.spectral else {}
    gaps_t = _spectral(base, "per_group_hf_gap_db") or {}
    gaps_d = _spectral(ref, "per_group_hf_gap_db") or {}
    out: dict[str, dict[str, dict[str, float] | None]] = {}
    for g in dict.fromkeys([*per_ratio, *gaps_t, *gaps_d]):
        out[g] = {"hf_gap_db_vs_teacher": headline_ci(gaps_t[g].gap if g in gaps_t else None),
                  "hf_gap_db_vs_data": headline_ci(gaps_d[g].gap if g in gaps_d else None),
                  "hf_ratio": headline_ci(per_ratio.get(g))}
    return out


def over_seeds(cis: list[dict[str, float] | None], confidence: float,
               seeds: list[int] | None = None) -> dict[str, Any] | None:
    """Mean and interval of per-seed estimates (Student t); one seed: that run's bootstrap interval.
    ``seeds`` (aligned with ``cis``) are recorded next to ``per_seed`` so that variants can be paired later."""
    kept = [(s, c) for s, c in zip(seeds if seeds is not None else range(len(cis)), cis) if c is not None]
    if not kept:
        return None
    est = np.array([c["estimate"] for _, c in kept], dtype=np.float64)
    tags = {"per_seed": est.tolist()} | ({"seeds": [s for s, _ in kept]} if seeds is not None else {})
    n = len(est)
    if n == 1:
        return {"estimate": float(est[0]), "low": kept[0][1]["low"], "high": kept[0][1]["high"], "n": 1, **tags,
                "method": "bootstrap over images (one seed)"}
    m, half, sd = _t_interval(est, confidence)
    return {"estimate": m, "low": m - half, "high": m + half, "half_width": half, "std": sd, "n": n, **tags,
            "method": f"Student t over {n} seeds"}


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, half-width, sd) of the Student-t interval of the mean of ``values`` (n >= 2)."""
    n = len(values)
    sd = float(values.std(ddof=1))
    return float(values.mean()), float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), sd


def paired_difference(a: dict[str, Any], b: dict[str, Any], confidence: float) -> dict[str, Any] | None:
    """Interval of the mean per-seed difference a - b over the seeds both cells hold (paired Student t), with the
    two-sided p-value of the paired t-test (H0: mean difference 0); None with fewer than two common seeds or cells
    without seed tags."""
    if "seeds" not in a or "seeds" not in b:
        return None
    va, vb = dict(zip(a["seeds"], a["per_seed"])), dict(zip(b["seeds"], b["per_seed"]))
    common = [s for s in va if s in vb]
    if len(common) < 2:
        return None
    diffs = np.array([va[s] - vb[s] for s in common], dtype=np.float64)
    m, half, sd = _t_interval(diffs, confidence)
    return {"estimate": m, "low": m - half, "high": m + half, "half_width": half, "std": sd, "n": len(common),
            "p_value": _paired_t_p_value(m, sd, len(common)), "seeds": common,
            "method": f"paired Student t over {len(common)} seeds"}


def _paired_t_p_value(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the one-sample t-test of ``mean`` against 0 (n - 1 degrees of freedom)."""
    from scipy import stats

    if not (math.isfinite(mean) and math.isfinite(sd)):
        return math.nan
    if sd == 0.0:  # identical differences: certain unless they are all zero
        return 1.0 if mean == 0.0 else 0.0
    return float(2.0 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (non-finite entries stay NaN and do not count).

    With the m finite p-values sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)); rejecting
    where the adjusted value is below alpha controls the family-wise error rate at alpha.
    """
    finite = sorted((p, i) for i, p in enumerate(p_values) if isinstance(p, int | float) and math.isfinite(p))
    out = [math.nan] * len(p_values)
    running, m = 0.0, len(finite)
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if any(not math.isfinite(x) for x in (a["low"], a["high"], b["low"], b["high"])):
        return True  # no usable interval: no claim of a difference
    return not (a["high"] < b["low"] or b["high"] < a["low"])


# ----------------------------------------------------------------------------------------------- health


def read_health(run_dir: Path, keys: list[str], blowup_factor: float, drift_factor: float = 2.0) -> dict[str, Any]:
    """Health curves of one distill run and its flags.

    ``diverged`` is hard evidence only: the trainer stopped on non-finite losses, skipped non-finite steps, or
    logged a non-finite value. Softer warning signs go to ``flags``: a loss or gradient norm whose last-10 % mean
    exceeds ``blowup_factor`` times its first-10 % median, and a generator output whose std drifted beyond
    ``drift_factor`` (or below its inverse) times the teacher samples' (``drift/std_ratio``, last 10 %).
    """
    curves: dict[str, list[list[float]]] = {k: [] for k in keys}
    tracked = list(dict.fromkeys([*keys, *HEALTH_LOSSES, *HEALTH_GRADS, "drift/std_ratio"]))
    series: dict[str, list[float]] = {k: [] for k in tracked}
    nonfinite = False
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k in tracked:
                v = rec.get(k)
                if isinstance(v, int | float):
                    nonfinite |= not math.isfinite(float(v))
                    series[k].append(float(v))
                    if k in curves:
                        curves[k].append([rec["step"], float(v)])
    failed = run_dir / "failed.json"
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    bad = int(summary.get("bad_steps_total", 0) or 0)
    flags = []
    for k in (*HEALTH_LOSSES, *HEALTH_GRADS):
        ys = [abs(y) for y in series.get(k, []) if math.isfinite(y)]
        if len(ys) >= 4:
            w = max(1, len(ys) // 10)
            head, tail = float(np.median(ys[:w])), float(np.mean(ys[-w:]))
            if head > 0 and tail > blowup_factor * head:
                flags.append(f"{k} grew {tail / head:.3g}x")
    drift = [y for y in series.get("drift/std_ratio", []) if math.isfinite(y)]
    if drift:
        tail = float(np.mean(drift[-max(1, len(drift) // 10):]))
        if not 1 / drift_factor <= tail <= drift_factor:
            flags.append(f"output std {tail:.3g}x the teacher's")
    stopped = failed.is_file()
    final = {k: (v[-1][1] if v else None) for k, v in curves.items()}
    return {"curves": curves, "stopped": stopped, "stop_reason": json.loads(failed.read_text())["error"]
            if stopped else None, "bad_steps_total": bad, "nonfinite_logged": nonfinite, "flags": flags,
            "diverged": stopped or bad > 0 or nonfinite, "final": final}


# ----------------------------------------------------------------------------------------------- reading


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


def _better(key: str, a: float, b: float) -> bool | None:
    rule = METRICS[key][1]
    if rule == "higher":
        return a > b
    if rule == "lower":
        return a < b
    if rule == "zero":
        return abs(a) < abs(b)
    return None


def no_difference(a: dict[str, Any], b: dict[str, Any], confidence: float) -> tuple[bool, dict[str, Any] | None, str]:
    """The reading's rule for cell ``a`` against the baseline cell ``b`` (module docstring): (no significant
    difference?, the paired difference or None, why). Non-finite intervals never make a difference."""
    paired = paired_difference(a, b, confidence)
    if paired is None:
        return overlap(a, b), None, "intervals overlap"
    same = paired["low"] <= 0 <= paired["high"] or not all(map(math.isfinite, (paired["low"], paired["high"])))
    return same, paired, "the paired interval contains 0"


def compare_cells(key: str, a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str,
                  confidence: float = 0.95) -> dict[str, Any]:
    """One metric of variant ``a`` against the baseline ``b``: the paired rule when both hold two or more common
    seeds, else the overlap rule (module docstring)."""
    label = METRICS[key][0]
    nums = f"{_fmt(a['estimate'])} [{_fmt(a['low'])}, {_fmt(a['high'])}] vs {_fmt(b['estimate'])} " \
           f"[{_fmt(b['low'])}, {_fmt(b['high'])}]"
    same, paired, why = no_difference(a, b, confidence)
    if paired is not None:
        nums += f"; paired difference {paired['estimate']:+.3g} [{_fmt(paired['low'])}, {_fmt(paired['high'])}]" \
                f" over {paired['n']} seeds, p = {_fmt(paired['p_value'])}"
    if same:
        return {"metric": key, "significant": False, "better": None, "paired": paired,
                "text": f"{label}: no significant difference ({nums}; {why})"}
    better = _better(key, a["estimate"], b["estimate"])
    if key.startswith("hf_gap") or key == "paired_log_hf_ratio":
        more = a["estimate"] > b["estimate"]
        how = f"{name_a} keeps {'more' if more else 'less'} high-frequency energy than {name_b}"
        if better is not None:
            how += f" ({'closer to' if better else 'further from'} its reference)"
    elif better is None:
        how = f"{name_a} is {'higher' if a['estimate'] > b['estimate'] else 'lower'} than {name_b}"
    else:
        how = f"{name_a} is {'better' if better else 'worse'} than {name_b}"
    return {"metric": key, "significant": True, "better": better, "paired": paired, "text": f"{label}: {how} ({nums})"}


def claim_verdict(cmps: list[dict[str, Any]], alpha: float = 0.05) -> str:
    """The paper's claim (DAR preserves high-frequency detail) judged on the HF gap vs teacher.

    When the comparison carries a Holm-adjusted p-value (``p_holm``, over the study's family of claim tests, see
    ``holm_adjust``), a difference that the per-comparison interval calls but the correction does not is reported
    as such rather than as support or contradiction.
    """
    c = next((x for x in cmps if x["metric"] == "hf_gap_db_vs_teacher"), None)
    if c is None:
        return "no HF gap vs teacher available"
    if not c["significant"]:
        return "not supported at this scale (no significant difference in HF gap vs teacher)"
    verdict = "supported (HF gap vs teacher significantly closer to 0" if c["better"] else \
        "contradicted (HF gap vs teacher significantly further from 0"
    p_holm, family = c.get("p_holm"), c.get("family_size")
    if p_holm is None or not math.isfinite(p_holm):
        return verdict + ")"
    corrected = f"Holm-adjusted p = {p_holm:.2g} over {family} claim tests"
    if p_holm < alpha:
        return f"{verdict}; {corrected})"
    return f"{verdict.split(' (')[0]} by this comparison alone, not after correcting for multiple comparisons " \
           f"({corrected})"

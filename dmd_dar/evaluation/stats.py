"""Bootstrap confidence intervals for the evaluation's set-level statistics.

Per-sample means use :func:`dmd_dar.metrics.bootstrap.bootstrap_ci`. Statistics of whole sets (the HF gap of two
mean spectra, FD, CMMD) are bootstrapped here by drawing resample *counts* per image, so every replicate is a
weighted mean (a matrix product) instead of a gather. Two independent sets are resampled independently; paired
sets (same noise and condition) share one draw so their correlation is kept. Every interval is a percentile
interval; each quantity gets its own seed derived from ``seed`` and its name, so results are reproducible.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dmd_dar.metrics.bootstrap import bootstrap_ci, paired_bootstrap_ci


def sub_seed(seed: int, name: str) -> int:
    """A stable per-quantity seed (independent streams for independent quantities)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial resample counts ``[n_boot, n]`` (each row sums to n)."""
    idx = rng.integers(0, n, size=(n_boot, n))
    out = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(out, (np.repeat(np.arange(n_boot), n), idx.reshape(-1)), 1.0)
    return out


def _interval(estimate: float, boots: np.ndarray, n: Any, n_boot: int, confidence: float, seed: int,
              method: str) -> dict[str, Any]:
    b = boots[np.isfinite(boots)]
    alpha = (1 - confidence) / 2
    low, high = (np.quantile(b, [alpha, 1 - alpha]) if b.size else (math.nan, math.nan))
    return {"estimate": float(estimate), "low": float(low), "high": float(high), "n": n, "n_boot": int(n_boot),
            "confidence": float(confidence), "seed": int(seed), "method": method}


def mean_ci(values: Any, n_boot: int, confidence: float, seed: int, name: str) -> dict[str, Any]:
    """Percentile bootstrap CI of the mean of per-sample values (NaNs dropped), plus their std."""
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64), dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    s = sub_seed(seed, name)
    out = bootstrap_ci(v, np.mean, n_boot, confidence, s).to_dict()
    out["std"] = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return out


def paired_diff_ci(a: Any, b: Any, n_boot: int, confidence: float, seed: int, name: str) -> dict[str, Any]:
    """CI of ``mean(a_i - b_i)`` over paired samples."""
    a = np.asarray(torch.as_tensor(a, dtype=torch.float64), dtype=np.float64)
    b = np.asarray(torch.as_tensor(b, dtype=torch.float64), dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    out = paired_bootstrap_ci(a[ok], b[ok], np.mean, n_boot, confidence, sub_seed(seed, name)).to_dict()
    out["method"] = "percentile, paired (pairs resampled together)"
    return out


def scale_ci(ci: dict[str, Any], factor: float) -> dict[str, Any]:
    """The same interval for ``factor * statistic`` (factor > 0)."""
    return {**ci, **{k: ci[k] * factor for k in ("estimate", "low", "high", "std") if k in ci}}


def curve_gap_ci(gen: torch.Tensor, ref: torch.Tensor, stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 n_boot: int, confidence: float, seed: int, name: str, paired: bool = False) -> dict[str, Any]:
    """CI of ``stat(mean curve of gen, mean curve of ref)`` where ``stat`` maps ``[R, B], [R, B] -> [R]``.

    ``gen [N, B]`` and ``ref [M, B]`` are per-image RAPSD curves; with ``paired`` (N == M, row i of each from the
    same noise and condition) both are resampled with the same draw.
    """
    g = np.asarray(gen, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    s = sub_seed(seed, name)
    rng = np.random.default_rng(s)
    est = float(stat(g.mean(0, keepdims=True), r.mean(0, keepdims=True))[0])
    cg = _counts(len(g), n_boot, rng)  # [R, N]
    cr = cg if paired else _counts(len(r), n_boot, rng)  # [R, M]
    boots = stat(cg @ g / len(g), cr @ r / len(r))  # [R]
    method = "percentile, paired (pairs resampled together)" if paired else "percentile, two-sample"
    return _interval(est, boots, [len(g), len(r)], n_boot, confidence, s, method)


def gap_stats(bins: int, c: float) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Vectorised HF gap (mean dB gap over bins with centre >= c) and LSD (mean |dB gap|) of mean curves."""
    centers = (np.arange(bins) + 0.5) / bins
    hf = centers >= c

    def db(g: np.ndarray, r: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 10.0 * np.log10(g / r)  # [R, B]

    def hf_gap(g: np.ndarray, r: np.ndarray) -> np.ndarray:
        d = db(g, r)
        return np.nanmean(np.where(hf[None] & np.isfinite(d), d, np.nan), axis=1)

    def lsd(g: np.ndarray, r: np.ndarray) -> np.ndarray:
        d = db(g, r)
        return np.nanmean(np.where(np.isfinite(d), np.abs(d), np.nan), axis=1)

    return {"hf_gap_db": hf_gap, "lsd_db": lsd}


# ----------------------------------------------------------------------------------------------- FD / CMMD


def _weighted_gaussian(f: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of features ``f [N, D]`` drawn with counts ``w [N]``."""
    n = w.sum()
    mu = w @ f / n
    c = f - mu
    return mu, (c.T * w) @ c / (n - 1)


def _fd_eig(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    # Tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)); eigenvalues are real and >= 0 for PSD S1, S2 (clip round-off).
    ev = np.linalg.eigvals(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def fd_ci(x: np.ndarray, y: np.ndarray, estimate: float, n_boot: int, confidence: float, seed: int,
          name: str) -> dict[str, Any]:
    """Two-sample bootstrap of the Fréchet distance (features ``x [N, D]``, ``y [M, D]``)."""
    s = sub_seed(seed, name)
    rng = np.random.default_rng(s)
    cx, cy = _counts(len(x), n_boot, rng), _counts(len(y), n_boot, rng)
    boots = np.array([_fd_eig(*_weighted_gaussian(x, cx[k]), *_weighted_gaussian(y, cy[k])) for k in range(n_boot)])
    raw = _interval(estimate, boots, [len(x), len(y)], n_boot, confidence, s, "percentile, two-sample")
    # Resamples repeat images, which shrinks the covariances: FD of a resample is biased upward (often the whole
    # bootstrap distribution lies above the estimate). Shift the interval by the bootstrap's own bias estimate.
    bias = float(np.nanmean(boots) - estimate)
    return {**raw, "low": raw["low"] - bias, "high": raw["high"] - bias, "bootstrap_bias": bias,
            "percentile_raw": [raw["low"], raw["high"]],
            "method": "percentile, two-sample, shifted by the bootstrap bias (mean(FD*) - FD)"}


def _rbf(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-gamma * np.clip(d2, 0, None))


def cmmd_ci(x: np.ndarray, y: np.ndarray, estimate: float, sigma: float, scale: float, estimator: str,
            n_boot: int, confidence: float, seed: int, name: str) -> dict[str, Any]:
    """Two-sample bootstrap of CMMD from the kernel matrices, with resample counts as weights.

    For the unbiased estimator, pairs of the *same* original image are dropped from the within-set sums (not
    only identical draws), so repeated images in a resample do not inflate the within-set similarity.
    """
    gamma = 1.0 / (2.0 * sigma**2)
    kxx, kyy, kxy = _rbf(x, x, gamma), _rbf(y, y, gamma), _rbf(x, y, gamma)
    s = sub_seed(seed, name)
    rng = np.random.default_rng(s)
    cx, cy = _counts(len(x), n_boot, rng), _counts(len(y), n_boot, rng)  # [R, N], [R, M]
    mmd = mmd2_from_counts(kxx, kyy, kxy, cx, cy, estimator)
    return _interval(estimate, scale * mmd, [len(x), len(y)], n_boot, confidence, s, "percentile, two-sample")


def mmd2_from_counts(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                     estimator: str) -> np.ndarray:
    """MMD^2 of resamples given as counts ``cx [R, N]``, ``cy [R, M]`` (all ones = the plain estimator)."""
    n, m = cx.shape[1], cy.shape[1]
    sxx = np.einsum("rn,nm,rm->r", cx, kxx, cx)
    syy = np.einsum("rn,nm,rm->r", cy, kyy, cy)
    sxy = np.einsum("rn,nm,rm->r", cx, kxy, cy)
    if estimator == "unbiased":
        dx, dy = (cx**2).sum(1), (cy**2).sum(1)  # same-image pairs (k(a, a) = 1)
        return (sxx - dx) / (n * n - dx) + (syy - dy) / (m * m - dy) - 2 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)


def significant(ci: dict[str, Any], null: float = 0.0) -> bool:
    """True when the interval excludes ``null``."""
    return bool(ci["low"] > null or ci["high"] < null)

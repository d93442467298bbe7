"""Seeded percentile-bootstrap confidence intervals: the one place every interval of the project is made.

Two ways to resample, one interval type (:class:`Interval`):

- :func:`bootstrap_ci` / :func:`paired_bootstrap_ci`: a statistic of per-sample values (a mean, a median),
  recomputed on index resamples;
- :func:`counts_bootstrap`: a statistic of whole sets (the HF gap of two mean spectra, FD, CMMD) written as a
  function of per-image resample *counts*. The estimate is that same function at counts of one, so the estimate
  and every resample are computed by one implementation. Independent sets draw independent counts; paired sets
  (same noise and condition, row i of each) share one draw so their correlation is kept.

Every quantity gets its own seed, derived from the evaluation's seed and the quantity's name (:func:`sub_seed`),
so results are reproducible and independent quantities use independent streams.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dmd_dar.errors import UserError

Statistic = Callable[..., Any]
CountsStatistic = Callable[..., np.ndarray]  # counts [R, n_1], ..., [R, n_k] -> statistic per row [R]


@dataclass(frozen=True, kw_only=True)
class Interval:
    """``estimate`` (the statistic on the full sample) and its percentile interval ``[low, high]``.

    ``n`` is the sample size (one per set for a statistic of several sets); ``std`` the per-sample standard
    deviation where the statistic is a mean. FD's interval is shifted by the bootstrap's bias estimate
    (``bootstrap_bias``); ``percentile_raw`` keeps the unshifted interval.
    """

    estimate: float
    low: float
    high: float
    n: int | list[int]
    n_boot: int
    confidence: float
    seed: int
    method: str = "percentile"
    std: float | None = None
    bootstrap_bias: float | None = None
    percentile_raw: list[float] | None = None

    def scaled(self, factor: float) -> Interval:
        """The same interval for ``factor * statistic`` (``factor > 0``)."""
        if not factor > 0:
            raise UserError(f"an interval can only be scaled by a positive factor, got {factor}")
        return replace(self, estimate=self.estimate * factor, low=self.low * factor, high=self.high * factor,
                       std=None if self.std is None else self.std * factor)

    def excludes(self, null: float = 0.0) -> bool:
        """True when the interval lies entirely on one side of ``null`` (the difference is called)."""
        return bool(self.low > null or self.high < null)


def sub_seed(seed: int, name: str) -> int:
    """A stable per-quantity seed (independent streams for independent quantities)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _check(n_boot: int, confidence: float) -> None:
    if not 0 < confidence < 1 or n_boot < 1:
        raise UserError(f"bootstrap needs 0 < confidence < 1 and n_boot >= 1, got {confidence}, {n_boot}")


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial resample counts ``[n_boot, n]`` (float64): row r says how often each of the n items is drawn
    when n items are drawn with replacement, so each row sums to n."""
    idx = rng.integers(0, n, size=(n_boot, n))  # [R, n] draws with replacement
    out = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(out, (np.repeat(np.arange(n_boot), n), idx.reshape(-1)), 1.0)
    return out


def percentile_interval(estimate: float, boots: np.ndarray, n: int | list[int], n_boot: int, confidence: float,
                        seed: int, method: str = "percentile", std: float | None = None) -> Interval:
    """The percentile interval of the finite bootstrap replicates ``boots`` around ``estimate``."""
    b = np.asarray(boots, dtype=np.float64)
    b = b[np.isfinite(b)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(b, [alpha, 1 - alpha]) if b.size else (math.nan, math.nan)
    return Interval(estimate=float(estimate), low=float(low), high=float(high), n=n, n_boot=int(n_boot),
                    confidence=float(confidence), seed=int(seed), method=method, std=std)


def _as_1d(values: Any, name: str) -> np.ndarray:
    v = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise UserError(f"bootstrap of '{name}' got no samples")
    return v


def _resampled(stat: Statistic, v: np.ndarray, idx: np.ndarray) -> np.ndarray:
    try:  # vectorised statistics (np.mean, np.median, ...) accept an axis
        out = np.asarray(stat(v[idx], axis=1), dtype=np.float64)
        if out.shape == (idx.shape[0],):
            return out
    except TypeError:
        pass
    return np.asarray([stat(v[row]) for row in idx], dtype=np.float64)


def bootstrap_ci(values: Any, statistic: Statistic = np.mean, n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0, method: str = "percentile") -> Interval:
    """Percentile bootstrap CI of ``statistic`` over per-sample ``values`` (resampled with replacement).

    ``std`` records the per-sample standard deviation (n - 1), NaN for a single value."""
    _check(n_boot, confidence)
    v = _as_1d(values, "values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))  # [n_boot, n]
    boots = _resampled(statistic, v, idx)
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return percentile_interval(float(statistic(v)), boots, int(v.size), n_boot, confidence, seed, method, std)


def paired_bootstrap_ci(a: Any, b: Any, statistic: Statistic = np.mean, n_boot: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> Interval:
    """CI of ``statistic(a_i - b_i)`` over paired samples (pairs are resampled together, so the pairing's
    correlation is kept). Pair ``a`` and ``b`` first, e.g. with :func:`dmd_dar.metrics.pairing.pair_by_key`."""
    va, vb = _as_1d(a, "a"), _as_1d(b, "b")
    if va.shape != vb.shape:
        raise UserError(f"paired bootstrap needs equal-length samples, got {va.size} and {vb.size}")
    return bootstrap_ci(va - vb, statistic, n_boot, confidence, seed, "percentile, paired (pairs resampled together)")


def counts_bootstrap(statistic: CountsStatistic, sizes: Sequence[int], n_boot: int, confidence: float, seed: int,
                     paired: bool = False) -> tuple[Interval, np.ndarray]:
    """Bootstrap a statistic of whole sets given as a function of per-set resample counts.

    ``statistic(c_1, ..., c_k)`` maps count matrices ``c_i [R, sizes[i]]`` to one value per row ``[R]``. The
    estimate is ``statistic`` at counts of one (the full sets), the replicates are ``statistic`` at multinomial
    counts. With ``paired`` (every set the same size, row j of each from the same noise and condition) all sets
    share one draw. Returns the percentile interval and the replicates (for bias estimates).
    """
    _check(n_boot, confidence)
    sizes = [int(s) for s in sizes]
    if paired and len(set(sizes)) != 1:
        raise UserError(f"a paired bootstrap needs sets of one size, got {sizes}")
    rng = np.random.default_rng(seed)
    estimate = float(np.asarray(statistic(*[np.ones((1, s)) for s in sizes]), dtype=np.float64).reshape(-1)[0])
    if paired:
        shared = resample_counts(sizes[0], n_boot, rng)
        counts = [shared] * len(sizes)
    else:
        counts = [resample_counts(s, n_boot, rng) for s in sizes]
    boots = np.asarray(statistic(*counts), dtype=np.float64).reshape(-1)
    method = "percentile, paired (pairs resampled together)" if paired else "percentile, two-sample"
    n: int | list[int] = sizes[0] if len(sizes) == 1 else sizes
    return percentile_interval(estimate, boots, n, n_boot, confidence, seed, method), boots


def bias_shifted(interval: Interval, boots: np.ndarray) -> Interval:
    """The interval shifted by the bootstrap's bias estimate ``mean(replicates) - estimate``.

    For statistics whose resamples are biased by the resampling itself (FD: a resample repeats images, which
    shrinks its covariance, so the whole bootstrap distribution can lie above the estimate)."""
    b = np.asarray(boots, dtype=np.float64)
    bias = float(np.mean(b[np.isfinite(b)]) - interval.estimate) if np.isfinite(b).any() else math.nan
    return replace(interval, low=interval.low - bias, high=interval.high - bias, bootstrap_bias=bias,
                   percentile_raw=[interval.low, interval.high],
                   method=f"{interval.method}, shifted by the bootstrap bias (mean of replicates - estimate)")

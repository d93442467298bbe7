"""Seeded percentile-bootstrap confidence intervals for per-sample metric values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dmd_dar.errors import UserError

Statistic = Callable[..., Any]


@dataclass(frozen=True)
class BootstrapCI:
    """``estimate`` (the statistic on the full sample) and the percentile interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    n: int
    n_boot: int
    confidence: float
    seed: int
    method: str = "percentile"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
                 seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap CI of ``statistic`` over per-sample ``values`` (resampled with replacement)."""
    if not 0 < confidence < 1 or n_boot < 1:
        raise UserError(f"bootstrap needs 0 < confidence < 1 and n_boot >= 1, got {confidence}, {n_boot}")
    v = _as_1d(values, "values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))  # [n_boot, n]
    boots = _resampled(statistic, v, idx)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return BootstrapCI(float(statistic(v)), float(low), float(high), int(v.size), int(n_boot), float(confidence),
                       int(seed))


def paired_bootstrap_ci(a: Any, b: Any, statistic: Statistic = np.mean, n_boot: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> BootstrapCI:
    """CI of ``statistic(a_i - b_i)`` over paired samples (pairs are resampled together, so the pairing's
    correlation is kept). Pair ``a`` and ``b`` first, e.g. with :func:`dmd_dar.metrics.pairing.pair_by_key`."""
    va, vb = _as_1d(a, "a"), _as_1d(b, "b")
    if va.shape != vb.shape:
        raise UserError(f"paired bootstrap needs equal-length samples, got {va.size} and {vb.size}")
    return bootstrap_ci(va - vb, statistic, n_boot, confidence, seed)

"""Shared metric plumbing: manifest keys and pairing, availability records, protocols, sqrtm fallback."""

import numpy as np
import pytest
import scipy.linalg

from dmd_dar.errors import UserError
from dmd_dar.metrics import (
    MetricUnavailable,
    distribution,
    group_summary,
    pair_by_key,
    sample_group,
    sample_key,
    try_metric,
)
from dmd_dar.metrics.spectral import SpectralAccumulator


def test_sample_keys_pairing_and_groups():
    recs = [{"file": "0.png", "index": 0, "seed": 5, "class_id": 3}, {"index": 1, "seed": 6, "caption": "a cat"}]
    assert sample_key(recs[0]) == ("class", 3, 5, 0) and sample_key(recs[1]) == ("caption", "a cat", 6, 1)
    assert sample_group(recs[0]) == 3 and sample_group(recs[1]) == "a cat" and sample_group({"seed": 1}) is None
    with pytest.raises(UserError):
        sample_key({"class_id": 1})
    ia, ib = pair_by_key(["a", "b", "c"], ["c", "a", "b"])
    assert ia == [0, 1, 2] and ib == [1, 2, 0]
    with pytest.raises(UserError, match="duplicate"):
        pair_by_key(["a", "a"], ["a", "b"])
    with pytest.raises(UserError, match="do not pair"):
        pair_by_key(["a", "b"], ["a"])
    assert pair_by_key(["a", "b"], ["b"], require_all=False) == ([1], [0])
    summ = group_summary([1.0, 3.0, 5.0], ["x", "x", "y"])
    assert summ["x"] == {"n": 2, "mean": 2.0, "std": pytest.approx(2**0.5)} and summ["y"]["n"] == 1


def test_try_metric_records_only_missing_weights():
    def missing():
        raise MetricUnavailable("lpips", "/w/alexnet.pth", "not found")

    res, rec = try_metric("lpips_fidelity", missing)
    assert res is None and rec == {"available": False, "metric": "lpips_fidelity", "needs": "/w/alexnet.pth",
                                   "reason": "not found", "component": "lpips"}
    assert try_metric("x", lambda: 3) == (3, {"available": True, "metric": "x"})
    with pytest.raises(ZeroDivisionError):  # real bugs are never swallowed
        try_metric("x", lambda: 1 / 0)
    assert isinstance(MetricUnavailable("a", "b"), Exception) and "provide b" in str(MetricUnavailable("a", "b"))


def test_spectral_protocol_records_definition():
    p = SpectralAccumulator(bins=32, cutoffs=(0.5,)).protocol()
    assert p["luma_weights"] == [0.299, 0.587, 0.114] and p["bins"] == 32 and p["cutoffs"] == [0.5]
    assert "Hann" in p["window"] and p["versions"]["torch"] and p["value_range"] == [-1.0, 1.0]


def test_frechet_sqrtm_fallback_adds_eps(monkeypatch):
    calls, real = [], scipy.linalg.sqrtm

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real(m)

    monkeypatch.setattr(distribution.scipy.linalg, "sqrtm", flaky)
    s = np.diag([1.0, 4.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        d = distribution.frechet_distance(np.zeros(2), s, np.ones(2), s, eps=1e-6)
    assert len(calls) == 2 and np.allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert d == pytest.approx(2.0, abs=1e-5)

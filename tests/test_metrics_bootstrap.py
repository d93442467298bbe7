"""What every reported interval rests on: resample counts, one function for estimate and replicates, intervals
that have width and bracket their estimate, FD and CMMD replicates against brute force on explicit resamples."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from dmd_dar.errors import UserError
from dmd_dar.metrics.bootstrap import (
    Interval,
    bias_shifted,
    bootstrap_ci,
    counts_bootstrap,
    paired_bootstrap_ci,
    percentile_interval,
    resample_counts,
    sub_seed,
)
from dmd_dar.metrics.distribution import (
    cmmd,
    cmmd_interval,
    fd_interval,
    fd_of_counts,
    frechet_distance,
    frechet_distance_eig,
    gaussian_stats,
    mmd2_from_counts,
    mmd2_rbf,
    rbf_kernel,
)
from dmd_dar.metrics.spectral import gap_interval, hf_gap_db, log_spectral_distance, lsd_db_rows


def test_resample_counts_are_draws_with_replacement():
    n, reps = 200, 4000
    c = resample_counts(n, reps, np.random.default_rng(0))
    assert c.shape == (reps, n) and np.all(c.sum(1) == n) and np.all(c == np.round(c)) and c.min() >= 0
    # Drawing n of n with replacement leaves each image out with probability (1 - 1/n)^n ~ 1/e; without
    # replacement nothing would be left out (every count 1).
    zeros = (c == 0).mean()
    assert zeros == pytest.approx((1 - 1 / n) ** n, abs=0.005)
    assert (c > 1).any() and np.isclose(c.mean(), 1.0)
    # each image is drawn Binomial(n, 1/n) times: mean 1, variance (1 - 1/n)
    assert c.var() == pytest.approx(1 - 1 / n, rel=0.03)


def test_counts_bootstrap_estimate_is_the_statistic_at_counts_of_one():
    v = np.random.default_rng(1).normal(size=50)
    calls = []

    def weighted_mean(c):
        calls.append(c.shape)
        return c @ v / c.sum(1)

    ci, boots = counts_bootstrap(weighted_mean, [50], 300, 0.9, 7)
    assert ci.estimate == pytest.approx(v.mean(), rel=1e-14) and calls == [(1, 50), (300, 50)]
    assert boots.shape == (300,) and ci.low < ci.estimate < ci.high and ci.n == 50 and ci.method.endswith("two-sample")
    assert (ci.low, ci.high) == tuple(np.quantile(boots, [0.05, 0.95]))
    # The same seed draws the same resamples; a paired bootstrap shares one draw between the sets.
    assert counts_bootstrap(weighted_mean, [50], 300, 0.9, 7)[0] == ci
    seen = []
    counts_bootstrap(lambda a, b: seen.append((a, b)) or a.sum(1), [50, 50], 10, 0.9, 0, paired=True)
    assert seen[1][0] is seen[1][1]
    with pytest.raises(UserError, match="one size"):
        counts_bootstrap(lambda a, b: a.sum(1), [5, 6], 10, 0.9, 0, paired=True)


def test_per_sample_intervals_have_width_and_bracket_the_estimate():
    g = np.random.default_rng(2)
    a = g.normal(1.0, 1.0, 80)
    b = a + g.normal(0.3, 0.2, 80)
    for ci in (bootstrap_ci(a, n_boot=500, seed=1), bootstrap_ci(a, np.median, 500, seed=1),
               paired_bootstrap_ci(b, a, n_boot=500, seed=1)):
        assert ci.low < ci.estimate < ci.high
    pd = paired_bootstrap_ci(b, a, n_boot=500, seed=1)
    assert pd.estimate == pytest.approx(0.3, abs=0.06) and "paired" in pd.method
    assert pd.high - pd.low < bootstrap_ci(b, n_boot=500, seed=1).high - bootstrap_ci(b, n_boot=500, seed=1).low
    assert bootstrap_ci(a, n_boot=10).std == pytest.approx(a.std(ddof=1))


def test_interval_scaling_and_significance():
    ci = percentile_interval(2.0, np.array([1.0, 1.5, 2.5, 3.0]), 4, 4, 0.5, 0, std=0.5)
    s = ci.scaled(100.0)
    assert (s.estimate, s.low, s.high, s.std) == (200.0, 100 * ci.low, 100 * ci.high, 50.0)
    assert ci.excludes(0.0) and not ci.excludes(2.0)
    with pytest.raises(UserError, match="positive"):
        ci.scaled(-1.0)
    assert sub_seed(0, "a") != sub_seed(0, "b") and sub_seed(0, "a") == sub_seed(0, "a")


def test_spectral_gap_intervals_bracket_and_use_one_function():
    g = np.random.default_rng(3)
    ref = g.uniform(0.5, 2.0, size=(40, 16))
    gen = ref * np.exp(g.normal(-0.4, 0.3, size=ref.shape))  # less energy, with noise per image
    for stat, direct in (("hf_gap_db", lambda a, b: hf_gap_db(a, b, 0.5)), ("lsd_db", log_spectral_distance)):
        for paired in (True, False):
            ci = gap_interval(gen, ref, stat, 0.5, 400, 0.95, 0, paired=paired)
            assert ci.low < ci.estimate < ci.high, (stat, paired)
            assert ci.estimate == pytest.approx(direct(gen, ref), rel=1e-12)
    # Pairing removes the shared per-image variation: the paired interval is narrower.
    p, u = (gap_interval(gen, ref, "hf_gap_db", 0.5, 400, 0.95, 0, paired=k) for k in (True, False))
    assert p.high - p.low < u.high - u.low
    assert lsd_db_rows(ref.mean(0, keepdims=True), ref.mean(0, keepdims=True))[0] == 0.0


def _gaussian_features(n, d, shift, seed):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)) @ (np.eye(d) + 0.3 * g.normal(size=(d, d))) + shift


def test_eig_frechet_distance_equals_the_sqrtm_reference():
    for d, seed in ((4, 0), (16, 1), (64, 2)):
        x, y = _gaussian_features(400, d, 0.0, seed), _gaussian_features(300, d, 0.5, seed + 10)
        stats = (*gaussian_stats(x), *gaussian_stats(y))
        assert frechet_distance_eig(*stats) == pytest.approx(frechet_distance(*stats), rel=1e-8)
        # and the reference's own definition, written out with scipy
        m1, s1, m2, s2 = stats
        ref = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance_eig(*stats) == pytest.approx(ref, rel=1e-8)


def test_weighted_gaussian_stats_equal_the_stats_of_the_repeated_features():
    x = _gaussian_features(30, 5, 1.0, 4)
    w = resample_counts(30, 1, np.random.default_rng(5))[0]
    repeated = np.repeat(x, w.astype(int), axis=0)
    mu, cov = gaussian_stats(x, w)
    assert np.allclose(mu, repeated.mean(0), atol=1e-12) and np.allclose(cov, np.cov(repeated, rowvar=False), atol=1e-12)
    assert np.allclose(gaussian_stats(x)[1], np.cov(x, rowvar=False), atol=1e-12)


def test_fd_replicates_equal_the_fd_of_explicit_resamples():
    x, y = _gaussian_features(60, 6, 0.0, 6), _gaussian_features(50, 6, 0.4, 7)
    g = np.random.default_rng(8)
    cx, cy = resample_counts(60, 5, g), resample_counts(50, 5, g)
    reps = fd_of_counts(x, y, cx, cy)
    for r in range(5):
        rx, ry = np.repeat(x, cx[r].astype(int), axis=0), np.repeat(y, cy[r].astype(int), axis=0)
        assert reps[r] == pytest.approx(frechet_distance(*gaussian_stats(rx), *gaussian_stats(ry)), rel=1e-8)
    # the unweighted statistic is frechet_distance itself
    ones = fd_of_counts(x, y, np.ones((1, 60)), np.ones((1, 50)))[0]
    assert ones == pytest.approx(frechet_distance(*gaussian_stats(x), *gaussian_stats(y)), rel=1e-8)


def test_fd_interval_brackets_its_estimate_on_its_scale():
    x, y = _gaussian_features(400, 4, 0.0, 9), _gaussian_features(400, 4, 0.6, 10)
    ci = fd_interval(x, y, 200, 0.95, 0)
    assert ci.estimate == pytest.approx(frechet_distance(*gaussian_stats(x), *gaussian_stats(y)), rel=1e-8)
    assert ci.low < ci.estimate < ci.high and ci.n == [400, 400]
    # Resamples repeat images: their FD is biased upward, by a small fraction of the estimate when n >> D; the raw
    # percentile interval lies around estimate + bias (a replicate formula off by a square root would not).
    assert 0 < ci.bootstrap_bias < 0.25 * ci.estimate
    lo, hi = ci.percentile_raw
    assert lo < ci.estimate + ci.bootstrap_bias < hi
    assert (ci.low, ci.high) == pytest.approx((lo - ci.bootstrap_bias, hi - ci.bootstrap_bias))
    shifted = bias_shifted(Interval(estimate=1.0, low=1.5, high=2.5, n=3, n_boot=3, confidence=0.9, seed=0),
                           np.array([1.5, 2.0, 2.5]))
    assert (shifted.low, shifted.high, shifted.bootstrap_bias) == (0.5, 1.5, 1.0)


def _mmd2_over_distinct_pairs(x, y, cx, cy, sigma, estimator):
    """MMD^2 of the explicit resamples: the draws listed one by one; the unbiased estimator averages the kernel
    over pairs of draws that come from different original images."""
    dx = np.repeat(np.arange(len(x)), cx.astype(int))
    dy = np.repeat(np.arange(len(y)), cy.astype(int))

    def k(a, b):
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)))

    def within(f, draws):
        pairs = [(i, j) for i, j in itertools.product(draws, draws)]
        if estimator == "unbiased":
            pairs = [(i, j) for i, j in pairs if i != j]
        return np.mean([k(f[i], f[j]) for i, j in pairs])

    cross = np.mean([k(x[i], y[j]) for i in dx for j in dy])
    return within(x, dx) + within(y, dy) - 2 * cross


def test_cmmd_replicates_equal_the_brute_force_statistic_over_distinct_pairs():
    g = np.random.default_rng(11)
    x, y = g.normal(size=(9, 3)), g.normal(size=(7, 3)) + 0.7
    cx, cy = resample_counts(9, 3, g), resample_counts(7, 3, g)
    kernels = (rbf_kernel(x, x, 2.0), rbf_kernel(y, y, 2.0), rbf_kernel(x, y, 2.0))
    for est in ("unbiased", "biased"):
        reps = mmd2_from_counts(*kernels, cx, cy, est)
        for r in range(3):
            assert reps[r] == pytest.approx(_mmd2_over_distinct_pairs(x, y, cx[r], cy[r], 2.0, est), rel=1e-10)
        assert mmd2_from_counts(*kernels, np.ones((1, 9)), np.ones((1, 7)), est)[0] == pytest.approx(
            mmd2_rbf(x, y, 2.0, est), rel=1e-12)


def test_cmmd_interval_brackets_its_estimate():
    g = np.random.default_rng(12)
    x, y = g.normal(size=(80, 8)), g.normal(size=(70, 8)) + 0.3
    ci = cmmd_interval(x, y, 10.0, 1000.0, "unbiased", 300, 0.95, 0)
    assert ci.estimate == pytest.approx(cmmd(x, y), rel=1e-12) and ci.low < ci.estimate < ci.high

"""Fréchet distance, CMMD and bootstrap CIs against closed forms."""

import numpy as np
import pytest
import torch

from dmd_dar.metrics.availability import MetricUnavailable, try_metric
from dmd_dar.metrics.bootstrap import bootstrap_ci, paired_bootstrap_ci
from dmd_dar.metrics.distribution import (
    FeatureAccumulator,
    FeatureExtractor,
    InceptionFeatures,
    cmmd,
    distribution_metrics,
    frechet_distance,
    gaussian_stats,
    mmd2_rbf,
)


def exact_moments(n, mean, cov, seed):
    """Samples whose *sample* mean and covariance (n - 1) equal ``mean`` and ``cov`` exactly."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: sample cov = I
    return mean + z @ np.linalg.cholesky(cov).T


def random_rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_closed_forms():
    d = 6
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    closed = float(((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # A common rotation commutes with everything: the distance is unchanged for non-diagonal covariances.
    q = random_rotation(d, 1)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(q @ m1, s1, q @ m2, s2) == pytest.approx(closed, rel=1e-8)
    # Features with exactly these moments give exactly this distance, also through the accumulator.
    f1, f2 = exact_moments(50, q @ m1, s1, 2), exact_moments(40, q @ m2, s2, 3)
    assert frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2)) == pytest.approx(closed, rel=1e-8)
    acc1, acc2 = FeatureAccumulator(), FeatureAccumulator()
    acc1.update_features(f1[:17])
    acc1.update_features(f1[17:])
    acc2.update_features(torch.from_numpy(f2))
    assert distribution_metrics(acc1, acc2)["fd"] == pytest.approx(closed, rel=1e-8)
    # Identical statistics: ~0, also for a singular covariance (fewer samples than dimensions).
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)
    few = rng.standard_normal((3, d))
    assert frechet_distance(*gaussian_stats(few), *gaussian_stats(few)) == pytest.approx(0.0, abs=1e-4)


def test_mmd_matches_brute_force_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.5
    k = lambda a, b: np.exp(-((a - b) ** 2).sum() / (2 * 1.5**2))  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kyy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kxy = sum(k(a, b) for a in x for b in y) / 35
    assert mmd2_rbf(x, y, 1.5, block=3) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)
    biased = (sum(k(a, b) for a in x for b in x) / 49 + sum(k(a, b) for a in y for b in y) / 25 - 2 * kxy)
    assert mmd2_rbf(x, y, 1.5, "biased") == pytest.approx(biased, rel=1e-10)
    # CMMD scale on unit-norm embeddings: identical distributions ~ 0, mean shift increases it monotonically.
    base = rng.standard_normal((400, 16))
    ref = rng.standard_normal((400, 16))
    vals = []
    for shift in (0.0, 1.0, 2.0, 4.0):
        z = base.copy()
        z[:, 0] += shift
        vals.append(cmmd(z / np.linalg.norm(z, axis=1, keepdims=True),
                         ref / np.linalg.norm(ref, axis=1, keepdims=True)))
    assert abs(vals[0]) < 0.05 and vals[0] < vals[1] < vals[2] < vals[3]
    assert cmmd(base, base, estimator="biased") == pytest.approx(0.0, abs=1e-9)


class TinyExtractor:
    name = "tiny-random-conv"

    def __init__(self):
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten())

    def __call__(self, images):
        return self.net(images)

    def protocol(self):
        return {"name": self.name}


def test_feature_accumulator_halves_merge_equals_one_pass():
    ext = TinyExtractor()
    assert isinstance(ext, FeatureExtractor)
    imgs = torch.rand(10, 3, 16, 16) * 2 - 1
    full, a, b = FeatureAccumulator(ext), FeatureAccumulator(ext), FeatureAccumulator(ext)
    full.update(imgs)
    a.update(imgs[:4])
    b.update(imgs[4:])
    merged = FeatureAccumulator(ext).merge_state(a.state_dict()).merge_state(b.state_dict())
    np.testing.assert_allclose(merged.stats.mean, full.stats.mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(merged.stats.cov(), full.stats.cov(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(merged.features(), full.features())
    ref = FeatureAccumulator(ext)
    ref.update(torch.rand(6, 3, 16, 16) * 2 - 1)
    m1, m2 = distribution_metrics(merged, ref), distribution_metrics(full, ref)
    assert m1["fd"] == pytest.approx(m2["fd"], rel=1e-9) and m1["cmmd"] == pytest.approx(m2["cmmd"], rel=1e-9)
    assert m1["protocol"]["samples"]["feature_extractor"]["name"] == "tiny-random-conv"


def test_inception_without_weights_is_unavailable(tmp_path):
    missing = tmp_path / "inception.safetensors"
    with pytest.raises(MetricUnavailable) as err:
        InceptionFeatures(missing)
    assert err.value.needs == str(missing) and err.value.metric == "fd_inception"
    result, record = try_metric("fd_inception", InceptionFeatures, missing)
    assert result is None and record["available"] is False and record["needs"] == str(missing)


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(2.0, 1.0, 400)
    ci = bootstrap_ci(v, n_boot=500, seed=3)
    assert ci == bootstrap_ci(v, n_boot=500, seed=3)
    assert ci.low < ci.estimate < ci.high and ci.estimate == pytest.approx(v.mean())
    # Percentile CI of a mean ~ estimate +- 1.96 s / sqrt(n).
    assert ci.high - ci.low == pytest.approx(2 * 1.96 * v.std(ddof=1) / 20, rel=0.15)
    med = bootstrap_ci(v, statistic=lambda a: float(np.median(a)), n_boot=100, seed=0)
    assert med.low <= med.estimate <= med.high
    # Paired: shared per-sample noise cancels, so the paired CI is far tighter than the unpaired spread.
    b = v + 0.1 + rng.normal(0, 0.01, 400)
    pci = paired_bootstrap_ci(b, v, n_boot=500)
    assert pci.low < 0.1 < pci.high and pci.high - pci.low < 0.01

"""Spectral metrics against closed forms (eval_anchors §3.2, §8)."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dmd_dar.errors import UserError
from dmd_dar.metrics.spectral import (
    SpectralAccumulator,
    band_ratio,
    bin_centers,
    compare_spectra,
    hf_gap_db,
    hf_ratio,
    log_spectral_distance,
    paired_log_hf_ratio,
    radial_frequency,
    rapsd,
    slope,
    spectral_stats,
    spectral_stats_numpy,
)


def white(n=8, h=128, w=128, c=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, h, w) if c is None else (n, c, h, w)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def power_law_noise(n, size, alpha, seed=0):
    """Noise whose PSD is proportional to rho^-alpha (FFT amplitude shaping, random phase)."""
    rng = np.random.default_rng(seed)
    rho = radial_frequency(size, size).numpy()
    amp = np.where(rho > 0, rho, 1.0) ** (-alpha / 2)
    amp[0, 0] = 0.0
    spec = np.fft.fft2(rng.standard_normal((n, size, size))) * amp
    return np.fft.ifft2(spec).real


def disk_fraction(h, w, c):
    rho = radial_frequency(h, w)
    disk = (rho > 0) & (rho <= 1)
    return float(((rho >= c) & disk).sum() / disk.sum())


def test_torch_and_numpy_paths_agree_rgb_and_non_square():
    x = white(3, 40, 56, c=3).clamp(-1, 1)
    st, sn = spectral_stats(x, bins=16), spectral_stats_numpy(x.numpy(), bins=16)
    assert st.keys() == sn.keys()
    for k in st:
        np.testing.assert_allclose(st[k].numpy(), sn[k], rtol=1e-10, atol=1e-12, equal_nan=True)


def test_white_noise_is_flat_and_hf_ratio_is_annulus_area():
    x = white(8, 128, 128)
    st = spectral_stats(x, bins=32, value_range=None)
    for c in (0.25, 0.5, 0.75):
        hf = float(st[f"hf_ratio@{c:g}"].mean())
        assert hf == pytest.approx(1 - c * c, abs=0.015)
        assert hf == pytest.approx(disk_fraction(128, 128, c), abs=0.01)
    curve = st["rapsd"].mean(0)
    # Hann normalisation by sum(w^2): a flat PSD at the noise variance (1 here).
    assert float(curve.mean()) == pytest.approx(1.0, rel=0.02)
    hi = curve[bin_centers(32) > 0.25]  # enough pixels per bin there for a 10% bound
    assert torch.allclose(hi, torch.ones_like(hi), rtol=0.1)
    assert abs(float(slope(curve))) < 0.05
    rho = radial_frequency(128, 128)
    area = float(((rho >= 0.5) & (rho <= 1)).sum() / ((rho >= 0.125) & (rho < 0.5)).sum())
    assert area == pytest.approx(0.75 / 0.234375, rel=0.02)  # continuum value 3.2
    # Per-image ratios of ~1e3 Hann-correlated samples: ~4% spread over seeds, slightly biased up (E[A/B]).
    assert float(st["band_ratio"].mean()) == pytest.approx(area, rel=0.05)


def test_non_square_white_noise():
    x = white(6, 96, 160)
    for c in (0.25, 0.5, 0.75):
        assert float(hf_ratio(x, c, value_range=None).mean()) == pytest.approx(1 - c * c, abs=0.015)


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_gaussian_blur_matches_closed_form(sigma):
    # 256 px: the Hann window's leakage biases a steep spectrum upwards by O(1/N) (~1.5% here, ~4% at 128).
    w = white(4, 256, 256).numpy()
    b = np.stack([gaussian_filter(i, sigma, mode="wrap") for i in w])
    a = math.pi**2 * sigma**2
    expected = (math.exp(-a * 0.25) - math.exp(-a)) / (1 - math.exp(-a))
    assert float(hf_ratio(b, 0.5, value_range=None).mean()) == pytest.approx(expected, rel=0.04)
    # Fall-off: |H|^2 = exp(-4 pi^2 sigma^2 f^2), f = rho / 2, so log(P_blur / P_white) = -pi^2 sigma^2 rho^2.
    ratio = rapsd(b, 32, value_range=None).mean(0) / rapsd(w, 32, value_range=None).mean(0)
    rho = bin_centers(32)
    sel = (rho > 0.1) & (rho < 0.6)
    fit = np.polyfit(rho[sel].numpy() ** 2, torch.log(ratio[sel]).numpy(), 1)[0]
    assert fit == pytest.approx(-a, rel=0.05)


@pytest.mark.parametrize("diagonal", [False, True])
def test_sinusoid_energy_lands_in_its_radius_bin(diagonal):
    n = 128
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                            indexing="ij")
    for rho0, side in ((0.4, 0.0), (0.6, 1.0)):
        f = rho0 / 2  # cycles / px
        fx, fy = (f / math.sqrt(2), f / math.sqrt(2)) if diagonal else (f, 0.0)
        img = torch.cos(2 * math.pi * (fx * xx + fy * yy))[None]
        assert float(hf_ratio(img, 0.5, value_range=None)) == pytest.approx(side, abs=1e-3)
        curve = rapsd(img, 64, value_range=None)[0]
        peak = float(bin_centers(64)[torch.nan_to_num(curve).argmax()])
        assert abs(peak - rho0) <= 1.5 / 64


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_power_law_noise_recovers_slope_and_band_ratio(alpha):
    x = power_law_noise(4, 256, alpha)
    st = spectral_stats(x, bins=64, value_range=None)
    assert float(slope(st["rapsd"].mean(0))) == pytest.approx(-alpha, abs=0.05)
    assert float(st["slope"].mean()) == pytest.approx(-alpha, abs=0.08)
    e = 2 - alpha
    expected = (1 - 0.5**e) / (0.5**e - 0.125**e) if e else math.log(2) / math.log(4)
    assert float(st["band_ratio"].mean()) == pytest.approx(expected, rel=0.05)


def test_invariance_to_affine_rotation_and_transpose():
    x = white(4, 64, 64, c=3).clamp(-1, 1)
    a, b = 0.37, 0.2
    s0, s1 = spectral_stats(x, 16), spectral_stats(a * x + b, 16)
    for k in ("hf_ratio@0.25", "hf_ratio@0.5", "hf_ratio@0.75", "band_ratio", "slope"):
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s1["rapsd"], a * a * s0["rapsd"], rtol=1e-9, atol=1e-15)
    for y in (x.transpose(-1, -2), torch.rot90(x, 1, (-2, -1))):
        torch.testing.assert_close(hf_ratio(y), hf_ratio(x), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(band_ratio(y), band_ratio(x), rtol=1e-9, atol=1e-12)


def test_gap_lsd_and_paired_log_ratio():
    w = white(6, 64, 64).numpy()
    b = np.stack([gaussian_filter(i, 1.0, mode="wrap") for i in w])
    assert hf_gap_db(w, w) == 0.0 and log_spectral_distance(w, w) == 0.0
    gap = hf_gap_db(b, w, 0.5)
    assert gap < -10  # blur removes >90% of the power above half Nyquist
    assert log_spectral_distance(b, w) > 0
    lr = paired_log_hf_ratio(b, w, 0.5)
    assert lr.shape == (6,) and bool((lr < 0).all())
    torch.testing.assert_close(paired_log_hf_ratio(w, w), torch.zeros(6, dtype=torch.float64))


def test_accumulator_halves_merge_equals_one_pass_and_pairs_by_key():
    x = white(8, 32, 48, c=3).clamp(-1, 1)
    keys = [("class", i % 2, 100 + i, i) for i in range(8)]
    groups = [i % 2 for i in range(8)]
    full = SpectralAccumulator(bins=16)
    full.update(x, keys, groups)
    a, b = SpectralAccumulator(bins=16), SpectralAccumulator(bins=16)
    a.update(x[:3], keys[:3], groups[:3])
    b.update(x[3:], keys[3:], groups[3:])
    merged = SpectralAccumulator(bins=16).merge_state(a.state_dict()).merge_state(b.state_dict())
    ra, rf = merged.compute(), full.compute()
    assert ra["n"] == 8 and ra.keys() == rf.keys()
    np.testing.assert_allclose(ra["mean_rapsd"], rf["mean_rapsd"], rtol=1e-12)
    assert ra["hf_ratio@0.5"]["mean"] == pytest.approx(rf["hf_ratio@0.5"]["mean"], rel=1e-12)
    assert set(rf["per_group"]["band_ratio"]) == {"0", "1"}
    # Teacher = blurred copy, given in reverse order: pairing goes by key, not position.
    t = SpectralAccumulator(bins=16)
    blurred = torch.from_numpy(np.stack([gaussian_filter(i.numpy(), (0, 1, 1), mode="wrap") for i in x]))
    t.update(blurred.flip(0), keys[::-1], groups[::-1])
    cmp = compare_spectra(t, full, paired=True)
    assert cmp["hf_gap_db"] < 0 and cmp["paired_log_hf_ratio"]["n"] == 8
    assert cmp["paired_log_hf_ratio"]["mean"] < 0
    with pytest.raises(UserError):
        SpectralAccumulator(bins=16).merge(SpectralAccumulator(bins=8))

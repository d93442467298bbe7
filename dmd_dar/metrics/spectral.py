"""High-frequency spectral energy: RAPSD and the scalars derived from it (eval_anchors §3.2).

Definition, per image, in float64:

1. luma ``Y = 0.299 R + 0.587 G + 0.114 B`` of the image mapped to [0, 1] (``channels="mean"`` instead averages
   the per-channel PSDs; a 1-channel or ``[N, H, W]`` input is used as is);
2. ``Y <- Y - mean(Y)``;
3. separable *symmetric* Hann window ``w = hann(H) (x) hann(W)`` (``torch.hann_window(periodic=False)``);
4. ``P(u, v) = |FFT2(Y w)|^2 / sum(w^2)``, so zero-mean white noise of variance s^2 has a flat E[P] = s^2;
5. radius in fraction of Nyquist ``rho = sqrt(fx^2 + fy^2) / 0.5`` with ``fx, fy = fftfreq(W), fftfreq(H)``; only
   the inscribed disk ``0 < rho <= 1`` is used (non-square images work the same way);
6. RAPSD: the mean of P over ``B`` equal-width bins ``(b/B, (b+1)/B]`` of rho (NaN for a bin with no frequency
   sample, which happens only for tiny images).

Scalars: ``hf_ratio(c) = sum_{c<=rho<=1} P / sum_{0<rho<=1} P``; ``band_ratio = sum_{0.5<=rho<=1} P /
sum_{0.125<=rho<0.5} P``; ``slope``: least-squares slope of log RAPSD vs log rho over bin centres in [0.1, 0.9];
gap vs a reference ``D(rho_b) = 10 log10(RAPSD_gen / RAPSD_ref)`` in dB, ``hf_gap_db = mean_{rho_b >= c} D``,
``log_spectral_distance = mean_b |D|``; paired ``log(hf_ratio(student_i) / hf_ratio(teacher_i))``.

Everything has a torch path (used by the accumulator) and a plain numpy reference path (``*_numpy``) that agree to
~1e-12. Ratios are invariant to ``x -> a x + b`` (a > 0); compare absolute RAPSD levels only between image sets
given in the same value range.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch

from dmd_dar.errors import UserError
from dmd_dar.metrics._accum import SampleAccumulator
from dmd_dar.metrics.bootstrap import Interval, counts_bootstrap
from dmd_dar.metrics.pairing import group_summary, pair_by_key
from dmd_dar.metrics.protocol import package_versions

LUMA_BT601 = (0.299, 0.587, 0.114)
DEFAULT_BINS = 64
DEFAULT_CUTOFFS = (0.25, 0.5, 0.75)
SLOPE_RANGE = (0.1, 0.9)
BAND_LOW = (0.125, 0.5)  # [lo, hi) denominator band of band_ratio
BAND_HIGH = (0.5, 1.0)  # [lo, hi] numerator band
_CHANNEL_MODES = ("luma", "mean")

__all__ = [
    "GAP_STATISTICS", "LUMA_BT601", "SpectralAccumulator", "band_ratio", "bin_centers", "compare_spectra",
    "gap_db_rows", "gap_interval", "group_summary", "hann2d", "hf_gap_db", "hf_gap_db_rows", "hf_ratio",
    "lsd_db_rows", "log_spectral_distance", "paired_log_hf_ratio", "psd2d",
    "radial_frequency", "rapsd", "rapsd_numpy", "spectral_gap_db", "spectral_stats", "spectral_stats_numpy",
    "slope", "spectral_protocol",
]


# ----------------------------------------------------------------------------------------------- torch path


def _to_planes(images: Any, channels: str, value_range: tuple[float, float] | None) -> torch.Tensor:
    """Images -> float64 planes ``[N, K, H, W]`` whose PSDs are averaged (K = 1 for luma / grey).

    Only the *scale* of the ``value_range -> [0, 1]`` map is applied (folded into the luma weights): its offset is
    a constant per plane, which the mean removal that always follows cancels exactly in exact arithmetic.
    """
    if channels not in _CHANNEL_MODES:
        raise UserError(f"spectral channels={channels!r} is not one of {_CHANNEL_MODES}")
    x = torch.as_tensor(images).to(torch.float64)
    if x.ndim == 2:
        x = x[None, None]  # [1, 1, H, W]
    elif x.ndim == 3:
        x = x[:, None]  # [N, 1, H, W]: already grey / luma
    elif x.ndim != 4:
        raise UserError(f"spectral metrics take images [N, C, H, W] or [N, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise UserError(f"spectral metrics take 1 or 3 channels, got {x.shape[1]}")
    scale = 1.0 if value_range is None else 1.0 / (value_range[1] - value_range[0])
    if x.shape[1] == 3 and channels == "luma":
        w = torch.tensor([c * scale for c in LUMA_BT601], dtype=torch.float64, device=x.device)
        return torch.einsum("nchw,c->nhw", x, w)[:, None]  # [N, 1, H, W]
    return x * scale if scale != 1.0 else x


def _windowed_fft(images: Any, channels: str, value_range: tuple[float, float] | None,
                  half: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(``FFT2(Y w)`` ``[N, K, H, W]`` complex128, or its ``rfft2`` half ``[N, K, H, W // 2 + 1]``; ``sum(w^2)``;
    the image width ``W``)."""
    x = _to_planes(images, channels, value_range)  # [N, K, H, W]
    h, w = x.shape[-2:]
    win = _hann2d_cached(h, w, str(x.device))  # [H, W]
    x = (x - x.mean(dim=(-2, -1), keepdim=True)).mul_(win)
    f = torch.fft.rfft2(x) if half else torch.fft.fft2(x)
    return f, _hann_energy(h, w, str(x.device)), w


def _abs2(f: torch.Tensor) -> torch.Tensor:
    """``|f|^2`` of a complex tensor (real dtype), as ``re^2 + im^2``."""
    return torch.view_as_real(f).square().sum(dim=-1)


def hann2d(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable symmetric Hann window ``[H, W]`` (float64), equal to ``outer(np.hanning(H), np.hanning(W))``."""
    wh = torch.hann_window(h, periodic=False, dtype=torch.float64, device=device)  # [H]
    ww = torch.hann_window(w, periodic=False, dtype=torch.float64, device=device)  # [W]
    return wh[:, None] * ww[None, :]


@lru_cache(maxsize=16)
def _hann2d_cached(h: int, w: int, device: str) -> torch.Tensor:
    return hann2d(h, w, device)


@lru_cache(maxsize=16)
def _hann_energy(h: int, w: int, device: str) -> torch.Tensor:
    """``sum(w^2)`` of the 2-D window, a 0-d float64 tensor on ``device``."""
    return (_hann2d_cached(h, w, device) ** 2).sum()


def psd2d(images: Any, channels: str = "luma", value_range: tuple[float, float] | None = (-1.0, 1.0)) -> torch.Tensor:
    """Windowed power spectral density ``[N, H, W]`` (unshifted FFT layout), normalised by ``sum(w^2)``."""
    f, energy, _ = _windowed_fft(images, channels, value_range, half=False)  # [N, K, H, W]
    return (_abs2(f) / energy).mean(dim=1)  # [N, H, W]


def radial_frequency(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``rho [H, W]``: radial frequency as a fraction of Nyquist, in FFT layout (0 at [0, 0])."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=device)  # [H] cycles / px
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=device)  # [W]
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5


def bin_centers(bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Centres ``[B]`` of the rho bins ``(b/B, (b+1)/B]``."""
    return (torch.arange(bins, dtype=torch.float64) + 0.5) / bins


class _RadialLayout(NamedTuple):
    """How the ``rfft2`` half-plane of an ``H x W`` PSD reduces to every spectral sum, for fixed bins and cutoffs.

    Every half-plane sample gets an *atom* id: samples with the same bin, the same membership in every
    threshold set (each cutoff, both bands) and the same Hermitian weight share an atom; samples outside the
    disk ``0 < rho <= 1`` go to one extra atom that nothing reads. One ``index_add_`` sums the PSD per atom
    (``[N, A + 1]``), then ``atom_sums[:, :A] @ proj`` gives all the sums at once. The Hermitian weight (2 for a
    column whose mirror ``-k`` lies in the discarded half, 1 for the self-mirrored columns ``k_x = 0`` and
    ``k_x = W / 2``) is folded into ``proj``, so the sums equal those over the full ``H x W`` plane (``P(-k) =
    P(k)`` for real images; ``rho(-k) = rho(k)`` exactly).
    """

    atom: torch.Tensor  # [H * (W // 2 + 1)] long: atom id per half-plane sample (A = outside the disk)
    proj: torch.Tensor  # [A, B + K + 3] float64: atom -> (B bin sums, K cutoff sums, band high, band low, total)
    counts: torch.Tensor  # [B] float64: full-plane samples per bin


@lru_cache(maxsize=32)
def _radial_layout(h: int, w: int, bins: int, cutoffs: tuple[float, ...], device: str) -> _RadialLayout:
    """The cached :class:`_RadialLayout` for ``(H, W, bins, cutoffs)`` on ``device`` (built once, on the CPU)."""
    wr = w // 2 + 1
    rho_full = radial_frequency(h, w)  # [H, W]
    rho = rho_full[:, :wr].reshape(-1)  # [L]: the rfft2 columns are fftfreq(W)[:W // 2 + 1]
    col = torch.arange(wr).repeat(h)  # [L]
    weight = torch.where((col == 0) | (2 * col == w), 1, 2)  # [L] Hermitian multiplicity
    inside = (rho > 0) & (rho <= 1)
    b = (torch.ceil(rho * bins) - 1).clamp_(0, bins - 1).long()  # bin (b/B, (b+1)/B] holds rho
    members = [rho >= c for c in cutoffs]  # hf_ratio@c numerators (rho <= 1 is the disk)
    members += [(rho >= BAND_HIGH[0]) & (rho <= BAND_HIGH[1]), (rho >= BAND_LOW[0]) & (rho < BAND_LOW[1])]
    key = torch.stack([b, weight, *(m.long() for m in members)], dim=1)[inside]  # [M, 2 + K + 2]
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)  # atoms [A, 2 + K + 2], [M]
    n_atoms, n_cut = uniq.shape[0], len(cutoffs)
    atom = torch.full((rho.numel(),), n_atoms, dtype=torch.long)
    atom[inside] = inv
    wt = uniq[:, 1].to(torch.float64)  # [A]
    proj = torch.zeros(n_atoms, bins + n_cut + 3, dtype=torch.float64)
    proj[torch.arange(n_atoms), uniq[:, 0]] = wt
    proj[:, bins:bins + n_cut + 2] = uniq[:, 2:].to(torch.float64) * wt[:, None]
    proj[:, -1] = wt  # total over the disk
    full = rho_full[(rho_full > 0) & (rho_full <= 1)]
    counts = torch.bincount((torch.ceil(full * bins) - 1).clamp_(0, bins - 1).long(), minlength=bins)
    size = torch.bincount(inv, minlength=n_atoms).to(torch.float64)  # [A] half-plane samples per atom
    if not torch.equal(counts.to(torch.float64), size @ proj[:, :bins]):  # Hermitian bookkeeping check
        raise AssertionError(f"spectral half-plane layout does not cover the full {h}x{w} plane")
    return _RadialLayout(atom.to(device), proj.to(device), counts.to(torch.float64).to(device))


def _slope_rows(curves: torch.Tensor, centers: torch.Tensor, fit_range: tuple[float, float]) -> torch.Tensor:
    """Least-squares slope of log(curve) vs log(centre), per row, over finite positive bins in ``fit_range``."""
    c = curves.reshape(-1, curves.shape[-1])  # [R, B]
    sel = (centers >= fit_range[0]) & (centers <= fit_range[1])  # [B]
    m = (sel[None, :] & torch.isfinite(c) & (c > 0)).to(torch.float64)  # [R, B]
    x = torch.log(centers)[None, :].expand_as(c)
    y = torch.where(m > 0, torch.log(torch.where(m > 0, c, torch.ones_like(c))), torch.zeros_like(c))
    n, sx, sy = m.sum(1), (m * x).sum(1), (m * y).sum(1)
    sxx, sxy = (m * x * x).sum(1), (m * x * y).sum(1)
    den = n * sxx - sx**2
    out = (n * sxy - sx * sy) / den
    out = torch.where((n >= 2) & (den > 0), out, torch.full_like(out, math.nan))
    return out.reshape(curves.shape[:-1])


def spectral_stats(images: Any, bins: int = DEFAULT_BINS, cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
                   channels: str = "luma", value_range: tuple[float, float] | None = (-1.0, 1.0),
                   slope_range: tuple[float, float] = SLOPE_RANGE) -> dict[str, torch.Tensor]:
    """All per-image spectral quantities from one FFT: ``{"rapsd": [N, B], "hf_ratio@c": [N] for each cutoff,
    "band_ratio": [N], "slope": [N], "total_power": [N]}`` (float64)."""
    cutoffs = tuple(float(c) for c in cutoffs)
    f, energy, w = _windowed_fft(images, channels, value_range, half=True)  # [N, K, H, W // 2 + 1]
    n, k, h, wr = f.shape
    lay = _radial_layout(h, w, bins, cutoffs, str(f.device))
    power = _abs2(f).reshape(n * k, h * wr)  # [N K, L] unnormalised
    n_atoms = lay.proj.shape[0]
    atoms = torch.zeros(n * k, n_atoms + 1, dtype=torch.float64, device=f.device).index_add_(1, lay.atom, power)
    sums = (atoms[:, :n_atoms] @ lay.proj).reshape(n, k, -1).mean(dim=1) / energy  # [N, B + K + 3]
    counts = lay.counts
    curves = torch.where(counts > 0, sums[:, :bins] / counts.clamp_min(1), torch.full_like(sums[:, :bins], math.nan))
    total = sums[:, -1]  # [N]
    out: dict[str, torch.Tensor] = {"rapsd": curves, "total_power": total}
    for i, c in enumerate(cutoffs):
        out[f"hf_ratio@{c:g}"] = sums[:, bins + i] / total
    out["band_ratio"] = sums[:, bins + len(cutoffs)] / sums[:, bins + len(cutoffs) + 1]
    out["slope"] = _slope_rows(curves, bin_centers(bins).to(f.device), slope_range)
    return out


def rapsd(images: Any, bins: int = DEFAULT_BINS, channels: str = "luma",
          value_range: tuple[float, float] | None = (-1.0, 1.0)) -> torch.Tensor:
    """Radially averaged PSD ``[N, B]`` (float64) of images ``[N, C, H, W]`` (``[-1, 1]`` by default)."""
    return spectral_stats(images, bins, (), channels, value_range)["rapsd"]


def hf_ratio(images: Any, c: float = 0.5, channels: str = "luma",
             value_range: tuple[float, float] | None = (-1.0, 1.0)) -> torch.Tensor:
    """Per-image fraction of spectral energy at ``c <= rho <= 1`` (of the disk ``0 < rho <= 1``): ``[N]``."""
    return spectral_stats(images, 1, (c,), channels, value_range)[f"hf_ratio@{c:g}"]


def band_ratio(images: Any, channels: str = "luma",
               value_range: tuple[float, float] | None = (-1.0, 1.0)) -> torch.Tensor:
    """Per-image ``E[0.5, 1] / E[0.125, 0.5)``: resolution-independent for power-law spectra. ``[N]``."""
    return spectral_stats(images, 1, (), channels, value_range)["band_ratio"]


def slope(curves: torch.Tensor, fit_range: tuple[float, float] = SLOPE_RANGE) -> torch.Tensor:
    """Log-log slope of RAPSD curves ``[..., B]`` over bin centres in ``fit_range`` (a 1/f^a spectrum gives -a)."""
    curves = torch.as_tensor(curves, dtype=torch.float64)
    return _slope_rows(curves, bin_centers(curves.shape[-1]).to(curves.device), fit_range)


def _mean_curve(x: Any, bins: int | None) -> torch.Tensor:
    """A mean RAPSD curve ``[B]`` from a curve (1-D), curves ``[N, B]`` (2-D) or images (3-D / 4-D)."""
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.ndim == 1:
        return t
    if t.ndim == 2:
        return t.mean(dim=0)
    return rapsd(t, bins or DEFAULT_BINS).mean(dim=0)


def gap_db_rows(samples: Any, reference: Any) -> np.ndarray:
    """``10 log10(samples / reference)`` per bin for rows of mean curves ``[R, B]``, ``[R, B]`` -> ``[R, B]``
    (float64 numpy; a bin where either curve is 0 or NaN gives a non-finite gap, which the means below skip)."""
    g, r = np.asarray(samples, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if g.shape != r.shape:
        raise UserError(f"spectral gap needs curves with the same bins, got {g.shape} vs {r.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(g / r)


def hf_gap_db_rows(samples: Any, reference: Any, c: float = 0.5) -> np.ndarray:
    """HF gap per row ``[R]``: the mean of :func:`gap_db_rows` over the finite bins with centre ``>= c``."""
    d = gap_db_rows(samples, reference)  # [R, B]
    keep = (bin_centers(d.shape[-1]).numpy() >= c)[None] & np.isfinite(d)
    with np.errstate(invalid="ignore"):
        return np.where(keep, d, 0.0).sum(-1) / keep.sum(-1)


def lsd_db_rows(samples: Any, reference: Any) -> np.ndarray:
    """Log-spectral distance per row ``[R]``: the mean of ``|gap_db_rows|`` over the finite bins."""
    d = gap_db_rows(samples, reference)  # [R, B]
    keep = np.isfinite(d)
    with np.errstate(invalid="ignore"):
        return np.where(keep, np.abs(d), 0.0).sum(-1) / keep.sum(-1)


GAP_STATISTICS = {"hf_gap_db": hf_gap_db_rows, "lsd_db": lambda g, r, c: lsd_db_rows(g, r)}


def _mean_rows(samples: Any, reference: Any, bins: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The two dataset spectra as one-row numpy arrays ``[1, B]`` (inputs as in :func:`spectral_gap_db`)."""
    return tuple(_mean_curve(x, bins)[None].cpu().numpy() for x in (samples, reference))


def spectral_gap_db(samples: Any, reference: Any, bins: int | None = None) -> torch.Tensor:
    """``10 log10(RAPSD_gen / RAPSD_ref)`` per bin ``[B]`` (dB). Inputs: mean curves ``[B]``, per-image curves
    ``[N, B]`` or images; dataset spectra are means of per-image RAPSDs."""
    return torch.from_numpy(gap_db_rows(*_mean_rows(samples, reference, bins))[0])


def hf_gap_db(samples: Any, reference: Any, c: float = 0.5, bins: int | None = None) -> float:
    """Mean gap in dB over bins with centre ``>= c``; negative = the samples miss high-frequency energy."""
    return float(hf_gap_db_rows(*_mean_rows(samples, reference, bins), c)[0])


def log_spectral_distance(samples: Any, reference: Any, bins: int | None = None) -> float:
    """``mean_b |gap_b|`` in dB over every (finite) bin of ``(0, 1]``."""
    return float(lsd_db_rows(*_mean_rows(samples, reference, bins))[0])


def gap_interval(samples: Any, reference: Any, statistic: str, c: float, n_boot: int, confidence: float, seed: int,
                 paired: bool = False) -> Interval:
    """Bootstrap interval of a gap statistic (``hf_gap_db`` or ``lsd_db``) between two sets' mean RAPSDs.

    ``samples [N, B]`` and ``reference [M, B]`` are per-image RAPSD curves. The statistic of resample counts
    ``(cs, cr)`` is the gap of the count-weighted mean curves, so the estimate (counts of one) and every
    replicate are the same function; with ``paired`` (N == M, row i of each from the same noise and condition)
    both sets are resampled with one draw.
    """
    if statistic not in GAP_STATISTICS:
        raise UserError(f"gap statistic {statistic!r} is not one of {sorted(GAP_STATISTICS)}")
    g = torch.as_tensor(samples, dtype=torch.float64).cpu().numpy()
    r = torch.as_tensor(reference, dtype=torch.float64).cpu().numpy()
    row_stat = GAP_STATISTICS[statistic]

    def of_counts(cs: np.ndarray, cr: np.ndarray) -> np.ndarray:
        return row_stat(cs @ g / len(g), cr @ r / len(r), c)  # weighted mean curves [R, B] -> [R]

    interval, _ = counts_bootstrap(of_counts, [len(g), len(r)], n_boot, confidence, seed, paired)
    return interval


def paired_log_hf_ratio(student: Any, teacher: Any, c: float = 0.5) -> torch.Tensor:
    """Per-pair ``log(hf_ratio(student_i) / hf_ratio(teacher_i))`` ``[N]``: pass paired images (same noise and
    condition, same order) or per-sample hf ratios ``[N]``. Its mean < 0 means the student lost detail."""
    s, t = (torch.as_tensor(v, dtype=torch.float64) for v in (student, teacher))
    s = s if s.ndim == 1 else hf_ratio(s, c)
    t = t if t.ndim == 1 else hf_ratio(t, c)
    if s.shape != t.shape:
        raise UserError(f"paired spectral ratio needs as many student as teacher samples, got {s.numel()} vs {t.numel()}")
    return torch.log(s / t)


# ----------------------------------------------------------------------------------------------- numpy path


def _to_planes_numpy(images: Any, channels: str, value_range: tuple[float, float] | None) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    if value_range is not None:
        x = (x - value_range[0]) / (value_range[1] - value_range[0])
    if x.shape[1] == 3 and channels == "luma":
        x = (LUMA_BT601[0] * x[:, 0] + LUMA_BT601[1] * x[:, 1] + LUMA_BT601[2] * x[:, 2])[:, None]
    return x


def spectral_stats_numpy(images: Any, bins: int = DEFAULT_BINS, cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
                         channels: str = "luma", value_range: tuple[float, float] | None = (-1.0, 1.0),
                         slope_range: tuple[float, float] = SLOPE_RANGE) -> dict[str, np.ndarray]:
    """Reference implementation of :func:`spectral_stats` in plain numpy (independent code, same definition)."""
    x = _to_planes_numpy(images, channels, value_range)
    n, _, h, w = x.shape
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    win = np.outer(np.hanning(h), np.hanning(w))
    p = (np.abs(np.fft.fft2(x * win)) ** 2 / np.sum(win**2)).mean(axis=1)  # [N, H, W]
    fy, fx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    rho = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    disk = (rho > 0) & (rho <= 1)
    r = rho[disk]
    pd = p[:, disk]  # [N, M]
    b = np.clip(np.ceil(r * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(b, minlength=bins).astype(np.float64)
    curves = np.stack([np.bincount(b, weights=row, minlength=bins) for row in pd])
    with np.errstate(invalid="ignore", divide="ignore"):
        curves = np.where(counts > 0, curves / counts, np.nan)
    total = pd.sum(axis=1)
    out: dict[str, np.ndarray] = {"rapsd": curves, "total_power": total}
    for c in cutoffs:
        out[f"hf_ratio@{c:g}"] = pd[:, r >= c].sum(axis=1) / total
    hi = pd[:, (r >= BAND_HIGH[0]) & (r <= BAND_HIGH[1])].sum(axis=1)
    lo = pd[:, (r >= BAND_LOW[0]) & (r < BAND_LOW[1])].sum(axis=1)
    out["band_ratio"] = hi / lo
    centers = (np.arange(bins) + 0.5) / bins
    slopes = []
    for row in curves:
        m = (centers >= slope_range[0]) & (centers <= slope_range[1]) & np.isfinite(row) & (row > 0)
        slopes.append(np.polyfit(np.log(centers[m]), np.log(row[m]), 1)[0] if m.sum() >= 2 else np.nan)
    out["slope"] = np.asarray(slopes)
    return out


def rapsd_numpy(images: Any, bins: int = DEFAULT_BINS, channels: str = "luma",
                value_range: tuple[float, float] | None = (-1.0, 1.0)) -> np.ndarray:
    """Numpy reference for :func:`rapsd`: ``[N, B]`` float64."""
    return spectral_stats_numpy(images, bins, (), channels, value_range)["rapsd"]


# ----------------------------------------------------------------------------------------------- accumulator


def spectral_protocol(bins: int = DEFAULT_BINS, cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
                      channels: str = "luma", value_range: tuple[float, float] | None = (-1.0, 1.0)) -> dict:
    """How the spectral numbers were computed (written next to them in metrics files)."""
    return {
        "metric": "spectral", "definition": "eval_anchors §3.2", "dtype": "float64",
        "channels": channels, "luma_weights": list(LUMA_BT601) if channels == "luma" else None,
        "value_range": list(value_range) if value_range is not None else None,
        "mean_removed": True, "window": "symmetric Hann (separable), PSD / sum(w^2)",
        "radius": "fraction of Nyquist, disk 0 < rho <= 1", "bins": bins, "cutoffs": list(cutoffs),
        "band_ratio": {"high": list(BAND_HIGH), "low": list(BAND_LOW)}, "slope_range": list(SLOPE_RANGE),
        "aggregation": "dataset RAPSD = mean of per-image RAPSD; scalars per image",
        "resize": "none (images are compared at their native resolution)", "versions": package_versions(),
    }


class SpectralAccumulator(SampleAccumulator):
    """Accumulates per-image spectral stats; ``compute()`` gives the mean RAPSD, scalar means/stds and groups.

    ``update(images, keys=None, groups=None)`` takes images ``[N, C, H, W]`` (``value_range``, default [-1, 1])
    plus optional manifest keys (for pairing with a teacher set) and groups (class id or caption).
    """

    def __init__(self, bins: int = DEFAULT_BINS, cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
                 channels: str = "luma", value_range: tuple[float, float] | None = (-1.0, 1.0)) -> None:
        if channels not in _CHANNEL_MODES:
            raise UserError(f"spectral channels={channels!r} is not one of {_CHANNEL_MODES}")
        super().__init__({"bins": int(bins), "cutoffs": [float(c) for c in cutoffs], "channels": channels,
                          "value_range": list(value_range) if value_range is not None else None})

    @property
    def scalar_names(self) -> list[str]:
        return [f"hf_ratio@{c:g}" for c in self.config["cutoffs"]] + ["band_ratio", "slope"]

    def update(self, images: Any, keys: Sequence[Hashable] | None = None,
               groups: Sequence[Hashable] | None = None) -> None:
        vr = self.config["value_range"]
        st = spectral_stats(images, self.config["bins"], self.config["cutoffs"], self.config["channels"],
                            tuple(vr) if vr is not None else None)
        self._append({k: st[k] for k in ["rapsd", *self.scalar_names]}, keys, groups)

    def mean_curve(self) -> torch.Tensor:
        """Dataset RAPSD ``[B]``: mean over images of the per-image RAPSD."""
        return self.values("rapsd").mean(dim=0)

    def protocol(self) -> dict[str, Any]:
        c = self.config
        return spectral_protocol(c["bins"], c["cutoffs"], c["channels"],
                                 tuple(c["value_range"]) if c["value_range"] is not None else None)

    def compute(self) -> dict[str, Any]:
        if len(self) == 0:
            raise UserError("SpectralAccumulator.compute() called before any update()")
        curve = self.mean_curve()
        out: dict[str, Any] = {"n": len(self), "rho": bin_centers(self.config["bins"]).tolist(),
                               "mean_rapsd": curve.tolist(), "slope_of_mean_rapsd": float(slope(curve))}
        for name in self.scalar_names:
            v = self.values(name)
            out[name] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else math.nan}
        if any(g is not None for g in self.groups):
            out["per_group"] = {name: group_summary(self.values(name), self.groups) for name in self.scalar_names}
        return out


def compare_spectra(samples: SpectralAccumulator, reference: SpectralAccumulator, c: float = 0.5,
                    paired: bool = False) -> dict[str, Any]:
    """Gap of a sample set vs a reference set (teacher or real images) at the same resolution.

    ``{"hf_gap_db", "lsd_db", "gap_db_curve"}``; with ``paired=True`` the two sets are paired by manifest key
    and ``"paired_log_hf_ratio"`` (mean, std, n) of student/teacher is added (cutoff ``c`` must be tracked).
    """
    if samples.config != reference.config:
        raise UserError("compare_spectra needs two accumulators with the same spectral settings")
    ref = reference.mean_curve()
    gen = samples.mean_curve()
    out: dict[str, Any] = {"c": c, "hf_gap_db": hf_gap_db(gen, ref, c), "lsd_db": log_spectral_distance(gen, ref),
                           "gap_db_curve": spectral_gap_db(gen, ref).tolist()}
    if paired:
        name = f"hf_ratio@{c:g}"
        if name not in samples.scalar_names:
            raise UserError(f"paired spectral ratio at c={c} needs the accumulators to track cutoff {c}")
        ia, ib = pair_by_key(samples.keys, reference.keys)
        lr = paired_log_hf_ratio(samples.values(name)[ia], reference.values(name)[ib], c)
        out["paired_log_hf_ratio"] = {"mean": float(lr.mean()), "std": float(lr.std()) if len(lr) > 1 else math.nan,
                                      "n": len(lr)}
    return out

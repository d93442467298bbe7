"""Distribution distances on pluggable image features: Fréchet distance and CMMD (RBF-kernel MMD).

The math is ours (float64); the feature network is anything that satisfies :class:`FeatureExtractor`:
open_clip image features (:class:`dmd_dar.metrics.clip_score.ClipImageFeatures`), torchvision Inception-v3 from a
local weights file (:class:`InceptionFeatures`), or a tiny random network in tests.

- Fréchet distance: ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with covariances normalised by n - 1.
  Reported values and their bootstrap come from :func:`frechet_distance_eig` (eigenvalues of S1 S2);
  :func:`frechet_distance` (``scipy.linalg.sqrtm`` with the usual ``eps * I`` offset when the product is
  singular, as pytorch-fid) is the independent reference it is tested against.
- CMMD (Jayasumana et al. 2024): ``1000 * MMD^2`` with ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``, sigma = 10,
  on L2-normalised CLIP embeddings. ``estimator="unbiased"`` (default) drops the kernel diagonals (U-statistic);
  ``"biased"`` keeps them (V-statistic), which is what google-research/cmmd's code computes.
- Intervals (:func:`fd_interval`, :func:`cmmd_interval`) bootstrap per-image resample counts through the same
  functions that give the estimate (:mod:`dmd_dar.metrics.bootstrap`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from dmd_dar.errors import UserError
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.bootstrap import Interval, bias_shifted, counts_bootstrap
from dmd_dar.metrics.protocol import file_fingerprint, package_versions
from dmd_dar.metrics.weights import load_weights_file

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
_ESTIMATORS = ("unbiased", "biased")


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images ``[N, 3, H, W]`` in [-1, 1] -> features ``[N, D]``; ``name`` and ``protocol()`` describe it."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def protocol(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------- Fréchet


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)


def gaussian_stats(features: Any, weights: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (normalised by n - 1) of features ``[N, D]``, float64.

    ``weights [N]`` are per-image counts (a bootstrap resample: image i drawn ``weights[i]`` times, n = their
    sum); the result equals the plain statistics of the features repeated that often."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"Gaussian feature statistics need features [N >= 2, D], got shape {f.shape}")
    w = np.ones(f.shape[0]) if weights is None else _f64(weights).reshape(-1)
    if w.shape[0] != f.shape[0]:
        raise UserError(f"gaussian_stats got {f.shape[0]} features but {w.shape[0]} weights")
    n = w.sum()
    mu = w @ f / n
    c = f - mu
    return mu, (c.T * w) @ c / (n - 1)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, scipy sqrtm)."""
    mu1, mu2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_f64(sigma1)), np.atleast_2d(_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(f"Fréchet distance got mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                        f"sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): offset both diagonals, as pytorch-fid does.
        warnings.warn(f"Fréchet distance: sqrtm(S1 S2) is singular; adding {eps} to the covariance diagonals",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has a large imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_eig(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The Fréchet distance through the eigenvalues of ``S1 S2``: the one the evaluation reports.

    ``Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(S1 S2))``; for PSD ``S1, S2`` the eigenvalues are real and
    non-negative (round-off below 0 is clipped, imaginary round-off dropped). One eigendecomposition instead of a
    matrix square root: several times faster, which the bootstrap needs, and defined for singular covariances
    without an ``eps`` offset. It equals :func:`frechet_distance` (scipy ``sqrtm``, the reference) to round-off on
    non-singular statistics (tested to 1e-8). A symmetric variant ``Tr (A S2 A)^(1/2)``, ``A = S1^(1/2)``, was
    measured 6x less accurate on the embedded default's near-singular CLIP covariances (condition ~2e10).
    """
    mu1, mu2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_f64(sigma1)), np.atleast_2d(_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(f"Fréchet distance got mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                        f"sigma {s1.shape} / {s2.shape}")
    ev = np.linalg.eigvals(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def fd_interval(x: Any, y: Any, n_boot: int, confidence: float, seed: int) -> Interval:
    """FD of features ``x [N, D]`` vs ``y [M, D]`` with a two-sample bootstrap interval.

    Estimate and replicates are :func:`frechet_distance_eig` of :func:`gaussian_stats` at per-image counts (of
    one for the estimate). A resample repeats images, which shrinks its covariance, so FD's replicates are biased
    upward (often the whole bootstrap distribution lies above the estimate): the interval is shifted by the
    bootstrap's own bias estimate (:func:`dmd_dar.metrics.bootstrap.bias_shifted`).
    """
    fx, fy = _f64(x), _f64(y)
    interval, boots = counts_bootstrap(lambda cx, cy: fd_of_counts(fx, fy, cx, cy), [len(fx), len(fy)], n_boot,
                                       confidence, seed)
    return bias_shifted(interval, boots)


def fd_of_counts(x: Any, y: Any, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """FD of resamples given as per-image counts ``cx [R, N]``, ``cy [R, M]`` of features ``x``, ``y``: ``[R]``.
    Counts of one are the plain FD; row r equals the FD of the sets with image i repeated ``c[r, i]`` times."""
    fx, fy = _f64(x), _f64(y)
    return np.array([frechet_distance_eig(*gaussian_stats(fx, wx), *gaussian_stats(fy, wy)) for wx, wy in zip(cx, cy)])


class FeatureStats:
    """Running mean and scatter of features (Chan et al.'s pairwise update): exact, stable, mergeable."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None  # [D]
        self.m2: np.ndarray | None = None  # [D, D] centred scatter sum

    def _combine(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean.copy(), m2.copy()
            return
        if mean.shape != self.mean.shape:
            raise UserError(f"feature dimension changed from {self.mean.shape[0]} to {mean.shape[0]}")
        tot = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.n * n / tot)
        self.mean = self.mean + delta * (n / tot)
        self.n = tot

    def update(self, features: Any) -> None:
        f = _f64(features)
        if f.ndim != 2 or f.shape[0] == 0:
            raise UserError(f"features must be [N, D], got shape {f.shape}")
        mean = f.mean(axis=0)
        c = f - mean
        self._combine(f.shape[0], mean, c.T @ c)

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.n:
            self._combine(other.n, other.mean, other.m2)
        return self

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": None if self.mean is None else self.mean.copy(),
                "m2": None if self.m2 is None else self.m2.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> FeatureStats:
        self.n = int(state["n"])
        self.mean = None if state["mean"] is None else np.asarray(state["mean"], dtype=np.float64)
        self.m2 = None if state["m2"] is None else np.asarray(state["m2"], dtype=np.float64)
        return self


# ----------------------------------------------------------------------------------------------- MMD / CMMD


def rbf_kernel(x: Any, y: Any, sigma: float = CMMD_SIGMA, block: int = 2048) -> np.ndarray:
    """``k(x_i, y_j) = exp(-|x_i - y_j|^2 / (2 sigma^2))`` ``[N, M]`` in float64, built ``block`` rows at a time
    (bounds the temporaries to ``block x M``)."""
    x, y = _f64(x), _f64(y)
    gamma = 1.0 / (2.0 * sigma**2)
    yn = (y * y).sum(axis=1)  # [M]
    out = np.empty((x.shape[0], y.shape[0]), dtype=np.float64)
    for i in range(0, x.shape[0], block):
        xb = x[i:i + block]  # [b, D]
        d2 = (xb * xb).sum(axis=1)[:, None] + yn[None, :] - 2.0 * xb @ y.T  # [b, M]
        out[i:i + block] = np.exp(-gamma * np.clip(d2, 0, None))
    return out


def mmd2_from_counts(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                     estimator: str = "unbiased") -> np.ndarray:
    """Squared MMD of sets given as per-image counts ``cx [R, N]``, ``cy [R, M]`` over kernel matrices ``[R]``.

    Counts of one are the plain estimators. ``unbiased`` drops every pair of the *same original image* from the
    within-set sums (not only identical draws), so images repeated in a resample do not inflate the within-set
    similarity: the same-image pairs number ``sum_i c_i^2`` and contribute ``k(a, a) = 1`` each.
    """
    if estimator not in _ESTIMATORS:
        raise UserError(f"MMD estimator={estimator!r} is not one of {_ESTIMATORS}")
    n, m = cx.sum(1), cy.sum(1)  # [R] draws per resample
    sxx = np.einsum("rn,nk,rk->r", cx, kxx, cx)
    syy = np.einsum("rn,nk,rk->r", cy, kyy, cy)
    sxy = np.einsum("rn,nk,rk->r", cx, kxy, cy)
    if estimator == "unbiased":
        dx, dy = (cx**2).sum(1), (cy**2).sum(1)  # same-image pairs (k(a, a) = 1)
        return (sxx - dx) / (n * n - dx) + (syy - dy) / (m * m - dy) - 2 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)


def _mmd_inputs(x: Any, y: Any, estimator: str) -> tuple[np.ndarray, np.ndarray]:
    if estimator not in _ESTIMATORS:
        raise UserError(f"MMD estimator={estimator!r} is not one of {_ESTIMATORS}")
    fx, fy = _f64(x), _f64(y)
    if fx.ndim != 2 or fy.ndim != 2 or fx.shape[1] != fy.shape[1] or fx.shape[0] < 2 or fy.shape[0] < 2:
        raise UserError(f"MMD needs features [N >= 2, D] and [M >= 2, D], got {fx.shape}, {fy.shape}")
    return fx, fy


def mmd2_rbf(x: Any, y: Any, sigma: float = CMMD_SIGMA, estimator: str = "unbiased", block: int = 2048) -> float:
    """Squared MMD between samples ``x [N, D]`` and ``y [M, D]`` with an RBF kernel of bandwidth ``sigma``."""
    fx, fy = _mmd_inputs(x, y, estimator)
    k = [rbf_kernel(a, b, sigma, block) for a, b in ((fx, fx), (fy, fy), (fx, fy))]
    return float(mmd2_from_counts(*k, np.ones((1, len(fx))), np.ones((1, len(fy))), estimator)[0])


def cmmd(x: Any, y: Any, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE, estimator: str = "unbiased") -> float:
    """CMMD = ``scale * MMD^2`` (sigma 10, x1000) on (L2-normalised) CLIP embeddings ``[N, D]``, ``[M, D]``."""
    return scale * mmd2_rbf(x, y, sigma, estimator)


def cmmd_interval(x: Any, y: Any, sigma: float, scale: float, estimator: str, n_boot: int, confidence: float,
                  seed: int) -> Interval:
    """CMMD of ``x`` vs ``y`` with a two-sample bootstrap interval: the kernel matrices are built once, then the
    estimate (counts of one) and every replicate are :func:`mmd2_from_counts` of them."""
    fx, fy = _mmd_inputs(x, y, estimator)
    k = [rbf_kernel(a, b, sigma) for a, b in ((fx, fx), (fy, fy), (fx, fy))]

    def of_counts(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        return scale * mmd2_from_counts(*k, cx, cy, estimator)

    interval, _ = counts_bootstrap(of_counts, [len(fx), len(fy)], n_boot, confidence, seed)
    return interval


# ----------------------------------------------------------------------------------------------- accumulator


class FeatureAccumulator:
    """Features of one image set: Gaussian statistics for FD and (optionally) the raw features for CMMD.

    ``update(images)`` runs the extractor (images in [-1, 1]); ``update_features(features)`` takes features
    directly. ``merge``/``state_dict`` reduce across processes exactly (Chan's update, concatenation).
    """

    def __init__(self, extractor: FeatureExtractor | None = None, keep_features: bool = True) -> None:
        self.extractor = extractor
        self.keep_features = keep_features
        self.stats = FeatureStats()
        self._features: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.stats.n

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        if self.extractor is None:
            raise UserError("FeatureAccumulator has no extractor: call update_features(features) instead")
        self.update_features(self.extractor(images))

    def update_features(self, features: Any) -> None:
        f = torch.as_tensor(_f64(features))  # [N, D]
        self.stats.update(f.numpy())
        if self.keep_features:
            self._features.append(f)

    def features(self) -> torch.Tensor:
        if not self.keep_features:
            raise UserError("this FeatureAccumulator was built with keep_features=False (CMMD needs features)")
        if len(self._features) > 1:
            self._features = [torch.cat(self._features)]
        return self._features[0] if self._features else torch.zeros(0, 0, dtype=torch.float64)

    def merge(self, other: FeatureAccumulator) -> FeatureAccumulator:
        if other.keep_features != self.keep_features:
            raise UserError("cannot merge FeatureAccumulators with different keep_features")
        self.stats.merge(other.stats)
        if self.keep_features and len(other):
            self._features.append(other.features())
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "keep_features": self.keep_features,
                "features": self.features().clone() if self.keep_features and len(self) else None}

    def merge_state(self, state: dict[str, Any]) -> FeatureAccumulator:
        other = FeatureAccumulator(None, bool(state["keep_features"]))
        other.stats.load_state_dict(state["stats"])
        if state["features"] is not None:
            other._features = [torch.as_tensor(state["features"], dtype=torch.float64)]
        return self.merge(other)

    def protocol(self) -> dict[str, Any]:
        ext = self.extractor.protocol() if self.extractor is not None else {"name": "precomputed features"}
        return {"feature_extractor": ext, "n": len(self)}


def distribution_metrics(samples: FeatureAccumulator, reference: FeatureAccumulator, cmmd_sigma: float = CMMD_SIGMA,
                         cmmd_estimator: str = "unbiased") -> dict[str, Any]:
    """FD (and CMMD when both sets kept their features) of ``samples`` vs ``reference``, with the protocol."""
    fd = frechet_distance_eig(samples.stats.mean, samples.stats.cov(), reference.stats.mean,
                               reference.stats.cov())
    out: dict[str, Any] = {"fd": fd, "n_samples": len(samples), "n_reference": len(reference)}
    if samples.keep_features and reference.keep_features:
        out["cmmd"] = cmmd(samples.features(), reference.features(), cmmd_sigma, CMMD_SCALE, cmmd_estimator)
    out["protocol"] = {
        "fd": "float64, covariance / (n - 1), Tr sqrt(S1 S2) from the eigenvalues of S1 S2",
        "cmmd": {"kernel": "rbf", "sigma": cmmd_sigma, "scale": CMMD_SCALE, "estimator": cmmd_estimator},
        "samples": samples.protocol(), "reference": reference.protocol(), "versions": package_versions(),
    }
    return out


# ----------------------------------------------------------------------------------------------- Inception


INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision IMAGENET1K_V1 weights


def default_inception_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


class InceptionFeatures:
    """torchvision Inception-v3 pool features (2048-d) from a local weights file.

    These are the torchvision ImageNet weights, *not* the TF "pt_inception-2015-12-05" network that published
    FID numbers use: FD values from it compare models with each other, never with papers. Images in [-1, 1] are
    resized to 299 x 299 (bilinear, ``antialias`` recorded) and fed as [-1, 1], which is what torchvision's
    ``transform_input=True`` produces for these Google-trained weights.
    """

    name = "inception_v3_torchvision_pool"

    def __init__(self, weights_file: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 antialias: bool = True) -> None:
        path = os.fspath(weights_file) if weights_file is not None else default_inception_path()
        if not os.path.isfile(path):
            raise MetricUnavailable(
                "fd_inception", path,
                f"torchvision Inception-v3 weights '{INCEPTION_FILE}' not found; pass weights_file= or place it there")
        from torchvision.models import inception_v3

        sd = load_weights_file(path, "fd_inception")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise UserError(f"{path} is not a torchvision inception_v3 state dict: {str(err).splitlines()[0]}") from err
        net.fc = torch.nn.Identity()
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.antialias = antialias
        self._source = file_fingerprint(path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=self.antialias)
        return self.net(x).double()  # [N, 2048]

    def protocol(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self._source, "input": "[-1, 1]",
                "resize": {"size": 299, "filter": "bilinear", "antialias": self.antialias, "crop": None},
                "note": "torchvision ImageNet Inception-v3, not the TF FID Inception: not comparable to papers",
                "versions": package_versions()}

"""Evaluation metrics: pure functions plus mergeable accumulators, each with a recorded ``protocol()``.

Modules: ``spectral`` (RAPSD, hf_ratio, band_ratio, slope, HF gap, LSD, paired log-ratio), ``lpips_metric``
(fidelity and diversity), ``stlpips_metric`` (ST-LPIPS: an offline stand-in for LPIPS, weights bundled in its
wheel), ``clip_score`` (open_clip), ``distribution`` (Fréchet distance, CMMD, feature extractors), ``bootstrap``
(every interval of the project: per-sample and resample-count bootstraps), ``pairing`` (manifest keys and
groups), ``availability`` (missing weights). Weights are only ever read from local files; heavy packages (lpips,
stlpips_pytorch, open_clip) are imported on first use. ``dmd-dar eval`` computes every number through these
modules. Metrics never import ``dmd_dar.models``, ``dmd_dar.distill`` or ``dmd_dar.backbones``.
"""

from dmd_dar.metrics.availability import MetricUnavailable, try_metric
from dmd_dar.metrics.bootstrap import Interval, bootstrap_ci, counts_bootstrap, paired_bootstrap_ci
from dmd_dar.metrics.pairing import group_summary, pair_by_key, sample_group, sample_key

__all__ = [
    "Interval", "MetricUnavailable", "bootstrap_ci", "counts_bootstrap", "group_summary", "pair_by_key",
    "paired_bootstrap_ci",
    "sample_group", "sample_key", "try_metric",
]

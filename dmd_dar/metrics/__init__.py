"""Evaluation metrics: pure functions plus mergeable accumulators, each with a recorded ``protocol()``.

Modules: ``spectral`` (RAPSD, hf_ratio, band_ratio, slope, HF gap, LSD, paired log-ratio), ``lpips_metric``
(fidelity and diversity), ``stlpips_metric`` (ST-LPIPS: an offline stand-in for LPIPS, weights bundled in its
wheel), ``clip_score`` (open_clip), ``distribution`` (Fréchet distance, CMMD, feature extractors), ``bootstrap``
(CIs), ``pairing`` (manifest keys and groups), ``availability`` (missing weights). Weights are only ever read
from local files; heavy packages (lpips, stlpips_pytorch, open_clip) are imported on first use.
Metrics never import ``dmd_dar.models``.
"""

from dmd_dar.metrics.availability import MetricUnavailable, try_metric
from dmd_dar.metrics.bootstrap import BootstrapCI, bootstrap_ci, paired_bootstrap_ci
from dmd_dar.metrics.pairing import group_summary, pair_by_key, sample_group, sample_key

__all__ = [
    "BootstrapCI", "MetricUnavailable", "bootstrap_ci", "group_summary", "pair_by_key", "paired_bootstrap_ci",
    "sample_group", "sample_key", "try_metric",
]

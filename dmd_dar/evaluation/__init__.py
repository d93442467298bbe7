"""The evaluation suite: ``dmd-dar eval`` over sample folders, a reference, and protocol suites (eval/suites/).

- :class:`EvalConfig` / :func:`run`: the command (metrics.json + report.html);
- :func:`evaluate`: the metrics dict without writing anything;
- :class:`ImageSet`: a folder of images with its manifest;
- :mod:`dmd_dar.evaluation.suite`: YAML protocols that say what to sample before evaluating.
"""

from dmd_dar.evaluation.config import METRICS, ClipSettings, EvalConfig, FeatureSettings, LpipsSettings
from dmd_dar.evaluation.images import ImageSet
from dmd_dar.evaluation.runner import Evaluation, evaluate, run, verdict

__all__ = ["METRICS", "ClipSettings", "EvalConfig", "Evaluation", "FeatureSettings", "ImageSet", "LpipsSettings",
           "evaluate", "run", "verdict"]

"""The evaluation stack: image folders -> metrics (through ``dmd_dar.metrics``) -> typed results -> report.

- :class:`EvalConfig` / :func:`run`: the ``dmd-dar eval`` command (``metrics.json`` + ``report.html``);
- :func:`evaluate`: the typed :class:`Evaluation` without writing anything;
- :mod:`dmd_dar.evaluation.results`: the result classes ``metrics.json`` is written and read through;
- :class:`ImageSet`: a folder of images with its manifest;
- :mod:`dmd_dar.evaluation.report` / :mod:`dmd_dar.evaluation.plots`: the HTML report and its plots;
- :mod:`dmd_dar.evaluation.suite`: YAML protocols that say what to sample before evaluating.
"""

from dmd_dar.evaluation.config import METRICS, ClipSettings, EvalConfig, FeatureSettings, LpipsSettings
from dmd_dar.evaluation.images import ImageSet
from dmd_dar.evaluation.report import write_report
from dmd_dar.evaluation.results import Evaluation
from dmd_dar.evaluation.runner import Evaluator, evaluate, run, verdict

__all__ = ["METRICS", "ClipSettings", "EvalConfig", "Evaluation", "Evaluator", "FeatureSettings", "ImageSet",
           "LpipsSettings", "evaluate", "run", "verdict", "write_report"]

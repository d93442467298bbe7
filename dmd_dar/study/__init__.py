"""``dmd-dar study``: does DAR preserve high-frequency detail during DMD? One resumable command.

- :class:`StudyConfig` / :func:`run`: the command (``dmd-dar study suite=eval/study/embedded.yaml [quick=true]``);
- :class:`StudySuite` / :func:`load_study`: the protocol YAML (eval/study/*.yaml);
- :mod:`dmd_dar.study.detail`: distill, sample and evaluate every (variant, student steps, seed);
- :mod:`dmd_dar.study.pretraining`: teacher pretraining per routing variant, FD against iterations;
- :mod:`dmd_dar.study.aggregate` / :mod:`dmd_dar.study.report`: statistics over seeds, the automatic reading,
  ``results.json``, ``results.md`` and ``report.html``.
"""

from dmd_dar.study.config import StudyConfig, StudySuite, load_study
from dmd_dar.study.runner import estimate_seconds, load_results, run

__all__ = ["StudyConfig", "StudySuite", "estimate_seconds", "load_results", "load_study", "run"]

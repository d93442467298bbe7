"""Metrics whose weights are not on this machine: one exception type and a helper that records the gap.

Real metric backbones (CLIP, AlexNet/VGG for LPIPS, Inception) are never downloaded by this package. When a file
is missing the metric raises :class:`MetricUnavailable`, which names the exact file or setting that would make it
available; evaluation code records that instead of failing the whole run (see :func:`try_metric`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from dmd_dar.errors import UserError

T = TypeVar("T")


class MetricUnavailable(UserError):
    """A metric cannot run here because a weights file (or a setting) is missing.

    ``metric`` is the metric's name (``"lpips"``, ``"clip_score"``, ...); ``needs`` is the exact file path or
    setting the user must provide, e.g. ``"/root/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth"``.
    It subclasses ``UserError`` (and so ``Exception``): the message is one line that names the fix.
    """

    def __init__(self, metric: str, needs: str, reason: str = "") -> None:
        self.metric = metric
        self.needs = needs
        self.reason = reason
        msg = f"metric '{metric}' is unavailable: provide {needs}"
        if reason:
            msg += f" ({reason})"
        super().__init__(msg)

    def record(self) -> dict[str, Any]:
        """The JSON-able record written into metrics files in place of the metric's value."""
        return {"available": False, "metric": self.metric, "needs": self.needs, "reason": self.reason}


def try_metric(metric: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T | None, dict[str, Any]]:
    """Run ``fn(*args, **kwargs)``; return ``(result, {"available": True})`` or, if it raises
    :class:`MetricUnavailable`, ``(None, {"available": False, "needs": ..., ...})``.

    Every other exception propagates: only a missing file/setting is turned into a record, never a bug.
    """
    try:
        result = fn(*args, **kwargs)
    except MetricUnavailable as err:
        rec = err.record()
        if err.metric != metric:  # e.g. CMMD unavailable because its CLIP model is
            rec["component"] = err.metric
        rec["metric"] = metric
        return None, rec
    return result, {"available": True, "metric": metric}

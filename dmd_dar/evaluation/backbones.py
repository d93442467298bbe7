"""The metric networks of ``dmd-dar eval`` (LPIPS, CLIP, FD features), built once on first use.

A missing weights file raises :class:`~dmd_dar.metrics.availability.MetricUnavailable`, which the evaluation
turns into an availability record (or an error with ``strict=true``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmd_dar.evaluation.config import EvalConfig
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.clip_score import ClipImageFeatures, OpenClipModel
from dmd_dar.metrics.distribution import InceptionFeatures
from dmd_dar.metrics.lpips_metric import LpipsModel
from dmd_dar.metrics.stlpips_metric import StLpipsModel
from dmd_dar.utils.device import resolve_device

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def resolve_asset(path: str | None) -> str | None:
    """A path as given, or under the installed package when it is a relative ``assets/...`` path not found here."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() or p.is_absolute() or (p.parts and p.parts[0] != "assets"):
        return str(p)
    return str(PACKAGE_DIR / p)


class Backbones:
    """Metric networks, built once on first use; a missing weights file raises :class:`MetricUnavailable`."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self._built: dict[str, Any] = {}
        self.lpips_selection: dict[str, Any] | None = None

    def _get(self, key: str, build):
        if key not in self._built:
            try:
                self._built[key] = build()
            except MetricUnavailable as err:
                self._built[key] = err
        got = self._built[key]
        if isinstance(got, MetricUnavailable):
            raise got
        return got

    def lpips(self):
        """The LPIPS-family model of ``cfg.lpips.net`` (``auto``: standard alex if its trunk file is here, else
        ST-LPIPS); the choice is recorded in ``protocol.models.lpips.selection``."""
        c = self.cfg.lpips

        def build():
            if c.net == "stlpips_alex":
                self.lpips_selection = {"requested": c.net, "ran": "stlpips_alex"}
                return StLpipsModel(device=self.device)
            net = "alex" if c.net == "auto" else c.net
            try:
                model = LpipsModel(net, resolve_asset(c.backbone_weights), device=self.device,
                                   random_backbone=c.random_backbone, seed=self.cfg.seed)
            except MetricUnavailable as err:
                if c.net != "auto" or c.backbone_weights is not None:
                    raise
                try:
                    model = StLpipsModel(device=self.device)
                except MetricUnavailable as st_err:
                    raise MetricUnavailable(err.metric, err.needs, f"{err.reason}; ST-LPIPS fallback: "
                                            f"{st_err.reason} ({st_err.needs})") from None
                self.lpips_selection = {"requested": "auto", "ran": "stlpips_alex",
                                        "why": f"standard LPIPS unavailable: {err}"}
                return model
            self.lpips_selection = {"requested": c.net, "ran": net}
            return model

        return self._get("lpips", build)

    def clip(self):
        c = self.cfg.clip

        def build():
            cfg_file = resolve_asset(c.model_config)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.cfg.seed)  # random_init (tests, benchmarks) is then reproducible
                    return OpenClipModel(c.model, None if cfg_file else c.pretrained,
                                         weights_file=resolve_asset(c.weights_file), cache_dir=c.cache_dir,
                                         pre_resize=c.pre_resize, device=self.device, random_init=c.random_init,
                                         model_config=cfg_file)
            except MetricUnavailable as err:
                if c.hint:
                    raise MetricUnavailable(err.metric, err.needs, f"{err.reason}; create it with `{c.hint}`") \
                        from None
                raise

        return self._get("clip", build)

    def features(self):
        if self.cfg.features.space == "clip":
            return self._get("features", lambda: ClipImageFeatures(self.clip()))
        return self._get("features", lambda: InceptionFeatures(resolve_asset(self.cfg.features.inception_weights),
                                                               self.device))

    def protocols(self) -> dict[str, Any]:
        out = {}
        for key, obj in self._built.items():
            out[key] = obj.record() if isinstance(obj, MetricUnavailable) else obj.protocol()
        if "lpips" in out and self.lpips_selection is not None:
            out["lpips"]["selection"] = self.lpips_selection
        return out

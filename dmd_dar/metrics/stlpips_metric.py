"""ST-LPIPS: shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022), an offline stand-in for LPIPS fidelity/diversity.

Standard LPIPS (:class:`~dmd_dar.metrics.lpips_metric.LpipsModel`) needs torchvision's ImageNet AlexNet/VGG trunk,
which is never downloaded here. The ``stlpips-pytorch`` wheel (0.0.2, BSD-2) ships *complete* weights for its
anti-aliased, shift-tolerant AlexNet variant (``stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth``: trunk,
blur filters, input scaling and linear layers, 2.47M parameters), so :class:`StLpipsModel` runs with no network.

Loading. The network is built with ``LPIPS(pretrained=False, net='alex', variant='shift_tolerant')`` (no file
read, no download: the shift-tolerant AlexNet is defined in ``invariant_networks.py`` without torchvision weights)
and the bundled state dict is then read by us with ``torch.load(weights_only=True)`` (the package's own loader
uses a plain ``torch.load``, never called). Key check: strict, except the documented extras of the model's own
state dict, ``lins.<i>.*``, which alias ``lin<i>.*`` (one module registered twice) and are absent from the file.

Inputs are in [-1, 1] (the v0.1 input scaling layer is part of the model), compared at native resolution, at
least :data:`MIN_SIDE` pixels a side. Values are NOT comparable with standard LPIPS numbers (other trunk, other
calibration): ``protocol()`` says so, and the evaluation labels them "ST-LPIPS".
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

import torch

from dmd_dar.errors import UserError
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.lpips_metric import batched_distance
from dmd_dar.metrics.protocol import file_fingerprint, package_versions

STLPIPS_NAME = "ST-LPIPS (alex, shift-tolerant v0.0)"
STLPIPS_PACKAGE = "stlpips-pytorch"
WEIGHTS_RELPATH = os.path.join("weights", "vST0.0", "alex_shift_tolerant.pth")
MIN_SIDE = 21  # below this the reflection padding of the blur-pool layers fails
_ALIAS_PREFIX = "lins."  # model.lins = ModuleList([lin0, ..., lin4]): same parameters under two names


def default_weights_path() -> str | None:
    """The weights file inside the installed ``stlpips_pytorch`` package (``None`` when it is not installed)."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_RELPATH)


def _debug_helper_stub(module: str, attr: str):
    def stub(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{module}.{attr} is not installed (only stlpips_pytorch debug code calls it)")

    return stub


def _import_stlpips() -> types.ModuleType:
    """``stlpips_pytorch.stlpips``. Version 0.0.2 imports ``torchsummary.summary`` and ``IPython.embed`` at module
    level (debug helpers, undeclared dependencies, never called by ``LPIPS``): when they are not installed,
    stand-ins are placed in ``sys.modules`` for the duration of the import only."""
    added = []
    for module, attr in (("torchsummary", "summary"), ("IPython", "embed")):
        if module in sys.modules or importlib.util.find_spec(module) is not None:
            continue
        stub = types.ModuleType(module)
        setattr(stub, attr, _debug_helper_stub(module, attr))
        sys.modules[module] = stub
        added.append(module)
    try:
        from stlpips_pytorch import stlpips
    finally:
        for module in added:
            sys.modules.pop(module, None)
    return stlpips


def load_stlpips_state(model: torch.nn.Module, path: str) -> None:
    """Load the bundled state dict into ``model`` (``weights_only=True``); every key must match, the ``lins.*``
    aliases of ``lin<i>.*`` apart, and every aliased module must really be the same object."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-tensor pickle: refuse it with the file named
        raise UserError(f"{path}: not a weights-only ST-LPIPS state dict ({err})") from err
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict, got {type(sd).__name__}")
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - sd.keys() if not k.startswith(_ALIAS_PREFIX))
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        raise UserError(f"{path} is not the ST-LPIPS alex shift-tolerant state dict: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    for i, lin in enumerate(model.lins):
        if lin is not getattr(model, f"lin{i}"):
            raise UserError(f"stlpips model layout changed: lins.{i} is not lin{i}; the weights would not load")
    try:
        model.load_state_dict(sd, strict=False)  # shapes are still checked
    except RuntimeError as err:
        raise UserError(f"{path}: wrong ST-LPIPS weights ({str(err).splitlines()[-1].strip()})") from err


class StLpipsModel:
    """ST-LPIPS alex (shift-tolerant, v0.0 weights bundled with ``stlpips-pytorch``); ``model(a, b) -> [N]``.

    Same call interface and ``protocol()`` keys as :class:`~dmd_dar.metrics.lpips_metric.LpipsModel`, so
    ``LpipsFidelity``, ``LpipsDiversity`` and ``pairwise_lpips`` take either. ``weights=`` overrides the file.
    """

    label = "ST-LPIPS"
    display_name = STLPIPS_NAME
    net_name = "alex"
    version = "ST0.0"

    def __init__(self, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> None:
        self.device = torch.device(device)
        path = os.fspath(weights) if weights is not None else default_weights_path()
        if path is None:
            raise MetricUnavailable("lpips", f"the Python package {STLPIPS_PACKAGE}==0.0.2",
                                    "ST-LPIPS weights ship inside that wheel (pip install stlpips-pytorch==0.0.2)")
        if not os.path.isfile(path):
            raise MetricUnavailable("lpips", path, "ST-LPIPS alex shift-tolerant weights file not found")
        stlpips = _import_stlpips()
        with torch.random.fork_rng(devices=[]):  # construction draws random inits; the file replaces them all
            model = stlpips.LPIPS(pretrained=False, net="alex", variant="shift_tolerant", version="0.1",
                                  lpips=True, spatial=False, use_dropout=True, eval_mode=True, verbose=False)
        load_stlpips_state(model, path)
        model.requires_grad_(False)
        self._weights = file_fingerprint(path)
        self.model = model.eval().to(self.device)

    @property
    def name(self) -> str:
        return "stlpips-alex-shift_tolerant-vST0.0"

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """ST-LPIPS between paired images ``a, b [N, 3, H, W]`` in [-1, 1]: ``[N]`` float64."""
        if a.ndim == 4 and min(a.shape[-2:]) < MIN_SIDE:
            raise UserError(f"ST-LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} px, got {tuple(a.shape)}")
        return batched_distance(self.model, self.device, a, b, batch_size, "ST-LPIPS")

    def protocol(self) -> dict[str, Any]:
        return {"metric": "stlpips", "name": STLPIPS_NAME, "label": self.label, "net": self.net_name,
                "variant": "shift_tolerant", "version": self.version, "weights": self._weights,
                "backbone": {"note": "bundled anti-aliased AlexNet trunk (in the weights file)"},
                "lin_weights": {"note": "in the weights file"},
                "comparable_with_lpips": False,
                "note": "values are NOT comparable with standard LPIPS (alex/vgg v0.1) numbers: different "
                        "(anti-aliased, shift-tolerant) trunk and calibration",
                "reference": "Ghildyal & Liu, Shift-tolerant Perceptual Similarity Metric, ECCV 2022",
                "load": "torch.load(weights_only=True), strict keys apart from the lins.* aliases",
                "input": "[-1, 1], native resolution", "resize": None,
                "versions": {**package_versions(), STLPIPS_PACKAGE: package_versions((STLPIPS_PACKAGE,))[
                    STLPIPS_PACKAGE]}}

"""LPIPS (the ``lpips`` package, v0.1 calibration) for fidelity to the teacher and diversity over seeds.

- Fidelity: ``mean_i LPIPS(student_i, teacher_i)`` over pairs with the same noise and condition (paired by
  manifest key ``(class_id | caption, seed, index)``). Lower = more faithful.
- Diversity: per group (class or prompt), the mean LPIPS over all ``K (K - 1) / 2`` pairs of its K seeds, then the
  mean over groups. Higher = more diverse.

Weights. The ``lpips`` wheel bundles the linear calibration layers (``lpips/weights/v0.1/<net>.pth``); the trunk
(torchvision AlexNet or VGG16 ImageNet weights) is *never downloaded* here. It is read from ``backbone_weights=``
(``.safetensors`` or ``.pth`` via ``torch.load(weights_only=True)``, torchvision key names ``features.<i>.*``), or
from the torch hub cache ``$TORCH_HOME/hub/checkpoints/<file>``; if neither exists :class:`MetricUnavailable`
names the file to provide. Images are compared at their native resolution, inputs in [-1, 1].

Offline alternative: :class:`dmd_dar.metrics.stlpips_metric.StLpipsModel` (ST-LPIPS, weights bundled in its wheel)
has the same interface; every accumulator and helper here takes either model. Its values are not comparable
with LPIPS values.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from dmd_dar.errors import UserError
from dmd_dar.metrics._accum import SampleAccumulator
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.pairing import group_summary, pair_by_key
from dmd_dar.metrics.protocol import file_fingerprint, package_versions
from dmd_dar.metrics.weights import load_weights_file

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


def default_backbone_path(net: str = "alex") -> str:
    """Where torchvision's hub cache keeps the trunk weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_FILES[_canonical(net)])


def _canonical(net: str) -> str:
    if net not in _NET_ALIASES:
        raise UserError(f"LPIPS net={net!r} is not supported; use 'alex' (default) or 'vgg'")
    return _NET_ALIASES[net]


class LpipsModel:
    """An ``lpips.LPIPS`` network with its trunk loaded from a local file; ``model(a, b) -> [N]`` distances.

    ``random_backbone=True`` (tests only) keeps a seeded random trunk and is recorded as such in ``protocol()``.
    """

    label = "LPIPS"

    def __init__(self, net: str = "alex", backbone_weights: str | os.PathLike | None = None,
                 lin_weights: str | os.PathLike | None = None, version: str = "0.1",
                 device: str | torch.device = "cpu", random_backbone: bool = False, seed: int = 0) -> None:
        self.net_name = _canonical(net)
        self.version = version
        self.device = torch.device(device)
        path: str | None = None
        if not random_backbone:
            path = os.fspath(backbone_weights) if backbone_weights is not None else default_backbone_path(net)
            if not os.path.isfile(path):
                raise MetricUnavailable(
                    "lpips", path, f"torchvision {self.net_name} ImageNet weights '{BACKBONE_FILES[self.net_name]}' "
                    "not found; pass backbone_weights= or place the file in the torch hub cache (no downloads)")
        import lpips

        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
            # pnet_rand=True: lpips builds the trunk without touching the network; we fill it in below.
            model = lpips.LPIPS(pretrained=True, net=self.net_name, version=version, pnet_rand=True,
                                model_path=None if lin_weights is None else os.fspath(lin_weights), verbose=False)
        self._lin_path = (os.fspath(lin_weights) if lin_weights is not None else os.path.abspath(os.path.join(
            os.path.dirname(inspect.getfile(lpips.LPIPS)), "weights", f"v{version}", f"{self.net_name}.pth")))
        if path is not None:
            self._load_backbone(model, path)
        self._backbone = {"random_init_seed": seed, "note": "random trunk: tests only"} if path is None \
            else file_fingerprint(path)
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)

    @property
    def name(self) -> str:
        return f"lpips-{self.net_name}-v{self.version}"

    @property
    def display_name(self) -> str:
        return f"LPIPS ({self.net_name} v{self.version})"

    @staticmethod
    def _load_backbone(model: torch.nn.Module, path: str) -> None:
        sd = load_weights_file(path, "lpips")
        mapped: dict[str, torch.Tensor] = {}
        for key in model.net.state_dict():  # e.g. "slice2.3.weight" <- torchvision "features.3.weight"
            _, idx, param = key.split(".", 2)
            src = f"features.{idx}.{param}"
            if src not in sd:
                raise UserError(f"{path} is not a torchvision {type(model.net).__name__} state dict: key '{src}' "
                                "is missing; pass the torchvision ImageNet weights file")
            mapped[key] = sd[src]
        try:
            model.net.load_state_dict(mapped, strict=True)
        except RuntimeError as err:
            raise UserError(f"{path}: wrong LPIPS trunk weights ({str(err).splitlines()[-1].strip()})") from err

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """LPIPS between paired images ``a, b [N, 3, H, W]`` in [-1, 1]: ``[N]`` float64."""
        return batched_distance(self.model, self.device, a, b, batch_size, "LPIPS")

    def protocol(self) -> dict[str, Any]:
        return {"metric": "lpips", "name": self.display_name, "label": self.label, "net": self.net_name,
                "version": self.version, "backbone": self._backbone,
                "lin_weights": file_fingerprint(self._lin_path), "input": "[-1, 1], native resolution",
                "resize": None, "versions": package_versions()}


@torch.no_grad()
def batched_distance(net: torch.nn.Module, device: torch.device, a: torch.Tensor, b: torch.Tensor,
                     batch_size: int, what: str) -> torch.Tensor:
    """``net(a_i, b_i)`` over batches of paired RGB images in [-1, 1] (float32 on ``device``): ``[N]`` float64."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        raise UserError(f"{what} needs two RGB batches of equal shape [N, 3, H, W], got {tuple(a.shape)} "
                        f"and {tuple(b.shape)}")
    out = []
    for i in range(0, a.shape[0], batch_size):
        x = a[i:i + batch_size].to(device, torch.float32)
        y = b[i:i + batch_size].to(device, torch.float32)
        out.append(net(x, y, normalize=False).reshape(-1))  # [n]
    return torch.cat(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64)


def lpips_distance(model: LpipsModel, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair LPIPS ``[N]`` between ``a[i]`` and ``b[i]``."""
    return model(a, b)


def pairwise_lpips(model: LpipsModel, images: torch.Tensor) -> torch.Tensor:
    """LPIPS over all pairs ``i < j`` of ``images [K, 3, H, W]``: ``[K (K - 1) / 2]`` (row-major pair order)."""
    k = images.shape[0]
    i, j = torch.triu_indices(k, k, offset=1)
    return model(images[i], images[j])


def _group_indices(groups: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    out: dict[Hashable, list[int]] = {}
    for idx, g in enumerate(groups):
        out.setdefault(g, []).append(idx)
    return out


class LpipsFidelity(SampleAccumulator):
    """Per-pair LPIPS(student, teacher); ``update`` takes batches already paired (same noise and condition).

    Use :func:`dmd_dar.metrics.pairing.pair_by_key` (or :meth:`update_by_key`) to pair two sample folders.
    """

    def __init__(self, model: LpipsModel) -> None:
        super().__init__({"metric": "lpips_fidelity", "model": model.name})
        self.model = model

    def update(self, student: torch.Tensor, teacher: torch.Tensor, keys: Sequence[Hashable] | None = None,
               groups: Sequence[Hashable] | None = None) -> None:
        self._append({"lpips": self.model(student, teacher)}, keys, groups)

    def update_by_key(self, student: torch.Tensor, student_keys: Sequence[Hashable], teacher: torch.Tensor,
                      teacher_keys: Sequence[Hashable], groups: Sequence[Hashable] | None = None) -> None:
        """Pair the two batches by manifest key first (every key must have a partner)."""
        ia, ib = pair_by_key(student_keys, teacher_keys)
        self.update(student[ia], teacher[ib], [student_keys[i] for i in ia],
                    None if groups is None else [groups[i] for i in ia])

    def compute(self) -> dict[str, Any]:
        v = self.values("lpips")
        if v.numel() == 0:
            raise UserError("LpipsFidelity.compute() called before any update()")
        out: dict[str, Any] = {"n": v.numel(), "mean": float(v.mean()),
                               "std": float(v.std()) if v.numel() > 1 else math.nan}
        if any(g is not None for g in self.groups):
            out["per_group"] = group_summary(v, self.groups)
        out["protocol"] = self.model.protocol()
        return out


class LpipsDiversity:
    """Mean pairwise LPIPS over seeds, per group, then averaged over groups.

    All images of a group must arrive in one ``update`` call (shard work by group across processes): the
    sufficient statistics per group are the sum of its pairwise distances and the pair count, which merge
    exactly only for disjoint groups. A group seen twice raises ``UserError``.
    """

    def __init__(self, model: LpipsModel) -> None:
        self.model = model
        self.groups: dict[Hashable, dict[str, float]] = {}  # group -> {"sum", "pairs", "k"}

    def update(self, images: torch.Tensor, groups: Sequence[Hashable]) -> None:
        if len(groups) != images.shape[0]:
            raise UserError(f"LpipsDiversity.update got {images.shape[0]} images but {len(groups)} groups")
        for g, idx in _group_indices(groups).items():
            self._add(g, {"sum": float(pairwise_lpips(self.model, images[idx]).sum()) if len(idx) > 1 else 0.0,
                          "pairs": len(idx) * (len(idx) - 1) // 2, "k": len(idx)})

    def _add(self, g: Hashable, stats: dict[str, float]) -> None:
        if g in self.groups:
            raise UserError(f"diversity group {g!r} arrived twice: pass all seeds of a group in one update "
                            "(and shard processes by group)")
        self.groups[g] = stats

    def merge(self, other: LpipsDiversity) -> LpipsDiversity:
        for g, st in other.groups.items():
            self._add(g, dict(st))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [[g, dict(st)] for g, st in self.groups.items()]}

    def merge_state(self, state: dict[str, Any]) -> LpipsDiversity:
        for g, st in state["groups"]:
            self._add(tuple(g) if isinstance(g, list) else g, dict(st))
        return self

    def group_means(self) -> dict[Hashable, float]:
        """Per-group mean pairwise LPIPS (groups with K >= 2 only)."""
        return {g: st["sum"] / st["pairs"] for g, st in self.groups.items() if st["pairs"] > 0}

    def compute(self) -> dict[str, Any]:
        means = self.group_means()
        if not means:
            raise UserError("LPIPS diversity needs at least one group with K >= 2 seeds")
        vals = torch.tensor(list(means.values()), dtype=torch.float64)
        ks = [int(st["k"]) for st in self.groups.values()]
        return {"mean": float(vals.mean()), "std_over_groups": float(vals.std()) if len(vals) > 1 else math.nan,
                "n_groups": len(means), "k_min": min(ks), "k_max": max(ks),
                "per_group": {str(g): m for g, m in means.items()}, "protocol": self.model.protocol()}


def lpips_diversity(model: LpipsModel, images: torch.Tensor, groups: Sequence[Hashable]) -> dict[str, Any]:
    """One-shot diversity: ``mean_groups mean_{i<j} LPIPS(x_gi, x_gj)`` (see :class:`LpipsDiversity`)."""
    acc = LpipsDiversity(model)
    acc.update(images, groups)
    return acc.compute()

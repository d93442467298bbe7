"""The embedded procedural dataset: seeded RGB images with known, controllable spatial-frequency content.

Each image mixes a background and a foreground colour from :data:`PALETTE` through a pattern mask
``m in [0, 1]``: ``image = bg + (fg - bg) * m``. The eight classes span the spectrum from smooth to near-Nyquist:

==================  =======================================================================  ====================
class               pattern                                                                  dominant rho
==================  =======================================================================  ====================
``smooth_blobs``    a few large Gaussian blobs (low-pass)                                     < 0.1
``sharp_shapes``    filled discs / squares / triangles with hard, antialiased edges           1/f^2 edge tails
``stripes_low``     sinusoidal stripes, period H/4..H/2                                        0.06..0.25 (32 px)
``stripes_high``    sinusoidal stripes, period 2.2..3 px (near Nyquist)                        0.67..0.91
``checkers``        checkerboard, cells 2.5..4 px, hard edges                                 0.35..0.8 + harmonics
``rings``           concentric sinusoidal rings, period 3..6 px                               0.33..0.67
``dots``            rotated grid of small hard dots, spacing 4..6 px                          0.33..0.5 + harmonics
``textured_fill``   band-passed Gaussian noise (annulus around rho 0.3..0.6)                  0.3..0.6
==================  =======================================================================  ====================

rho is spatial frequency as a fraction of Nyquist (docs/CONVENTIONS.md, metrics/spectral.py). Sizes of the
high-frequency classes are in pixels, so their spectra stay near Nyquist at any resolution; smooth content scales
with the image. Hard-edged classes are rendered at ``supersample`` x resolution and box-filtered down, band-limited
ones (sinusoids, filtered noise) are sampled directly.

Determinism: item ``i`` of split ``s`` with seed ``k`` draws all of its randomness from
``numpy.random.default_rng(SeedSequence([k, split_code(s), i]))``, so it is identical on every machine and every
call, independent of batch composition; ``train`` and ``heldout`` use disjoint streams. Classes are balanced:
item ``i`` has class ``classes[i % len(classes)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dmd_dar.errors import UserError

Tensor = torch.Tensor

__all__ = ["CLASS_NAMES", "CLASS_PHRASES", "COLOR_NAMES", "PALETTE", "SPLITS", "NUM_CLASSES", "ProceduralImages",
           "caption_for"]

CLASS_NAMES: tuple[str, ...] = ("smooth_blobs", "sharp_shapes", "stripes_low", "stripes_high", "checkers", "rings",
                                "dots", "textured_fill")
NUM_CLASSES = len(CLASS_NAMES)
#: How captions name each class (the words a text-conditioned model sees).
CLASS_PHRASES: dict[str, str] = {
    "smooth_blobs": "smooth blobs",
    "sharp_shapes": "sharp shapes",
    "stripes_low": "low-frequency stripes",
    "stripes_high": "high-frequency stripes",
    "checkers": "checkerboard",
    "rings": "concentric rings",
    "dots": "dot grid",
    "textured_fill": "noise texture",
}
#: Named colours, sRGB uint8.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (240, 130, 180),
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (120, 75, 40),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
_MIN_LUMA_CONTRAST = 0.2  # so every pattern is visible (and measurable) in luma


def _luma(rgb: tuple[int, int, int]) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0


_COLOR_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i, a in enumerate(COLOR_NAMES) for j, b in enumerate(COLOR_NAMES)
    if i != j and abs(_luma(PALETTE[a]) - _luma(PALETTE[b])) >= _MIN_LUMA_CONTRAST)
_PALETTE_T = torch.tensor([PALETTE[c] for c in COLOR_NAMES], dtype=torch.float32) / 127.5 - 1  # [K, 3] in [-1,1]


def caption_for(class_name: str, fg: str, bg: str) -> str:
    """``"red and blue high-frequency stripes"``: foreground colour, background colour, class phrase."""
    return f"{fg} and {bg} {CLASS_PHRASES[class_name]}"


# ---- parameter draws (per item, numpy scalars) ------------------------------------------------------------------
def _draw(cls: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A fixed-length float parameter vector for one item of class ``cls`` (pixel units)."""
    m = min(h, w)
    th = rng.uniform(0, math.pi)
    if cls == "smooth_blobs":  # 4 blobs: (cy, cx, sigma, amp)
        return np.concatenate([np.stack([rng.uniform(0, h, 4), rng.uniform(0, w, 4),
                                         rng.uniform(0.12, 0.25, 4) * m, rng.uniform(0.6, 1.2, 4)], 1).ravel()])
    if cls == "sharp_shapes":  # 3 shapes: (cy, cx, radius, angle, type, active)
        n = rng.integers(1, 4)
        p = np.stack([rng.uniform(0.2, 0.8, 3) * h, rng.uniform(0.2, 0.8, 3) * w, rng.uniform(0.15, 0.3, 3) * m,
                      rng.uniform(0, 2 * math.pi, 3), rng.integers(0, 3, 3).astype(float),
                      (np.arange(3) < n).astype(float)], 1)
        return p.ravel()
    if cls == "stripes_low":  # (theta, period, phase)
        return np.array([th, m / rng.uniform(2.0, 4.0), rng.uniform(0, 2 * math.pi)])
    if cls == "stripes_high":
        return np.array([th, rng.uniform(2.2, 3.0), rng.uniform(0, 2 * math.pi)])
    if cls == "checkers":  # (theta, cell, offset_u, offset_v)
        c = rng.uniform(2.5, 4.0)
        return np.array([th, c, rng.uniform(0, 2 * c), rng.uniform(0, 2 * c)])
    if cls == "rings":  # (cy, cx, period, phase)
        return np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(3.0, 6.0),
                         rng.uniform(0, 2 * math.pi)])
    if cls == "dots":  # (theta, spacing, radius, offset_u, offset_v)
        d = rng.uniform(4.0, 6.0)
        return np.array([th, d, rng.uniform(0.22, 0.32) * d, rng.uniform(0, d), rng.uniform(0, d)])
    if cls == "textured_fill":  # (rho_center,) + the white-noise field drawn separately
        return np.array([rng.uniform(0.3, 0.6)])
    raise AssertionError(cls)


# ---- vectorised renderers: params [N, P] -> mask [N, H*S, W*S] in [0, 1] ----------------------------------------
@lru_cache(maxsize=32)
def _grid(h: int, w: int, s: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in output-pixel units at supersampling ``s``: y [1, H*s, 1], x [1, 1, W*s]."""
    y = (torch.arange(h * s, dtype=torch.float32) + 0.5) / s
    x = (torch.arange(w * s, dtype=torch.float32) + 0.5) / s
    return y.view(1, -1, 1), x.view(1, 1, -1)


def _col(p: Tensor, i: int) -> Tensor:
    return p[:, i].view(-1, 1, 1)  # [N, 1, 1]


def _rotated(p: Tensor, h: int, w: int, s: int, i_theta: int = 0) -> tuple[Tensor, Tensor]:
    y, x = _grid(h, w, s)
    th = _col(p, i_theta)
    return x * torch.cos(th) + y * torch.sin(th), -x * torch.sin(th) + y * torch.cos(th)  # [N, Hs, Ws] each


def _render(cls: str, p: Tensor, noise: Tensor | None, h: int, w: int, s: int) -> Tensor:
    y, x = _grid(h, w, s)
    if cls == "smooth_blobs":
        q = p.view(p.shape[0], 4, 4)  # [N, blob, (cy, cx, sigma, amp)]
        cy, cx, sg, amp = (q[..., k].view(-1, 4, 1, 1) for k in range(4))
        field = (amp * torch.exp(-((y[:, None] - cy) ** 2 + (x[:, None] - cx) ** 2) / (2 * sg**2))).sum(1)
        return 1 - torch.exp(-2 * field)  # soft saturation keeps it smooth
    if cls == "sharp_shapes":
        q = p.view(p.shape[0], 3, 6)
        cy, cx, r, ang, typ, act = (q[..., k].view(-1, 3, 1, 1) for k in range(6))
        dy, dx = y[:, None] - cy, x[:, None] - cx  # [N, 3, Hs, Ws]
        u = dx * torch.cos(ang) + dy * torch.sin(ang)
        v = -dx * torch.sin(ang) + dy * torch.cos(ang)
        disc = dx**2 + dy**2 <= r**2
        square = torch.maximum(u.abs(), v.abs()) <= 0.8 * r
        tri = torch.ones_like(disc)
        for k in range(3):  # equilateral triangle: inside all three half-planes at the inradius r/2
            a = 2 * math.pi * k / 3
            tri = tri & (u * math.cos(a) + v * math.sin(a) <= 0.5 * r)
        inside = torch.where(typ == 0, disc, torch.where(typ == 1, square, tri)) & (act > 0)
        return inside.any(1).float()
    if cls in ("stripes_low", "stripes_high"):
        u, _ = _rotated(p, h, w, s)
        return 0.5 + 0.5 * torch.cos(2 * math.pi * u / _col(p, 1) + _col(p, 2))
    if cls == "checkers":
        u, v = _rotated(p, h, w, s)
        c = _col(p, 1)
        return ((torch.floor((u + _col(p, 2)) / c) + torch.floor((v + _col(p, 3)) / c)) % 2).float()
    if cls == "rings":
        r = torch.sqrt((y - _col(p, 0)) ** 2 + (x - _col(p, 1)) ** 2)
        return 0.5 + 0.5 * torch.cos(2 * math.pi * r / _col(p, 2) + _col(p, 3))
    if cls == "dots":
        u, v = _rotated(p, h, w, s)
        d = _col(p, 1)
        du = torch.remainder(u + _col(p, 3), d) - d / 2
        dv = torch.remainder(v + _col(p, 4), d) - d / 2
        return (du**2 + dv**2 <= _col(p, 2) ** 2).float()
    if cls == "textured_fill":
        fy = torch.fft.fftfreq(h).view(1, -1, 1)
        fx = torch.fft.rfftfreq(w).view(1, 1, -1)
        rho = torch.sqrt(fx**2 + fy**2) / 0.5
        filt = torch.exp(-((rho - _col(p, 0)) ** 2) / (2 * 0.08**2))  # Gaussian annulus in rho
        n = torch.fft.irfft2(torch.fft.rfft2(noise) * filt, s=(h, w))  # [N, H, W]
        n = n / n.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        return (0.5 + 0.2 * n).clamp(0, 1)
    raise AssertionError(cls)


_SUPERSAMPLED = {"sharp_shapes", "checkers", "dots", "rings"}


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(v) for v in size)
    if h < 8 or w < 8:
        raise UserError(f"procedural image size must be at least 8x8, got {h}x{w}")
    return h, w


class ProceduralImages(Dataset):
    """Seeded procedural RGB images in ``[-1, 1]``; items are ``(image [3, H, W] float32, class_id, caption)``.

    Args:
        split: ``"train"`` or ``"heldout"`` (disjoint random streams).
        length: number of items (the dataset is infinite in principle; this sets ``len``).
        size: ``H`` (square) or ``(H, W)``; default 32.
        seed: base seed; item ``i`` is a pure function of ``(seed, split, i, size)``.
        classes: optional subset of :data:`CLASS_NAMES`; class ids stay the global ones.
        supersample: render factor for hard-edged classes (box-filtered down).

    ``render(indices)`` / ``__getitems__`` build a whole batch at once (thousands of 32x32 images per second).
    """

    def __init__(self, split: str = "train", length: int = 10_000, size: int | Sequence[int] = 32, seed: int = 0,
                 classes: Sequence[str] | None = None, supersample: int = 4):
        if split not in SPLITS:
            raise UserError(f"unknown procedural split {split!r}; use one of {list(SPLITS)}")
        if length < 1:
            raise UserError(f"procedural dataset length must be >= 1, got {length}")
        names = tuple(classes) if classes is not None else CLASS_NAMES
        bad = [c for c in names if c not in CLASS_NAMES]
        if bad or not names:
            raise UserError(f"unknown procedural classes {bad or '[]'}; choose from {list(CLASS_NAMES)}")
        self.split, self.length, self.seed = split, int(length), int(seed)
        self.height, self.width = _size(size)
        self.class_ids = [CLASS_NAMES.index(c) for c in names]
        self.supersample = max(1, int(supersample))

    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], int(index)]))

    def describe(self, index: int) -> dict:
        """Class and colours of item ``index`` without rendering it."""
        index = self._check(index)
        cid = self.class_ids[index % len(self.class_ids)]
        fg, bg = _COLOR_PAIRS[self._rng(index).integers(len(_COLOR_PAIRS))]
        name = CLASS_NAMES[cid]
        return {"index": index, "class_id": cid, "class_name": name, "fg": COLOR_NAMES[fg], "bg": COLOR_NAMES[bg],
                "caption": caption_for(name, COLOR_NAMES[fg], COLOR_NAMES[bg])}

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a procedural dataset of length {self.length}")
        return index

    def render(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, list[str]]:
        """Batch of items: images [N, 3, H, W] float32 in [-1, 1], class ids [N] long, captions (list of str)."""
        h, w = self.height, self.width
        idx = [self._check(i) for i in indices]
        n = len(idx)
        cids = torch.empty(n, dtype=torch.long)
        colors = torch.empty(n, 2, dtype=torch.long)
        captions: list[str] = [""] * n
        groups: dict[int, list[int]] = {}
        params: list[np.ndarray] = [np.empty(0)] * n
        noises: dict[int, np.ndarray] = {}
        for j, i in enumerate(idx):
            rng = self._rng(i)  # draw order is fixed: colours, then class parameters, then noise
            cid = self.class_ids[i % len(self.class_ids)]
            fg, bg = _COLOR_PAIRS[rng.integers(len(_COLOR_PAIRS))]
            name = CLASS_NAMES[cid]
            params[j] = _draw(name, rng, h, w)
            if name == "textured_fill":
                noises[j] = rng.standard_normal((h, w)).astype(np.float32)
            cids[j], colors[j, 0], colors[j, 1] = cid, fg, bg
            captions[j] = caption_for(name, COLOR_NAMES[fg], COLOR_NAMES[bg])
            groups.setdefault(cid, []).append(j)
        mask = torch.empty(n, h, w)
        for cid, js in groups.items():
            name = CLASS_NAMES[cid]
            p = torch.from_numpy(np.stack([params[j] for j in js])).float()  # [n_c, P]
            noise = torch.from_numpy(np.stack([noises[j] for j in js])) if name == "textured_fill" else None
            s = self.supersample if name in _SUPERSAMPLED else 1
            m = _render(name, p, noise, h, w, s)  # [n_c, H*s, W*s]
            if s > 1:
                m = F.avg_pool2d(m.unsqueeze(1), s).squeeze(1)  # box filter = area antialiasing
            mask[js] = m
        fg_rgb = _PALETTE_T[colors[:, 0]].view(n, 3, 1, 1)
        bg_rgb = _PALETTE_T[colors[:, 1]].view(n, 3, 1, 1)
        images = bg_rgb + (fg_rgb - bg_rgb) * mask.unsqueeze(1)  # [N, 3, H, W]
        return images.clamp(-1, 1), cids, captions

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        images, cids, captions = self.render([index])
        return images[0], int(cids[0]), captions[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int, str]]:
        """Batched fetch used by ``torch.utils.data.DataLoader`` (one vectorised render per batch)."""
        images, cids, captions = self.render(indices)
        return [(images[j], int(cids[j]), captions[j]) for j in range(len(captions))]

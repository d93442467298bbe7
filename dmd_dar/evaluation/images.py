"""Image sets for evaluation: a folder of PNGs (with or without ``manifest.jsonl``) read at native resolution.

A set knows its files, manifest records, sample keys (for pairing), group labels (class or prompt) and captions,
and decodes batches on demand as float tensors ``[N, 3, H, W]`` in [-1, 1]. Every image is checked once for its
size (from the file header) so unreadable files and mixed sizes fail early, with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dmd_dar.data.folder import IMAGE_EXTENSIONS, read_rgb
from dmd_dar.data.manifest import MANIFEST_NAME, read_manifest
from dmd_dar.data.procedural import CLASS_PHRASES
from dmd_dar.errors import UserError
from dmd_dar.metrics.pairing import sample_key

_FILTERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX}
_SKIP_FILES = {"grid.png"}  # written beside samples by `dmd-dar sample`; not a sample
_CACHE_BYTES = 1 << 30  # decoded sets up to 1 GiB (uint8) stay in memory across metrics


def _phrase(class_name: str) -> str:
    return CLASS_PHRASES.get(class_name, class_name.replace("_", " "))


def _read_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); re-export it as PNG or remove it "
                        "(and its manifest line)") from None
    return h, w


class ImageSet:
    """One folder of images. ``records`` are the manifest's (or ``{"file": ...}`` without a manifest)."""

    def __init__(self, name: str, folder: str | os.PathLike, class_template: str = "{phrase}",
                 text_source: str = "caption") -> None:
        self.name = name
        self.path = Path(folder)
        if not self.path.is_dir():
            raise UserError(f"image folder {self.path} ('{name}') does not exist; pass a folder of PNGs "
                            f"(ideally with a {MANIFEST_NAME} written by `dmd-dar sample`)")
        self.has_manifest = (self.path / MANIFEST_NAME).is_file()
        if self.has_manifest:
            self.records = read_manifest(self.path)
        else:
            files = sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in _SKIP_FILES)
            if not files:
                raise UserError(f"no images in {self.path} ('{name}'); add PNG files or a {MANIFEST_NAME}")
            self.records = [{"file": f} for f in files]
        self.files = [self.path / r["file"] for r in self.records]
        sizes = [_read_size(p) for p in self.files]
        for p, s in zip(self.files, sizes):
            if s != sizes[0]:
                raise UserError(f"{p} is {s[1]}x{s[0]} but {self.files[0].name} is {sizes[0][1]}x{sizes[0][0]}: "
                                f"images of one set ('{name}') must share one resolution; resize or remove it")
        self.native_size: tuple[int, int] = sizes[0]  # (H, W) on disk
        self.size = self.native_size  # (H, W) as evaluated (after an optional resize)
        self.resize: dict[str, Any] | None = None
        self._filter = None
        self._cache: torch.Tensor | None = None
        self.groups = [self._group(r) for r in self.records]
        self.captions = [self._caption(r, class_template, text_source) for r in self.records]
        self.keys, self.key_problem = self._keys()

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def _group(r: dict[str, Any]) -> str | None:
        if r.get("class_name") is not None:
            return str(r["class_name"])
        if r.get("class_id") is not None:
            return f"class {int(r['class_id'])}"
        if r.get("caption") is not None:
            return str(r["caption"])
        return None

    @staticmethod
    def _caption(r: dict[str, Any], template: str, source: str) -> str | None:
        """The text CLIP scores the image against: its caption or its class prompt (``source`` first)."""
        cls = None
        if r.get("class_name") is not None:
            cls = template.format(phrase=_phrase(str(r["class_name"])), class_name=str(r["class_name"]))
        cap = str(r["caption"]) if r.get("caption") else None
        return (cls or cap) if source == "class" else (cap or cls)

    def _keys(self) -> tuple[list | None, str | None]:
        if not self.has_manifest:
            return None, f"{self.path / MANIFEST_NAME} (records with seed/index and class_id or caption)"
        try:
            return [sample_key(r) for r in self.records], None
        except UserError as e:
            return None, f"seed/index in every record of {self.path / MANIFEST_NAME} ({e})"

    @property
    def has_groups(self) -> bool:
        return any(g is not None for g in self.groups)

    def group_indices(self) -> dict[str, list[int]]:
        """Group label -> sample indices, groups in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            if g is not None:
                out.setdefault(g, []).append(i)
        return out

    def resize_to(self, size: tuple[int, int], filter_name: str) -> None:
        """Evaluate this set at ``size`` (H, W): centre crop to the aspect ratio, then resize with ``filter_name``."""
        h, w = self.native_size
        th, tw = size
        scale = max(tw / w, th / h)
        cw, ch = min(w, round(tw / scale)), min(h, round(th / scale))
        self._box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        self._filter = _FILTERS[filter_name]
        self.size = (th, tw)
        self._cache = None
        self.resize = {"from": [h, w], "to": [th, tw], "filter": f"PIL {filter_name.upper()}",
                       "crop": None if (cw, ch) == (w, h) else {"box": list(self._box), "mode": "centre"},
                       "note": "the resize filter attenuates the top band near Nyquist: read rho > 0.8 with care"}

    def _decode(self, i: int) -> np.ndarray:
        p = self.files[i]
        im = read_rgb(p)
        if self._filter is not None:
            im = im.resize((self.size[1], self.size[0]), self._filter, box=self._box, reducing_gap=None)
        arr = np.asarray(im, dtype=np.uint8)  # [H, W, 3]
        if arr.shape[:2] != tuple(self.size):
            raise UserError(f"{p} decodes to {arr.shape[1]}x{arr.shape[0]}, expected {self.size[1]}x{self.size[0]}")
        return arr

    def _uint8(self, idx: Sequence[int]) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[list(idx)]
        arr = np.stack([self._decode(i) for i in idx])  # [n, H, W, 3]
        return torch.from_numpy(arr).permute(0, 3, 1, 2)  # [n, 3, H, W]

    def load(self, idx: Sequence[int]) -> torch.Tensor:
        """Images ``idx`` as float32 ``[n, 3, H, W]`` in [-1, 1]."""
        h, w = self.size
        if self._cache is None and len(self) * 3 * h * w <= _CACHE_BYTES:
            self._cache = self._uint8(range(len(self)))
        return self._uint8(idx).float() / 127.5 - 1

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        for s in range(0, len(self), batch_size):
            idx = list(range(s, min(s + batch_size, len(self))))
            yield idx, self.load(idx)

    def describe(self) -> dict[str, Any]:
        """The set's entry in the metrics protocol."""
        return {"path": str(self.path.resolve()), "n": len(self), "resolution": list(self.size),
                "native_resolution": list(self.native_size), "manifest": self.has_manifest,
                "pairable": self.keys is not None, "groups": len(self.group_indices()),
                "resize": self.resize, "file_format": sorted({p.suffix.lower() for p in self.files})}

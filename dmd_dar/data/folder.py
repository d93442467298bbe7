"""A folder of the user's own images (png / jpg / webp), with optional captions and sub-folder classes.

Layout::

    root/
      captions.jsonl        optional: {"file": "cats/001.png", "caption": "..."} per line (paths relative to root)
      cats/001.png          class "cats" (sub-folder names become classes, sorted)
      cats/001.txt          optional per-image caption (used when no captions.jsonl lists the image)
      dogs/002.jpg

Items are ``(image [3, H, W] float32 in [-1, 1], class_id, caption)`` like :class:`ProceduralImages`; class_id
is -1 for images directly in ``root`` (or all images when ``class_from_subfolders=False``), caption is ``""``
when none is given. Images are converted to RGB, center-cropped to the target aspect ratio and resized with a
bicubic filter (antialiased downscaling).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dmd_dar.errors import UserError
from dmd_dar.utils.io import iter_jsonl_objects

__all__ = ["ImageFolderDataset", "IMAGE_EXTENSIONS", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Files that may sit next to images without being images.
_SIDE_FILES = {"captions.jsonl", "manifest.jsonl", "metadata.jsonl"}


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(v) for v in image_size)
    return h, w


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode one image file as an RGB PIL image; a ``UserError`` naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); re-export it as PNG/JPEG or "
                        "remove it") from None


def load_image(path: str | os.PathLike, image_size: int | Sequence[int]) -> torch.Tensor:
    """Read one image as RGB, center-crop to the target aspect, resize; returns [3, H, W] float32 in [-1, 1].

    Raises ``UserError`` naming the file when it cannot be read or decoded.
    """
    h, w = _size(image_size)
    im = read_rgb(path)
    iw, ih = im.size
    scale = max(w / iw, h / ih)  # crop the largest centred box with the target aspect ratio
    cw, ch = min(iw, round(w / scale)), min(ih, round(h / scale))
    left, top = (iw - cw) // 2, (ih - ch) // 2
    im = im.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch), reducing_gap=None)
    arr = np.asarray(im, dtype=np.float32)  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1  # [3, H, W]


class ImageFolderDataset(Dataset):
    """Images under ``root`` (recursive), resized to ``image_size``; optional captions and classes.

    Args:
        root: the folder.
        image_size: ``S`` (square) or ``(H, W)``.
        captions_file: a ``.jsonl`` of ``{"file", "caption"}`` (``file`` relative to ``root``); default:
            ``root/captions.jsonl`` if present. Per-image ``<name>.txt`` files fill in the rest.
        require_captions: raise if any image has no caption.
        class_from_subfolders: use the first path component under ``root`` as the class.
        on_invalid: ``"error"`` (default) or ``"skip"`` for non-image files (and, with ``verify``, unreadable
            images).
        verify: decode every image once at construction, so a broken file fails early (or is skipped).
    """

    def __init__(self, root: str | os.PathLike, image_size: int | Sequence[int] = 32,
                 captions_file: str | os.PathLike | None = None, require_captions: bool = False,
                 class_from_subfolders: bool = True, on_invalid: str = "error", verify: bool = False):
        if on_invalid not in ("error", "skip"):
            raise UserError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        self.root = Path(root)
        self.image_size = _size(image_size)
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist; pass a folder of png/jpg/webp images")
        files: list[Path] = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if p.is_dir() or any(part.startswith(".") for part in rel.parts):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
            elif p.suffix.lower() == ".txt" or rel.as_posix() in _SIDE_FILES or (
                    captions_file is not None and p.resolve() == Path(captions_file).resolve()):
                continue
            elif on_invalid == "error":
                raise UserError(f"{p} is not an image ({'/'.join(IMAGE_EXTENSIONS)}); remove it or pass "
                                "on_invalid='skip'")
        if verify:
            kept = []
            for p in files:
                try:
                    with Image.open(p) as im:
                        im.verify()
                    kept.append(p)
                except Exception as e:  # PIL raises many types for broken files
                    if on_invalid == "error":
                        raise UserError(f"cannot read image {p} ({type(e).__name__}); re-export it or pass "
                                        "on_invalid='skip'") from None
            files = kept
        if not files:
            raise UserError(f"no images found in {self.root}; add {'/'.join(IMAGE_EXTENSIONS)} files (sub-folders "
                            "become classes)")
        self.files = files
        rels = [p.relative_to(self.root) for p in files]

        # classes from sub-folders
        self.class_names: list[str] = sorted({r.parts[0] for r in rels if len(r.parts) > 1}) \
            if class_from_subfolders else []
        cmap = {n: i for i, n in enumerate(self.class_names)}
        self.class_ids = [cmap[r.parts[0]] if len(r.parts) > 1 and r.parts[0] in cmap else -1 for r in rels]

        # captions: jsonl first, then sidecar .txt
        table: dict[str, str] = {}
        cap_path = Path(captions_file) if captions_file is not None else self.root / "captions.jsonl"
        if captions_file is not None and not cap_path.is_file():
            raise UserError(f"captions file {cap_path} not found; fix the path or omit captions_file")
        if cap_path.is_file():
            table = self._read_captions(cap_path)
        self.captions: list[str | None] = []
        for p, r in zip(files, rels):
            cap = table.get(r.as_posix())
            side = p.with_suffix(".txt")
            if cap is None and side.is_file():
                cap = side.read_text(encoding="utf-8").strip()
            if cap is None and require_captions:
                raise UserError(f"image {p} has no caption; add it to {cap_path.name} as "
                                f'{{"file": "{r.as_posix()}", "caption": ...}} or write {side.name}')
            self.captions.append(cap)

    @staticmethod
    def _read_captions(path: Path) -> dict[str, str]:
        table: dict[str, str] = {}
        for lineno, rec in iter_jsonl_objects(path):
            if not isinstance(rec.get("file"), str) or not isinstance(rec.get("caption"), str):
                raise UserError(f'{path}:{lineno}: expected {{"file": "<path under root>", "caption": "..."}}')
            table[Path(rec["file"]).as_posix()] = rec["caption"]
        return table

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        return load_image(self.files[index], self.image_size), self.class_ids[index], self.captions[index] or ""

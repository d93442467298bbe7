"""Sample folders: PNG files plus ``manifest.jsonl`` (docs/CONVENTIONS.md), and image grids.

A manifest has one JSON object per line, e.g.
``{"file": "00000.png", "index": 0, "seed": 123, "class_id": 3, "class_name": "...", "caption": "..."}``;
only ``file`` is required. ``dmd-dar sample`` writes folders with :func:`save_png_folder`, ``dmd-dar eval`` reads
them with :func:`read_manifest`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmd_dar.errors import UserError
from dmd_dar.utils.io import atomic_write, atomic_write_text, iter_jsonl_objects

__all__ = ["MANIFEST_NAME", "write_manifest", "read_manifest", "save_png_folder", "save_grid", "to_uint8",
           "make_grid"]

MANIFEST_NAME = "manifest.jsonl"


def write_manifest(folder: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``folder/manifest.jsonl`` atomically; every record needs a ``file`` key (relative to ``folder``)."""
    lines = []
    for i, rec in enumerate(records):
        if "file" not in rec:
            raise UserError(f"manifest record {i} for {folder} has no 'file' key; add the image's file name")
        lines.append(json.dumps(rec, sort_keys=False, default=str))
    return atomic_write_text("".join(line + "\n" for line in lines), Path(folder) / MANIFEST_NAME)


def read_manifest(folder: str | os.PathLike, check_files: bool = True) -> list[dict[str, Any]]:
    """Read ``folder/manifest.jsonl`` into a list of dicts, in file order.

    Raises ``UserError`` naming the file (and line) for: a missing folder or manifest, invalid JSON, a record
    that is not an object or lacks ``file``, a duplicate ``file``, and (with ``check_files``) a listed image
    that does not exist.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise UserError(f"sample folder {folder} does not exist; pass a folder written by `dmd-dar sample`")
    if not path.is_file():
        raise UserError(f"{path} not found; a sample folder needs a {MANIFEST_NAME} with one "
                        '{"file": ...} object per image (write it with dmd_dar.data.manifest.write_manifest)')
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl_objects(path):
        if not isinstance(rec.get("file"), str):
            raise UserError(f"{path}:{lineno}: each line must be a JSON object with a string 'file' key")
        if rec["file"] in seen:
            raise UserError(f"{path}:{lineno}: file {rec['file']!r} is listed twice; keep one record per image")
        seen.add(rec["file"])
        if check_files and not (folder / rec["file"]).is_file():
            raise UserError(f"{path}:{lineno}: image {rec['file']!r} is missing from {folder}; "
                            "restore it or drop its line")
        records.append(rec)
    if not records:
        raise UserError(f"{path} lists no images; regenerate the sample folder")
    return records


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [N, C, H, W] (or [C, H, W]) in [-1, 1] to uint8 HWC numpy (round to nearest, clipped)."""
    x = images.detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, C, H, W]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, 3]


def _save_png(arr: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_png_folder(images: torch.Tensor, folder: str | os.PathLike,
                    records: Sequence[dict[str, Any]] | None = None, start_index: int = 0) -> list[dict[str, Any]]:
    """Save images [N, 3, H, W] in [-1, 1] as ``{index:05d}.png`` and update ``manifest.jsonl``.

    ``records[j]`` (optional) holds metadata for image j (seed, class_id, class_name, caption, ...); ``file`` and
    ``index`` are filled in. With ``start_index == 0`` the manifest is replaced; otherwise the new records are
    appended to the existing ones (batch-by-batch sampling), replacing records for the same files.
    Returns the records written for this batch.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrs = to_uint8(images)
    if records is not None and len(records) != len(arrs):
        raise ValueError(f"got {len(arrs)} images but {len(records)} records")
    new = []
    for j, arr in enumerate(arrs):
        index = start_index + j
        rec = {"file": f"{index:05d}.png", "index": index, **(dict(records[j]) if records is not None else {})}
        rec["file"], rec["index"] = f"{index:05d}.png", index
        _save_png(arr, folder / rec["file"])
        new.append(rec)
    old: list[dict[str, Any]] = []
    if start_index > 0 and (folder / MANIFEST_NAME).is_file():
        names = {r["file"] for r in new}
        old = [r for r in read_manifest(folder, check_files=False) if r["file"] not in names]
    write_manifest(folder, old + new)
    return new


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images [N, C, H, W] into one [C, rows*(H+p)+p, nrow*(W+p)+p] image (same value range)."""
    n, c, h, w = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value,
                      dtype=images.dtype)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[k].detach().cpu()
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2) -> Path:
    """Save images [N, C, H, W] in [-1, 1] as one PNG grid with white padding."""
    arr = to_uint8(make_grid(images.detach().float().cpu(), nrow, padding, pad_value=1.0))[0]
    path = Path(path)
    _save_png(arr, path)
    return path

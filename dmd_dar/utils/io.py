"""Atomic file writes: a crash or a full disk never leaves a half-written file in place of a good one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmd_dar.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the new one. If ``write`` raises
    (for example ``OSError: No space left on device``), the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Save a flat tensor dict as safetensors, atomically. Tensors are made contiguous and moved to CPU."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def iter_jsonl_objects(path: str | os.PathLike):
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file whose lines are JSON objects.

    A line that is not valid JSON, or not an object, raises a ``UserError`` naming ``path:line``.
    """
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object")
            yield lineno, rec


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into a one-line ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass the path of an existing .safetensors checkpoint")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises SafetensorError / OSError variants
        raise UserError(f"{path}: not a readable safetensors file ({exc}); re-export or re-download it") from exc

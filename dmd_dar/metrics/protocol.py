"""Helpers that describe how a metric was computed: weights fingerprints and package versions."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import metadata
from typing import Any

from dmd_dar.utils.io import file_digest

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "open_clip_torch", "lpips", "safetensors", "pillow")


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages a metric depends on (``None`` when not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so an edited file is hashed again.
    return file_digest(path)


def file_fingerprint(path: str | os.PathLike, prefix: int = 16) -> dict[str, Any]:
    """``{"file": abs path, "sha256": first ``prefix`` hex digits, "bytes": size}`` of a weights file."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    return {"file": p, "sha256": _sha256(p, st.st_size, st.st_mtime_ns)[:prefix], "bytes": st.st_size}

"""The ``device`` setting of the commands (``auto | cpu | cuda[:N]``) -> a torch device."""

from __future__ import annotations

import torch

from dmd_dar.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; an explicit ``cuda`` without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu")
    return torch.device(name)

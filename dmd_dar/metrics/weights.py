"""Loading metric weights files without executing code (safetensors, or torch.load with weights_only=True)."""

from __future__ import annotations

import os

import torch

from dmd_dar.errors import UserError
from dmd_dar.metrics.availability import MetricUnavailable


def load_weights_file(path: str | os.PathLike, metric: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.load(weights_only=True)`` file; never executes code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricUnavailable(metric, path, "weights file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickles with code, corrupt files
            raise UserError(f"cannot load weights from {path} with weights_only=True ({err}); "
                            "convert it to .safetensors") from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}

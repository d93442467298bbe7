"""Native SiT/DiT with pluggable routing (plain residual or DAR), presets, conversion and checkpoints."""

from dmd_dar.models.config import PRESETS, ModelConfig, preset_config
from dmd_dar.models.convert import (
    is_identity_router,
    load_model,
    load_weights,
    read_config,
    save_model,
    to_dar,
    to_residual,
)
from dmd_dar.models.optim import param_groups
from dmd_dar.models.sit import ModelInternals, SiT, build_model

__all__ = [
    "PRESETS", "ModelConfig", "ModelInternals", "SiT", "build_model", "is_identity_router", "load_model",
    "load_weights", "param_groups", "preset_config", "read_config", "save_model", "to_dar", "to_residual",
]

"""``ModelConfig`` (the native SiT/DiT schema) and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig


@dataclass
class ModelConfig:
    """Architecture of a native SiT/DiT. Defaults are the sizes of the project's ``embedded`` teacher (whose
    config, like the ``embedded`` preset, also turns on ``relative_position_bias`` and ``mlp_conv=3``).

    image_size:          input side length (pixels or latent cells); must be divisible by patch_size.
    in_channels:         input channels (3 for RGB pixels, 4 for SD-VAE latents).
    patch_size:          side of a square patch; tokens = (image_size / patch_size)^2.
    hidden_size:         model width d; divisible by num_heads and by 4 (2-D sin-cos positions).
    depth:               number of blocks; the router sees 2 * depth sublayers.
    num_classes:         0 = unconditional; otherwise labels 0..num_classes-1 plus the null label num_classes.
    class_dropout_prob:  probability of replacing a label by the null label in training (CFG).
    learn_sigma:         output 2 * in_channels channels (DiT's learned variance); off for flow/eps models.
    relative_position_bias: add a learned, zero-initialised bias per head and 2-D patch offset to the attention
                         logits (Swin's relative position bias) on top of the sin-cos positions; the embedded
                         teacher uses it (see ``dmd_dar.models.layers.RelativePositionBias`` for why).
    mlp_conv:            0 = off; k (odd) = a zero-initialised depthwise k x k convolution over the patch grid
                         inside every MLP (``dmd_dar.models.layers.Mlp`` says why).
    routing:             residual connections or DAR (``dmd_dar.routing.RoutingConfig``).
    gradient_checkpointing: recompute each sublayer in backward (the router's aggregation is not recomputed).
    """

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 8  # the procedural dataset's classes
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    relative_position_bias: bool = False
    mlp_conv: int = 0
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.routing, dict):
            self.routing = routing_from_dict(self.routing)
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.{name}={value!r} must be a positive integer")
        if self.image_size % self.patch_size:
            raise UserError(f"model.image_size={self.image_size} is not divisible by model.patch_size="
                            f"{self.patch_size}; pick a patch size that divides the image size")
        if self.hidden_size % self.num_heads:
            raise UserError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                            f"{self.num_heads}; pick a head count that divides the width")
        if self.hidden_size % 4:
            raise UserError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 "
                            "(2-D sin-cos position embeddings split it in four)")
        if not isinstance(self.relative_position_bias, bool):
            raise UserError(f"model.relative_position_bias={self.relative_position_bias!r} must be true or false")
        if (not isinstance(self.mlp_conv, int) or isinstance(self.mlp_conv, bool) or self.mlp_conv < 0
                or (self.mlp_conv and self.mlp_conv % 2 == 0)):
            raise UserError(f"model.mlp_conv={self.mlp_conv!r} must be 0 (off) or an odd kernel size such as 3")
        if not self.mlp_ratio > 0:
            raise UserError(f"model.mlp_ratio={self.mlp_ratio} must be > 0")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise UserError(f"model.num_classes={self.num_classes!r} must be an integer >= 0 (0 = unconditional)")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise UserError(f"model.class_dropout_prob={self.class_dropout_prob} must lie in [0, 1]")
        if not isinstance(self.routing, RoutingConfig):
            raise UserError(f"model.routing must be a RoutingConfig, got {type(self.routing).__name__}")
        self.routing.validate()

    @property
    def num_sublayers(self) -> int:
        return 2 * self.depth

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are a ``UserError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"model config has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def routing_from_dict(data: dict[str, Any]) -> RoutingConfig:
    known = {f.name for f in fields(RoutingConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"model.routing has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if data.get("kernel") == "triton":
        # A saved model records the kernel it trained with; where it is loaded (a CPU machine that samples it)
        # the kernel may not run, and the results are the same either way.
        data = {**data, "kernel": "auto"}
    return RoutingConfig(**data)


# SiT sizes (Ma et al. 2024, same as DiT); latent-space presets for 256^2 images through the SD-VAE (32x32x4).
_SIT_LATENT = dict(image_size=32, in_channels=4, patch_size=2, num_classes=1000)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=16, in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=4),
    "embedded": dict(image_size=32, in_channels=3, patch_size=4, hidden_size=128, depth=6, num_heads=4,
                     num_classes=8, relative_position_bias=True, mlp_conv=3),
    "SiT-S/2": dict(_SIT_LATENT, hidden_size=384, depth=12, num_heads=6),
    "SiT-B/2": dict(_SIT_LATENT, hidden_size=768, depth=12, num_heads=12),
    "SiT-L/2": dict(_SIT_LATENT, hidden_size=1024, depth=24, num_heads=16),
    "SiT-XL/2": dict(_SIT_LATENT, hidden_size=1152, depth=28, num_heads=16),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a named preset, with keyword overrides (e.g. ``routing=RoutingConfig(kind="dar")``)."""
    if name not in PRESETS:
        raise UserError(f"model preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})

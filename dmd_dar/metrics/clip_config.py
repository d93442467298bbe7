"""Architecture of the small in-domain CLIP (``dmd-dar train-clip``) as an open_clip model config.

The model is a plain ``open_clip.CLIP`` (ViT image tower, open_clip text transformer, bundled BPE tokenizer), so
the saved folder is an ordinary open_clip ``local-dir:`` model: ``open_clip_config.json`` (``model_cfg`` +
``preprocess_cfg``) beside ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmd_dar.errors import UserError

#: open_clip's bundled BPE vocabulary size (SimpleTokenizer); token ids index the text embedding table.
BPE_VOCAB_SIZE = 49408


@dataclass
class ClipArchConfig:
    """A tiny ViT + text transformer for 32 x 32 inputs.

    The text width is the main size knob: the token table holds all 49408 BPE rows (the tokenizer is open_clip's
    own, so ids cannot be remapped), i.e. ``49408 * text_width`` parameters; 64 keeps the fp16 file under 10 MB.
    """

    embed_dim: int = 128
    image_size: int = 32
    patch_size: int = 8  # 16 tokens: the CPU budget; an 8x8 linear patch embedding still sees near-Nyquist texture
    vision_width: int = 128
    vision_layers: int = 6
    vision_head_width: int = 32
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 4
    context_length: int = 32
    # [-1, 1] images are what the library uses; mean = std = 0.5 maps uint8/255 back onto exactly that range.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_head_width",
                     "text_width", "text_heads", "text_layers", "context_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"clip.{name}={v!r} must be a positive integer")
        if self.image_size % self.patch_size:
            raise UserError(f"clip.image_size={self.image_size} is not divisible by clip.patch_size={self.patch_size}")
        if self.vision_width % self.vision_head_width:
            raise UserError(f"clip.vision_width={self.vision_width} is not divisible by "
                            f"clip.vision_head_width={self.vision_head_width}")
        if self.text_width % self.text_heads:
            raise UserError(f"clip.text_width={self.text_width} is not divisible by clip.text_heads={self.text_heads}")

    def model_cfg(self) -> dict[str, Any]:
        """The open_clip ``model_cfg`` dict (the format of open_clip's ``model_configs/*.json``)."""
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": False,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                           "layers": self.vision_layers, "head_width": self.vision_head_width, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": self.context_length, "vocab_size": BPE_VOCAB_SIZE,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
        }

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip ``preprocess_cfg``: eval transform = bicubic resize (shortest side) + centre crop + normalise."""
        return {"size": self.image_size, "mode": "RGB", "mean": list(self.image_mean), "std": list(self.image_std),
                "interpolation": "bicubic", "resize_mode": "shortest"}

"""DAR adapter for ``DiTTransformer2DModel`` (diffusers ``models/transformers/dit_transformer_2d.py``).

Mirrors ``DiTTransformer2DModel.forward``: patch embedding, the block loop (L184 in 0.35-0.42.1; each
``BasicTransformerBlock`` with ``ada_norm_zero`` split into attention + MLP sublayers by
``basic_block.ada_norm_zero_block``), then the head conditioned on ``transformer_blocks[0].norm1.emb`` (L208)
and the unpatchify. Sublayers: 2 per block. e(t) for ``static_t`` queries is that same conditioning vector
(timestep + class embedding), projected by each aggregator's zero-initialised time gain.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from dmd_dar.backbones.basic_block import ada_norm_zero_block, attention_kwargs
from dmd_dar.backbones.common import RoutedStream
from dmd_dar.backbones.wrapper import DARTransformer


class DiTDAR(DARTransformer):
    """``DiTTransformer2DModel`` with DAR routing; ``forward`` has the stock signature and outputs."""

    model_class = "DiTTransformer2DModel"
    mirrors = (
        "diffusers.models.attention:BasicTransformerBlock.forward",
        "diffusers.models.transformers.dit_transformer_2d:DiTTransformer2DModel.forward",
    )

    def image_plan(self) -> tuple[int, tuple[int, ...]]:
        return 2 * len(self.transformer.transformer_blocks), ()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        model = self.transformer
        patch = model.patch_size

        # 1. Patch embedding (+ fixed sin-cos positions) = v_0.
        hidden_states = model.pos_embed(hidden_states)  # [B, T, D]
        # The head's conditioning (timestep + class), computed before the loop here because it is also e(t).
        conditioning = model.transformer_blocks[0].norm1.emb(timestep, class_labels,
                                                             hidden_dtype=hidden_states.dtype)  # [B, D]

        # 2. Blocks, sublayer by sublayer.
        stream = RoutedStream(self.router, hidden_states, conditioning)
        attn_kwargs = attention_kwargs(cross_attention_kwargs)
        for block in model.transformer_blocks:
            ada_norm_zero_block(self, block, stream, timestep, class_labels, attn_kwargs)
        hidden_states = stream.read()  # the dedicated final aggregator

        # 3. Output head.
        shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = model.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = model.proj_out_2(hidden_states)  # [B, T, p * p * C]

        # 4. Unpatchify.
        height = width = int(hidden_states.shape[1] ** 0.5)
        hidden_states = hidden_states.reshape(shape=(-1, height, width, patch, patch, model.out_channels))
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(shape=(-1, model.out_channels, height * patch, width * patch))

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

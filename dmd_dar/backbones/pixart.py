"""DAR adapter for ``PixArtTransformer2DModel`` (diffusers ``models/transformers/pixart_transformer_2d.py``).

Mirrors ``PixArtTransformer2DModel.forward``: mask-to-bias conversion, patch embedding, ``adaln_single``,
caption projection, the block loop (L317 in 0.36-0.42.1; each ``BasicTransformerBlock`` with
``ada_norm_single`` split into self-attention, cross-attention and MLP sublayers by
``basic_block.ada_norm_single_block``), the ``scale_shift_table`` head and the unpatchify. Sublayers: 3 per block
(2 without cross-attention). e(t) for ``static_t`` is ``adaln_single``'s embedded timestep [B, D].

The cross-attention reads the hidden state without normalising it first; the count-scaled routers of
``RoutingConfig.for_retrofit`` make that input exactly the residual stream at step 0 (DESIGN §2(c)).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from dmd_dar.backbones.basic_block import ada_norm_single_block, attention_kwargs
from dmd_dar.backbones.common import RoutedStream
from dmd_dar.backbones.wrapper import DARTransformer


class PixArtDAR(DARTransformer):
    """``PixArtTransformer2DModel`` with DAR routing; ``forward`` has the stock signature and outputs."""

    model_class = "PixArtTransformer2DModel"
    mirrors = (
        "diffusers.models.attention:BasicTransformerBlock.forward",
        "diffusers.models.transformers.pixart_transformer_2d:PixArtTransformer2DModel.forward",
    )

    def image_plan(self) -> tuple[int, tuple[int, ...]]:
        blocks = self.transformer.transformer_blocks
        return sum(3 if block.attn2 is not None else 2 for block in blocks), ()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        model = self.transformer
        patch = model.config.patch_size
        if model.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")

        # Masks [B, key_tokens] (1 = keep) become additive biases [B, 1, key_tokens], as in the stock forward.
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

        # 1. Input.
        batch_size = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        # PatchEmbed returns a transposed view. The stock block's sum attn + x is contiguous (its first operand's
        # layout), the router's x + attn would be strided; the cross-attention reads that sum without a norm, and
        # its matmul rounds a strided operand differently (1 ulp at full width). Contiguous, the twin is bit-exact.
        hidden_states = model.pos_embed(hidden_states).contiguous()  # [B, T, D] = v_0
        timestep, embedded_timestep = model.adaln_single(
            timestep, added_cond_kwargs, batch_size=batch_size, hidden_dtype=hidden_states.dtype
        )  # [B, 6 * D], [B, D]
        if model.caption_projection is not None:
            encoder_hidden_states = model.caption_projection(encoder_hidden_states)
            encoder_hidden_states = encoder_hidden_states.view(batch_size, -1, hidden_states.shape[-1])

        # 2. Blocks, sublayer by sublayer.
        stream = RoutedStream(self.router, hidden_states, embedded_timestep)
        attn_kwargs = attention_kwargs(cross_attention_kwargs)
        for block in model.transformer_blocks:
            ada_norm_single_block(self, block, stream, timestep, encoder_hidden_states, attention_mask,
                                  encoder_attention_mask, attn_kwargs)
        hidden_states = stream.read()  # the dedicated final aggregator

        # 3. Output.
        shift, scale = (
            model.scale_shift_table[None] + embedded_timestep[:, None].to(model.scale_shift_table.device)
        ).chunk(2, dim=1)
        hidden_states = model.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale.to(hidden_states.device)) + shift.to(hidden_states.device)
        hidden_states = model.proj_out(hidden_states)
        hidden_states = hidden_states.squeeze(1)

        # 4. Unpatchify.
        hidden_states = hidden_states.reshape(shape=(-1, height, width, patch, patch, model.out_channels))
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(shape=(-1, model.out_channels, height * patch, width * patch))

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

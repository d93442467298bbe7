"""DAR adapter for ``QwenImageTransformer2DModel`` (diffusers ``models/transformers/transformer_qwenimage.py``).

Mirrors ``QwenImageTransformer2DModel.forward`` (embeddings, ``zero_cond_t`` modulation index, block loop,
ControlNet add, output head) and ``QwenImageTransformerBlock.forward`` (image adds ``hidden_states +
img_gate1 * img_attn_output`` / ``+ img_gate2 * img_mlp_output``, text adds likewise), reusing the block's own
``_modulate``.

Sublayers: image stream 2 per block (joint attention, MLP). Text stream 2 per block, except that the last block's
text MLP output is discarded by diffusers, so here it is not computed and the last block's text attention input is
the text router's output aggregator. ControlNet residuals are folded into the block's image MLP output; the fp16
clips have no counterpart (no running residual). e(t) for ``static_t`` is the model's ``temb`` (its conditional
half when ``zero_cond_t`` doubles the batch of conditioning vectors).
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
from diffusers.utils import apply_lora_scale

from dmd_dar.backbones.common import RoutedStream
from dmd_dar.backbones.wrapper import DARTransformer


class QwenImageDAR(DARTransformer):
    """``QwenImageTransformer2DModel`` with DAR routing; ``forward`` has the stock signature and outputs."""

    model_class = "QwenImageTransformer2DModel"
    mirrors = (
        "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformerBlock.forward",
        "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformer2DModel.forward",
    )
    has_text_stream = True

    def image_plan(self) -> tuple[int, tuple[int, ...]]:
        return 2 * len(self.transformer.transformer_blocks), ()

    def text_plan(self) -> int:
        return 2 * (len(self.transformer.transformer_blocks) - 1)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_shapes: list[tuple[int, int, int]] | None = None,
        guidance: torch.Tensor = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        additional_t_cond=None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        model = self.transformer
        hidden_states = model.img_in(hidden_states)  # [B, T, D]

        timestep = timestep.to(hidden_states.dtype)
        if model.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = torch.tensor(
                [[0] * prod(sample[0]) + [1] * sum([prod(s) for s in sample[1:]]) for sample in img_shapes],
                device=timestep.device,
                dtype=torch.int,
            )
        else:
            modulate_index = None

        encoder_hidden_states = model.txt_in(model.txt_norm(encoder_hidden_states))  # [B, S, D]
        text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(
            encoder_hidden_states, encoder_hidden_states_mask
        )

        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = (
            model.time_text_embed(timestep, hidden_states, additional_t_cond)
            if guidance is None
            else model.time_text_embed(timestep, guidance, hidden_states, additional_t_cond)
        )  # [B, D], or [2B, D] with zero_cond_t
        head_temb = temb.chunk(2, dim=0)[0] if model.zero_cond_t else temb  # [B, D]

        image_rotary_emb = model.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)

        image = RoutedStream(self.router, hidden_states, head_temb)
        text = RoutedStream(self.text_router, encoder_hidden_states, head_temb)
        blocks = model.transformer_blocks
        for index_block, block in enumerate(blocks):
            control = None
            if controlnet_block_samples is not None:
                interval_control = int(np.ceil(len(blocks) / len(controlnet_block_samples)))
                control = controlnet_block_samples[index_block // interval_control]
            qwen_block(self, block, image, text, encoder_hidden_states_mask, temb, image_rotary_emb,
                       attention_kwargs or {}, modulate_index, control)

        hidden_states = model.norm_out(image.read(), head_temb)
        output = model.proj_out(hidden_states)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def qwen_block(wrapper: DARTransformer, block, image: RoutedStream, text: RoutedStream,
               encoder_hidden_states_mask: torch.Tensor | None, temb: torch.Tensor, image_rotary_emb,
               attn_kwargs: dict[str, Any], modulate_index: torch.Tensor | None,
               control: torch.Tensor | None) -> None:
    """One ``QwenImageTransformerBlock``: joint attention (both streams), then each stream's MLP."""

    def modulation(temb):
        img_mod_params = block.img_mod(temb)  # [B, 6D] (or [2B, 6D] with zero_cond_t)
        txt_temb = torch.chunk(temb, 2, dim=0)[0] if block.zero_cond_t else temb
        txt_mod_params = block.txt_mod(txt_temb)  # [B, 6D]
        return (*img_mod_params.chunk(2, dim=-1), *txt_mod_params.chunk(2, dim=-1))

    img_mod1, img_mod2, txt_mod1, txt_mod2 = modulation(temb)

    def attention(h, c, img_mod1, txt_mod1):
        img_modulated, img_gate1 = block._modulate(block.img_norm1(h), img_mod1, modulate_index)
        txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(c), txt_mod1)
        img_attn_output, txt_attn_output = block.attn(
            hidden_states=img_modulated,
            encoder_hidden_states=txt_modulated,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
            **attn_kwargs,
        )
        return img_gate1 * img_attn_output, txt_gate1 * txt_attn_output

    img_attn, txt_attn = wrapper.sublayer(attention, image.read(), text.read(), img_mod1, txt_mod1)
    image.write(img_attn)
    text.write(txt_attn)

    def img_mlp(h, img_mod2):
        img_modulated2, img_gate2 = block._modulate(block.img_norm2(h), img_mod2, modulate_index)
        return img_gate2 * block.img_mlp(img_modulated2)

    img_output = wrapper.sublayer(img_mlp, image.read(), img_mod2)
    image.write(img_output if control is None else img_output + control)

    if text.closed:
        return  # last block: diffusers discards this text MLP output

    def txt_mlp(c, txt_mod2):
        txt_modulated2, txt_gate2 = block._modulate(block.txt_norm2(c), txt_mod2)
        return txt_gate2 * block.txt_mlp(txt_modulated2)

    text.write(wrapper.sublayer(txt_mlp, text.read(), txt_mod2))

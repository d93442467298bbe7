"""DAR adapter for ``FluxTransformer2DModel`` (diffusers ``models/transformers/transformer_flux.py``).

Mirrors ``FluxTransformer2DModel.forward`` (double / single loops L757 / L789 in 0.40-0.42.1, ControlNet adds
L787 / L813), ``FluxTransformerBlock.forward`` (L443-497: image adds L473 attn, L481 FF, L483 IP-adapter; text
adds L487 attn, L493 FF) and ``FluxSingleTransformerBlock.forward`` (L383-412: concat L392, one residual add
L407 for the parallel attention || MLP branch, split L411).

Sublayer index spaces (one per stream, each with its own router):
- image: 2 per double block (attention, FF), then 1 per single block;
- text:  2 per double block, then 1 per single block; the last text read (the last single block's input) is the
  text router's output aggregator, and that block's text output is dropped, as diffusers drops it.

Single-stream blocks run on the concatenated sequence [text; image]: their input is the concatenation of the two
streams' routed inputs and their single (gated) output is split back by token and written to each stream. DAR
weights are per token, so this is the same as routing the concatenated sequence through one index space, except
that text tokens use the text router's parameters (or plain residuals when text is not routed) and image tokens the
image router's.

IP-adapter outputs and ControlNet residuals are folded into the FF output of their block (single blocks: the
block's output), which keeps the residual sum identical. The fp16 clip after the residual adds (L494-495, L409)
has no counterpart: there is no running residual to clip. e(t) for ``static_t`` is the model's ``temb``
(timestep + pooled text [+ guidance]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from dmd_dar.backbones.common import RoutedStream, feed_forward, gated, modulate
from dmd_dar.backbones.wrapper import DARTransformer


class FluxDAR(DARTransformer):
    """``FluxTransformer2DModel`` with DAR routing; ``forward`` has the stock signature and outputs."""

    model_class = "FluxTransformer2DModel"
    mirrors = (
        "diffusers.models.transformers.transformer_flux:FluxTransformerBlock.forward",
        "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock.forward",
        "diffusers.models.transformers.transformer_flux:FluxTransformer2DModel.forward",
    )
    has_text_stream = True

    def image_plan(self) -> tuple[int, tuple[int, ...]]:
        model = self.transformer
        return 2 * len(model.transformer_blocks) + len(model.single_transformer_blocks), ()

    def text_plan(self) -> int:
        model = self.transformer
        num_double, num_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
        if num_single == 0:  # the last double block's text FF output would be discarded: its attention reads last
            return 2 * (num_double - 1)
        return 2 * num_double + num_single - 1

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> torch.Tensor | Transformer2DModelOutput:
        model = self.transformer
        hidden_states = model.x_embedder(hidden_states)  # [B, T, D]

        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = (
            model.time_text_embed(timestep, pooled_projections)
            if guidance is None
            else model.time_text_embed(timestep, guidance, pooled_projections)
        )  # [B, D]
        encoder_hidden_states = model.context_embedder(encoder_hidden_states)  # [B, S, D]

        if txt_ids.ndim == 3:  # deprecated batched ids (the stock forward warns)
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        image_rotary_emb = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
            ip_hidden_states = model.encoder_hid_proj(ip_adapter_image_embeds)
            joint_attention_kwargs.update({"ip_hidden_states": ip_hidden_states})
        attn_kwargs = joint_attention_kwargs or {}

        image = RoutedStream(self.router, hidden_states, temb)
        text = RoutedStream(self.text_router, encoder_hidden_states, temb)

        for index_block, block in enumerate(model.transformer_blocks):
            control = None
            if controlnet_block_samples is not None:
                interval_control = int(np.ceil(len(model.transformer_blocks) / len(controlnet_block_samples)))
                if controlnet_blocks_repeat:  # XLabs ControlNet
                    control = controlnet_block_samples[index_block % len(controlnet_block_samples)]
                else:
                    control = controlnet_block_samples[index_block // interval_control]
            double_block(self, block, image, text, temb, image_rotary_emb, attn_kwargs, control)

        for index_block, block in enumerate(model.single_transformer_blocks):
            control = None
            if controlnet_single_block_samples is not None:
                interval_control = int(np.ceil(len(model.single_transformer_blocks)
                                               / len(controlnet_single_block_samples)))
                control = controlnet_single_block_samples[index_block // interval_control]
            single_block(self, block, image, text, temb, image_rotary_emb, attn_kwargs, control)

        hidden_states = model.norm_out(image.read(), temb)
        output = model.proj_out(hidden_states)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def double_block(wrapper: DARTransformer, block, image: RoutedStream, text: RoutedStream, temb: torch.Tensor,
                 image_rotary_emb, attn_kwargs: dict[str, Any], control: torch.Tensor | None) -> None:
    """One ``FluxTransformerBlock``: joint attention (both streams), then each stream's FF."""

    def attention(h, c, temb):
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, emb=temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
        outputs = block.attn(hidden_states=norm_h, encoder_hidden_states=norm_c, image_rotary_emb=image_rotary_emb,
                             **attn_kwargs)
        out = (gated(gate_msa, outputs[0]), shift_mlp, scale_mlp, gate_mlp,
               gated(c_gate_msa, outputs[1]), c_shift_mlp, c_scale_mlp, c_gate_mlp)
        return out + tuple(outputs[2:])  # IP-adapter processors return a third, already weighted, output

    out = wrapper.sublayer(attention, image.read(), text.read(), temb)
    attn_output, shift_mlp, scale_mlp, gate_mlp, context_attn, c_shift_mlp, c_scale_mlp, c_gate_mlp = out[:8]
    image.write(attn_output)

    def mlp(h, shift, scale, gate):
        return gated(gate, feed_forward(block, block.ff, modulate(block.norm2(h), shift, scale)))

    ff_output = wrapper.sublayer(mlp, image.read(), shift_mlp, scale_mlp, gate_mlp)
    for extra in (*out[8:], control):  # additive contributions diffusers adds after the FF
        if extra is not None:
            ff_output = ff_output + extra
    image.write(ff_output)

    text.write(context_attn)
    if text.closed:
        return  # no single blocks: this text FF output would be discarded

    def context_mlp(c, shift, scale, gate):
        return gated(gate, feed_forward(block, block.ff_context, modulate(block.norm2_context(c), shift, scale)))

    text.write(wrapper.sublayer(context_mlp, text.read(), c_shift_mlp, c_scale_mlp, c_gate_mlp))


def single_block(wrapper: DARTransformer, block, image: RoutedStream, text: RoutedStream, temb: torch.Tensor,
                 image_rotary_emb, attn_kwargs: dict[str, Any], control: torch.Tensor | None) -> None:
    """One ``FluxSingleTransformerBlock`` on [text; image]: one sublayer, written back to both streams."""
    context = text.read()  # [B, S, D]
    text_seq_len = context.shape[1]

    def parallel_branch(c, h, temb):
        x = torch.cat([c, h], dim=1)  # [B, S + T, D]
        norm_x, gate = block.norm(x, emb=temb)
        mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_x))
        attn_output = block.attn(hidden_states=norm_x, image_rotary_emb=image_rotary_emb, **attn_kwargs)
        v = gated(gate, block.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2)))  # [B, S + T, D]
        return v[:, :text_seq_len], v[:, text_seq_len:]

    context_output, image_output = wrapper.sublayer(parallel_branch, context, image.read(), temb)
    text.write(context_output)
    image.write(image_output if control is None else image_output + control)

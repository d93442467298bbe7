"""DAR adapter for ``SD3Transformer2DModel`` (SD3 / SD3.5; diffusers ``models/transformers/transformer_sd3.py``).

Mirrors ``SD3Transformer2DModel.forward`` (block loop L303 in 0.40-0.42.1, ``skip_layers`` L305, ControlNet add
L326) and ``JointTransformerBlock.forward`` (``models/attention.py`` L681-748 in 0.36-0.42.1: image adds L712
attn, L717 dual attn2, L728 FF; context adds L735 attn, L746 FF).

Sublayers of the image stream, per block: joint attention, then SD3.5's dual attention ``attn2`` when the block
has it, then the FF. ``attn2`` is its own sublayer (its own source for later sublayers), but in diffusers it reads
the same normalised input as the joint attention (``norm1`` returns both), not the stream after the attention add;
so it shares the joint attention's routed input and has no aggregator of its own (``image_plan``'s parallel list).

The text (context) stream is routed by ``text_router``: a DAR router with ``route_text=True``, else the plain
residual twin. Its last consumer is the final block's ``context_pre_only`` attention, which reads the text router's
dedicated output aggregator; text sublayers: 2 per block except that last one.

Cross-block details reproduced: ``skip_layers`` blocks contribute zero outputs to every stream (identical to not
running them for the residual sum); a ControlNet residual is folded into its block's last image output, which
leaves the residual sum unchanged. e(t) for ``static_t`` is the model's ``temb`` (timestep + pooled text).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from dmd_dar.backbones.common import RoutedStream, feed_forward, gated, modulate
from dmd_dar.backbones.wrapper import DARTransformer
from dmd_dar.errors import UserError


class SD3DAR(DARTransformer):
    """``SD3Transformer2DModel`` with DAR routing; ``forward`` has the stock signature and outputs."""

    model_class = "SD3Transformer2DModel"
    mirrors = (
        "diffusers.models.attention:JointTransformerBlock.forward",
        "diffusers.models.transformers.transformer_sd3:SD3Transformer2DModel.forward",
    )
    has_text_stream = True

    def image_plan(self) -> tuple[int, tuple[int, ...]]:
        count, parallel = 0, []
        for block in self.transformer.transformer_blocks:
            count += 1  # joint attention
            if block.use_dual_attention:
                count += 1
                parallel.append(count)  # attn2 shares the joint attention's input
            count += 1  # FF
        return count, tuple(parallel)

    def text_plan(self) -> int:
        blocks = self.transformer.transformer_blocks
        if not blocks[-1].context_pre_only or any(block.context_pre_only for block in blocks[:-1]):
            raise UserError("SD3 adapter expects exactly the last JointTransformerBlock to be context_pre_only")
        return 2 * (len(blocks) - 1)

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        block_controlnet_hidden_states: list = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        model = self.transformer
        height, width = hidden_states.shape[-2:]

        hidden_states = model.pos_embed(hidden_states).contiguous()  # [B, T, D], positions included
        temb = model.time_text_embed(timestep, pooled_projections)  # [B, D]
        encoder_hidden_states = model.context_embedder(encoder_hidden_states)  # [B, S, D]

        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
            ip_hidden_states, ip_temb = model.image_proj(ip_adapter_image_embeds, timestep)
            joint_attention_kwargs.update(ip_hidden_states=ip_hidden_states, temb=ip_temb)
        attn_kwargs = joint_attention_kwargs or {}

        image = RoutedStream(self.router, hidden_states, temb)
        text = RoutedStream(self.text_router, encoder_hidden_states, temb)
        blocks = model.transformer_blocks
        for index_block, block in enumerate(blocks):
            control = None
            if block_controlnet_hidden_states is not None and block.context_pre_only is False:
                interval_control = len(blocks) / len(block_controlnet_hidden_states)
                control = block_controlnet_hidden_states[int(index_block / interval_control)]

            if skip_layers is not None and index_block in skip_layers:
                image.skip(2 if block.use_dual_attention else 1)
                image.write(control if control is not None else torch.zeros_like(hidden_states))
                if not block.context_pre_only:
                    text.skip(2)
            else:
                joint_block(self, block, image, text, temb, attn_kwargs, control)

        hidden_states = model.norm_out(image.read(), temb)
        hidden_states = model.proj_out(hidden_states)

        # unpatchify
        patch_size = model.config.patch_size
        height, width = height // patch_size, width // patch_size
        hidden_states = hidden_states.reshape(
            shape=(hidden_states.shape[0], height, width, patch_size, patch_size, model.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(hidden_states.shape[0], model.out_channels, height * patch_size, width * patch_size)
        )

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def joint_block(wrapper: DARTransformer, block, image: RoutedStream, text: RoutedStream, temb: torch.Tensor,
                attn_kwargs: dict[str, Any], control: torch.Tensor | None) -> None:
    """One ``JointTransformerBlock`` at sublayer granularity (image: attn [, attn2], FF; text: attn, FF)."""
    dual, pre_only = block.use_dual_attention, block.context_pre_only

    def attention(h, c, temb):
        # norm1 / norm1_context: LN + modulate, plus the FF modulation (and SD3.5's second modulation of the
        # same normalised input for attn2).
        if dual:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = block.norm1(h, emb=temb)
        else:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, emb=temb)
        if pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)

        attn_output, context_attn_output = block.attn(hidden_states=norm_h, encoder_hidden_states=norm_c,
                                                      **attn_kwargs)
        out = (gated(gate_msa, attn_output), shift_mlp, scale_mlp, gate_mlp)
        if dual:
            out += (gated(gate_msa2, block.attn2(hidden_states=norm_h2, **attn_kwargs)),)
        if not pre_only:
            out += (gated(c_gate_msa, context_attn_output), c_shift_mlp, c_scale_mlp, c_gate_mlp)
        return out

    out = wrapper.sublayer(attention, image.read(), text.read(), temb)
    image.write(out[0])
    shift_mlp, scale_mlp, gate_mlp = out[1:4]
    rest = out[4:]
    if dual:
        image.write(rest[0])
        rest = rest[1:]

    def mlp(h, shift, scale, gate):
        return gated(gate, feed_forward(block, block.ff, modulate(block.norm2(h), shift, scale)))

    ff_output = wrapper.sublayer(mlp, image.read(), shift_mlp, scale_mlp, gate_mlp)
    image.write(ff_output if control is None else ff_output + control)

    if pre_only:
        return  # the text stream ended with this block's attention input
    context_attn, c_shift_mlp, c_scale_mlp, c_gate_mlp = rest
    text.write(context_attn)

    def context_mlp(c, shift, scale, gate):
        return gated(gate, feed_forward(block, block.ff_context, modulate(block.norm2_context(c), shift, scale)))

    text.write(wrapper.sublayer(context_mlp, text.read(), c_shift_mlp, c_scale_mlp, c_gate_mlp))

"""``BasicTransformerBlock`` (diffusers ``models/attention.py``) at sublayer granularity, for DiT and PixArt.

Mirrors ``BasicTransformerBlock.forward`` (L960-1080 in diffusers 0.36-0.42.1) for the two norm types the
DiT and PixArt models build:

- ``ada_norm_zero`` (DiT): self-attention (gate L1013, residual add L1017) and feed-forward (gate L1072, add
  L1076). No cross-attention.
- ``ada_norm_single`` (PixArt): self-attention (gate L1015, add L1017), cross-attention (ungated, add L1049, reads
  the hidden state WITHOUT normalising it first), feed-forward through ``norm2`` (L1062, gate L1074, add L1076).

Each sublayer reads its input from the routed stream and writes its raw (gated) output back; the residual adds
are the router's job. Branches the two models never build (GLIGEN fuser, ``ada_norm``, sinusoidal positional
embeddings inside the block) are rejected.
"""

from __future__ import annotations

from typing import Any

import torch

from dmd_dar.backbones.common import RoutedStream, feed_forward, gated, modulate
from dmd_dar.errors import UserError


def attention_kwargs(cross_attention_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The kwargs forwarded to the attention processors (a copy; GLIGEN's entry is not supported)."""
    kwargs = dict(cross_attention_kwargs or {})
    if kwargs.pop("gligen", None) is not None:
        raise UserError("cross_attention_kwargs['gligen'] is not supported by the DAR adapters; drop it")
    kwargs.pop("scale", None)  # deprecated in diffusers and ignored by the stock block too
    return kwargs


def _check_block(block: torch.nn.Module, norm_type: str) -> None:
    if block.norm_type != norm_type or block.pos_embed is not None or block.only_cross_attention:
        raise UserError(f"BasicTransformerBlock with norm_type={block.norm_type!r}, positional embeddings or "
                        f"only_cross_attention is not what the DAR adapter mirrors (expects {norm_type!r})")


def ada_norm_zero_block(wrapper, block, stream: RoutedStream, timestep: torch.Tensor | None,
                        class_labels: torch.Tensor | None, attn_kwargs: dict[str, Any]) -> None:
    """One DiT block: two sublayers (self-attention, feed-forward) on ``stream``."""
    _check_block(block, "ada_norm_zero")

    def self_attention(h):
        # norm1 = AdaLayerNormZero with its own timestep/label embedder: LN + modulate, and the FF modulation.
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, timestep, class_labels,
                                                                       hidden_dtype=h.dtype)
        out = block.attn1(norm_h, encoder_hidden_states=None, attention_mask=None, **attn_kwargs)
        return gated(gate_msa, out), shift_mlp, scale_mlp, gate_mlp

    v, shift_mlp, scale_mlp, gate_mlp = wrapper.sublayer(self_attention, stream.read())
    stream.write(v)

    def mlp(h, shift, scale, gate):
        norm_h = modulate(block.norm3(h), shift, scale)  # [B, T, D]
        return gated(gate, feed_forward(block, block.ff, norm_h))

    stream.write(wrapper.sublayer(mlp, stream.read(), shift_mlp, scale_mlp, gate_mlp))


def ada_norm_single_block(wrapper, block, stream: RoutedStream, timestep: torch.Tensor,
                          encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                          encoder_attention_mask: torch.Tensor | None, attn_kwargs: dict[str, Any]) -> None:
    """One PixArt block: three sublayers (self-attention, cross-attention, feed-forward) on ``stream``.

    ``timestep`` is the model's ``adaln_single`` output [B, 6 * D]. The cross-attention consumes the routed input
    as is (no norm): the routers are count-scaled (``RoutingConfig.for_retrofit``), so at step 0 it sees exactly
    the residual stream, as DESIGN §2(c) requires.
    """
    _check_block(block, "ada_norm_single")
    batch = stream.v0.shape[0]
    modulation = block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)  # [B, 6, D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # [B, 1, D]

    def self_attention(h, shift, scale, gate):
        norm_h = block.norm1(h) * (1 + scale) + shift  # [B, T, D]
        return gate * block.attn1(norm_h, encoder_hidden_states=None, attention_mask=attention_mask, **attn_kwargs)

    stream.write(wrapper.sublayer(self_attention, stream.read(), shift_msa, scale_msa, gate_msa))

    if block.attn2 is not None:
        def cross_attention(h, context):
            return block.attn2(h, encoder_hidden_states=context, attention_mask=encoder_attention_mask,
                               **attn_kwargs)

        stream.write(wrapper.sublayer(cross_attention, stream.read(), encoder_hidden_states))

    def mlp(h, shift, scale, gate):
        norm_h = block.norm2(h) * (1 + scale) + shift  # PixArt reuses norm2 as the FF pre-norm
        return gate * feed_forward(block, block.ff, norm_h)

    stream.write(wrapper.sublayer(mlp, stream.read(), shift_mlp, scale_mlp, gate_mlp))

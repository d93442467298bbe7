"""Pieces shared by the diffusers adapters: one token stream seen through its router, and the adaLN patterns.

The adapters re-implement diffusers block bodies at sublayer granularity. Everything they have in common lives
here so that each adapter file reads like the diffusers ``forward`` it mirrors, with every ``x = x + branch``
replaced by ``stream.write(branch)`` and every read of ``x`` by ``stream.read()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RoutedStream:
    """One token stream (image or text) of one forward pass, seen through its router.

    The stream is read before each sublayer that consumes it and written with that sublayer's raw output (gate
    included, residual not added). Its router was built with ``num_sublayers`` = the number of writes that precede
    the stream's last read, so that last read is the router's dedicated output aggregator. For the image stream the
    last read feeds the output head; for a text stream it feeds the last sublayer that consumes text tokens
    (SD3's ``context_pre_only`` block, Flux's last single block, Qwen-Image's last text MLP). Writes after the last
    read are dropped: diffusers computes those outputs and then discards them too.

    The per-forward history lives in ``state`` (held here, passed explicitly), never on a module.
    """

    def __init__(self, router: nn.Module, v0: torch.Tensor, t_emb: torch.Tensor | None) -> None:
        self.router = router
        self.state = router.begin(v0)
        self.t_emb = t_emb  # [B, D], the static_t query's e(t)
        self.v0 = v0  # [B, T, D]
        self.count = 0  # writes so far
        self.closed = False  # the last read has happened

    def read(self) -> torch.Tensor:
        """The input of the next sublayer that consumes this stream, [B, T, D]."""
        if self.closed:
            raise RuntimeError("read past the last consumer of a routed stream (adapter bug)")
        if self.count == self.router.num_sublayers:
            self.closed = True
            return self.router.output(self.state, self.t_emb)
        return self.router.input_for(self.count + 1, self.state, self.t_emb)

    def write(self, v: torch.Tensor) -> None:
        """Record the raw output v [B, T, D] of the sublayer that last read this stream."""
        if self.closed:
            return  # an output nothing downstream reads (diffusers discards it as well)
        self.router.push(self.state, v)
        self.count += 1

    def skip(self, sublayers: int = 1) -> None:
        """Sublayers that did not run (SD3 ``skip_layers``) contribute zero outputs, i.e. leave the sum unchanged."""
        for _ in range(sublayers):
            self.write(torch.zeros_like(self.v0))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x [B, T, D] by per-sample shift and scale [B, D] (the ``* (1 + scale[:, None])
    + shift[:, None]`` line that recurs in every diffusers adaLN block)."""
    return x * (1 + scale[:, None]) + shift[:, None]  # [B, T, D]


def gated(gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero gate [B, D] applied to a branch output [B, T, D] (``gate.unsqueeze(1) * output``)."""
    return gate.unsqueeze(1) * branch  # [B, T, D]


def feed_forward(block: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)``, chunked along ``block._chunk_size`` when diffusers' forward chunking is enabled on the block."""
    chunk_size = getattr(block, "_chunk_size", None)
    if chunk_size is None:
        return ff(x)
    # lazy: a private diffusers helper: a diffusers without it breaks only the chunked path
    from diffusers.models.attention import _chunked_feed_forward  # the helper the blocks use themselves

    return _chunked_feed_forward(ff, x, block._chunk_dim, chunk_size)


def run_sublayer(model: nn.Module, fn: Callable[..., object], *args: object) -> object:
    """Run one sublayer's computation, under activation checkpointing when the diffusers model has it enabled.

    Honours ``model.gradient_checkpointing`` and the checkpoint function diffusers installed with
    ``enable_gradient_checkpointing()`` (``model._gradient_checkpointing_func``), exactly as the stock block loops
    do, but one sublayer at a time: the router's aggregation stays outside the checkpointed region.

    A model shared by several networks through adapter slots (``dmd_dar.t2i.lora.SharedBase``) carries
    ``dmd_dar_checkpointable``: the recomputation in the backward runs after other networks' forwards, so it must
    first re-bind the adapter this forward ran with.
    """
    if torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
        rebinding = getattr(model, "dmd_dar_checkpointable", None)
        return model._gradient_checkpointing_func(rebinding(fn) if rebinding else fn, *args)
    return fn(*args)

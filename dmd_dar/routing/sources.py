"""Source sets of (chunked) DAR: which earlier sublayer outputs each aggregator may attend to.

Sublayers are 1-indexed, l = 1..L; v_0 is the patch embedding. With chunk size S, sublayer l lies in chunk
n = ceil(l / S); its sources are the summaries c_0 .. c_{n-1} of the finished chunks (c_0 = v_0) plus the raw
outputs of the current chunk so far. The final aggregator sees c_0 .. c_{N-1} plus every raw output of the last
chunk (the paper's dedicated final aggregator). S = 1 is dense DAR.
"""

from __future__ import annotations

import math

import torch


def chunk_of(sublayer: int, chunk_size: int) -> int:
    """The 1-indexed chunk that sublayer ``sublayer`` (1-indexed) belongs to."""
    return math.ceil(sublayer / chunk_size)


def source_indices(sublayer: int, num_sublayers: int, chunk_size: int) -> list[int]:
    """Indices i of the outputs v_i routable into ``sublayer``; ``sublayer = L + 1`` names the final aggregator.

    Summaries are named by the index of the chunk's last output (c_n = v_{nS}); with "sum" summaries the same
    slot holds the sum of chunk n's outputs instead.
    """
    if not 1 <= sublayer <= num_sublayers + 1:
        raise ValueError(f"sublayer {sublayer} outside 1..{num_sublayers + 1}")
    if sublayer == num_sublayers + 1:  # final aggregator
        last_chunk = chunk_of(num_sublayers, chunk_size)
        summaries = [n * chunk_size for n in range(last_chunk)]
        return summaries + list(range((last_chunk - 1) * chunk_size + 1, num_sublayers + 1))
    n = chunk_of(sublayer, chunk_size)
    return [k * chunk_size for k in range(n)] + list(range((n - 1) * chunk_size + 1, sublayer))


class SourceHistory:
    """The routable sources of one forward pass, updated as sublayers run.

    Held by the caller and passed explicitly (never stored on a module), so forwards are re-entrant and
    activation checkpointing sees every tensor it needs as an argument.
    """

    def __init__(self, v0: torch.Tensor, chunk_size: int, summary: str) -> None:
        self.chunk_size = chunk_size
        self.summary = summary
        self.summaries: list[torch.Tensor] = [v0]  # c_0 .. c_{n-1}
        self.current: list[torch.Tensor] = []  # raw outputs of the open chunk
        self.closed_raw: list[torch.Tensor] = []  # raw outputs of the chunk that closed last
        self.count = 0  # sublayers pushed so far
        self.last = v0  # v_{l-1}, the dynamic query's input
        self.weights: list[torch.Tensor] | None = None  # filled with alpha [N, B, T] when recording

    def push(self, v: torch.Tensor) -> None:
        self.count += 1
        self.current.append(v)
        self.last = v
        if self.count % self.chunk_size == 0:
            closing = self.current
            self.summaries.append(closing[-1] if self.summary == "last" else _sum(closing))
            self.closed_raw = closing
            self.current = []

    def sources(self) -> list[torch.Tensor]:
        """Sources of the next sublayer (l = count + 1)."""
        return self.summaries + self.current

    def final_sources(self) -> list[torch.Tensor]:
        """Sources of the final aggregator: earlier summaries plus all raw outputs of the last chunk."""
        if self.current:  # the last chunk is partial (L not a multiple of S)
            return self.summaries + self.current
        return self.summaries[:-1] + self.closed_raw


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out

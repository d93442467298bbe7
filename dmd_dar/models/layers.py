"""Building blocks of the native SiT/DiT: embeddings, attention, MLP, adaLN-Zero blocks, the output head.

Written after the structure of facebookresearch/DiT and willisma/SiT (same parameter names, so state dicts line up
with theirs where the modules coincide), with one change: a block exposes its attention and MLP sublayers as two
separate calls that return the *raw* sublayer output (adaLN gate included, residual not added). Who adds what to
what is the router's business (``dmd_dar.routing``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# LayerNorm settings of DiT/SiT: no affine (adaLN supplies shift/scale), eps 1e-6.
LN_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, with per-sample shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # [B, T, D]


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Fixed 1-D sin-cos embedding: [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2)). pos: [M]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    out = pos.to(torch.float64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)  # [M, dim]


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions for a grid_size x grid_size patch grid, row-major tokens: [grid^2, dim].

    Half the channels encode the column, half the row (the DiT/MAE layout: the first half follows the
    horizontal coordinate).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    emb_col = sincos_1d(dim // 2, col.reshape(-1))  # [G*G, dim/2]
    emb_row = sincos_1d(dim // 2, row.reshape(-1))  # [G*G, dim/2]
    return torch.cat([emb_col, emb_row], dim=1).float()  # [G*G, dim]


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens via a strided Conv2d: [B, C, H, W] -> [B, (H/p)(W/p), D]."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T, D]


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``t`` (already scaled to [0, 1000]): [cos(t w_k), sin(t w_k)], [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """e(t): sinusoidal features of t * 1000 -> Linear -> SiLU -> Linear. ``t`` is [B] in [0, 1]."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t * 1000, self.frequency_dim)  # [B, F]
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # [B, D]


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, index ``num_classes``, for the null (unconditional) label.

    During training a label is replaced by the null label with probability ``dropout_prob`` (classifier-free
    guidance training). The null row always exists, so any class-conditional model can be sampled with CFG.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop_labels(self, y: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Labels with a random subset (or the ``force_drop`` mask) replaced by the null label."""
        if force_drop is None:
            force_drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        return torch.where(force_drop.bool(), torch.full_like(y, self.num_classes), y)

    def forward(self, y: torch.Tensor, train: bool, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop is not None:
            y = self.drop_labels(y, force_drop)
        return self.embedding_table(y)  # [B, D]


class RelativePositionBias(nn.Module):
    """A learned additive attention bias per head and 2-D patch offset (Swin Transformer's relative position bias).

    ``table[h, (dr + G - 1) * (2G - 1) + (dc + G - 1)]`` is added to the attention logit of every query/key pair
    whose patches are ``(dr, dc)`` rows/columns apart on the G x G grid. Zero-initialised, so a fresh model computes
    exactly what it would without it. Why it exists: the additive sin-cos positions let attention become local only
    through learned query-key products, which a small pixel-space SiT does not learn at a CPU budget (its attention
    stays near uniform and its samples come out as a mosaic of patches); one scalar per offset gives attention a
    direct, content-independent dependence on where the other patch is (``eval/probe_teacher_compute.py``).
    """

    def __init__(self, num_heads: int, grid_size: int) -> None:
        super().__init__()
        span = 2 * grid_size - 1
        self.table = nn.Parameter(torch.zeros(num_heads, span * span))
        coords = torch.arange(grid_size)
        row, col = (c.reshape(-1) for c in torch.meshgrid(coords, coords, indexing="ij"))  # row-major tokens
        index = (row[:, None] - row[None] + grid_size - 1) * span + (col[:, None] - col[None] + grid_size - 1)
        self.register_buffer("index", index, persistent=False)  # [T, T]

    def forward(self) -> torch.Tensor:
        """The bias [1, H, T, T] (broadcast over the batch)."""
        return self.table[:, self.index].unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv, ``F.scaled_dot_product_attention``), optionally with a learned
    relative position bias on the logits."""

    def __init__(self, hidden_size: int, num_heads: int, position_bias: RelativePositionBias | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.position_bias = position_bias

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._heads(x)
        bias = None if self.position_bias is None else self.position_bias().to(q.dtype)  # [1, H, T, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, T, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, T, D]

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention maps [B, H, T(query), T(key)] that ``forward`` applies to input ``x`` (for
        diagnostics; ``forward`` itself never materialises them)."""
        q, k, _ = self._heads(x)
        logits = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
        if self.position_bias is not None:
            logits = logits + self.position_bias().float()
        return torch.softmax(logits, dim=-1)


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as in DiT) -> Linear; optionally with a depthwise convolution over the
    patch grid added to the hidden activations before the GELU.

    The convolution (``conv_kernel`` x ``conv_kernel``, one filter per hidden channel, zero-initialised, so a fresh
    model computes exactly the plain MLP) gives each token its neighbours' features through weights specific to
    each offset, which attention, a weighted average through one value projection, cannot. Why it exists: without
    it the embedded teacher drew checkers, rings and dots as mazes (the right local period, phase and orientation
    defects between neighbouring patches); continuing a lattice's phase from patch to patch is an offset-specific
    linear map (the same idea as SegFormer's Mix-FFN). The teacher's README has the measurements.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int, conv_kernel: int = 0, grid_size: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.grid_size = grid_size
        self.dwconv = None
        if conv_kernel:
            if grid_size is None:
                raise ValueError("a convolutional MLP needs the patch grid size")
            self.dwconv = nn.Conv2d(mlp_hidden, mlp_hidden, conv_kernel, padding=conv_kernel // 2, groups=mlp_hidden)
            nn.init.zeros_(self.dwconv.weight)
            nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # [B, T, M]
        if self.dwconv is not None:
            b, n, m = h.shape
            grid = h.transpose(1, 2).reshape(b, m, self.grid_size, self.grid_size)  # tokens are row-major
            h = h + self.dwconv(grid).flatten(2).transpose(1, 2)
        return self.fc2(self.act(h))


class SiTBlock(nn.Module):
    """An adaLN-Zero transformer block, seen as two sublayers.

    ``adaLN_modulation`` maps c to (shift1, scale1, gate1, shift2, scale2, gate2) as in DiT. Each sublayer computes
    only its own half of that projection (a row slice of the same Linear), so calling the two sublayers costs the
    same as DiT's single modulation call, and each sublayer is a self-contained function of (h, c), which is what
    activation checkpointing needs.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 position_bias_grid: int | None = None, mlp_conv: int = 0, grid_size: int | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        bias = RelativePositionBias(num_heads, position_bias_grid) if position_bias_grid else None
        self.attn = Attention(hidden_size, num_heads, bias)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), mlp_conv, grid_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def _modulation(self, c: torch.Tensor, part: int) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate) of sublayer ``part`` (0 = attention, 1 = MLP), each [B, D]."""
        lin, d = self.adaLN_modulation[1], self.hidden_size
        rows = slice(3 * d * part, 3 * d * (part + 1))
        mod = F.linear(self.adaLN_modulation[0](c), lin.weight[rows], lin.bias[rows])  # [B, 3D]
        return mod.chunk(3, dim=1)

    def attn_sublayer(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """v = gate1 * Attn(modulate(LN(h), shift1, scale1)); residual not added. h: [B, T, D], c: [B, D]."""
        shift, scale, gate = self._modulation(c, 0)
        return gate.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift, scale))  # [B, T, D]

    def mlp_sublayer(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """v = gate2 * MLP(modulate(LN(h), shift2, scale2)); residual not added."""
        shift, scale, gate = self._modulation(c, 1)
        return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift, scale))  # [B, T, D]

    def sublayer(self, part: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.attn_sublayer(h, c) if part == 0 else self.mlp_sublayer(h, c)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The plain residual block (x + attn, then + mlp), for reference and for use outside a router."""
        x = x + self.attn_sublayer(x, c)
        return x + self.mlp_sublayer(x, c)


class FinalLayer(nn.Module):
    """Output head: LN -> modulate(shift, scale from c) -> Linear to p*p*C_out per token (zero-initialised)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, D] each
        return self.linear(modulate(self.norm_final(h), shift, scale))  # [B, T, p*p*C]

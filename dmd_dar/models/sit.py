"""Native SiT/DiT whose residual connections are delegated to a router (plain residual or DAR).

Sublayers are 1-indexed as in the DAR paper: block k (1-indexed) holds sublayer 2k-1 (attention) and 2k (MLP);
v_0 is the patch embedding plus fixed positions. The forward pass is

    c = e(t) + y_emb(y);  state = router.begin(v_0)
    for l in 1..2*depth:  h_l = router.input_for(l, state, e(t));  v_l = sublayer_l(h_l, c);  router.push(state, v_l)
    out = unpatchify(FinalLayer(router.output(state, e(t)), c))

With ``routing.kind="residual"`` this is exactly DiT/SiT. The router receives e(t) (the t-embedder output, not
the class embedding) as the timestep signal of ``static_t`` queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmd_dar.models.config import ModelConfig
from dmd_dar.models.layers import FinalLayer, LabelEmbedder, PatchEmbed, SiTBlock, TimestepEmbedder, sincos_2d
from dmd_dar.routing import build_router


@dataclass
class ModelInternals:
    """What a forward pass routed, for diagnostics and feature heads (all tensors keep their autograd graph).

    inputs[l-1]  = h_l, the input of sublayer l (l = 1..L), [B, T, D]
    outputs[l-1] = v_l, its raw output (gate included, residual not added), [B, T, D]
    v0           = the patch embedding plus positions, [B, T, D]
    final_input  = the input of the output head, [B, T, D]
    weights      = DAR routing weights, one [N_l, B, T] tensor per aggregator (sublayers 1..L, then the final
                   one), detached; None for residual routing
    t_emb, c     = e(t) and the adaLN conditioning e(t) + y_emb, [B, D]
    """

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    v0: torch.Tensor
    final_input: torch.Tensor
    weights: list[torch.Tensor] | None
    t_emb: torch.Tensor
    c: torch.Tensor

    def block_outputs(self) -> list[torch.Tensor]:
        """z_k, the hidden state handed from block k to block k+1 (k = 1..depth), per the DAR paper §3.

        That is the input of sublayer 2k+1, and the final input for the last block.
        """
        return self.inputs[2::2] + [self.final_input]


class SiT(nn.Module):
    """Scalable interpolant / diffusion transformer with adaLN-Zero blocks and pluggable routing.

    ``forward(x, t, y)``: x [B, C, H, W], t [B] in [0, 1] (1 = noise), y LongTensor [B] or None -> [B, C_out, H, W].
    The network predicts whatever the training objective asks for (velocity, eps, ...); it knows no noise path.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob) if cfg.num_classes > 0 else None
        # Fixed positions are recomputed at construction, so they are not part of the state dict.
        grid = cfg.image_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_2d(d, grid).unsqueeze(0), persistent=False)  # [1, T, D]
        bias_grid = grid if cfg.relative_position_bias else None  # each block learns its own bias table
        self.blocks = nn.ModuleList(SiTBlock(d, cfg.num_heads, cfg.mlp_ratio, bias_grid, cfg.mlp_conv, grid)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        self.router = build_router(cfg.routing, cfg.num_sublayers, d)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (adaLN-Zero: every block starts as the identity, the head outputs zeros).

        DAR from scratch with ``query="static_t"`` and ``time_gain="fixed"`` also zero-initialises the t-embedder's
        last Linear (the DAR paper's choice), so e(t) = 0 and the routing starts as pure static DAR. Side effect:
        the t part of the adaLN conditioning c = e(t) + y_emb is zero at step 0 as well (vanilla DiT draws that
        layer from N(0, 0.02)); the model is then t-blind until the layer moves, which it does from the first
        updates on, through the adaLN projections and the routing queries. Router parameters keep the router's
        own initialisation (zero queries, unit RMSNorm gains).
        """
        router_params = {id(p) for p in self.router.parameters()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in router_params:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        rc = self.cfg.routing
        if rc.is_dar and rc.query == "static_t" and rc.time_gain == "fixed":
            nn.init.zeros_(self.t_embedder.mlp[2].weight)
            nn.init.zeros_(self.t_embedder.mlp[2].bias)

    # ----------------------------------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W] (tokens row-major, each token's channels ordered (p_row, p_col, C))."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        g = self.cfg.image_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)  # [B, gh, gw, p, p, C]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, g * p, g * p)  # [B, C, H, W]

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(e(t), c = e(t) + y_emb), each [B, D]. y = None on a class-conditional model means the null label."""
        t_emb = self.t_embedder(t)  # [B, D]
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=0) but labels y were given")
            return t_emb, t_emb
        if y is None:
            y = torch.full((t.shape[0],), self.cfg.num_classes, dtype=torch.long, device=t.device)
        return t_emb, t_emb + self.y_embedder(y, self.training)

    def _run_sublayer(self, block: SiTBlock, part: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block.sublayer, part, h, c, use_reentrant=False)
        return block.sublayer(part, h, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                return_internals: bool = False):
        """Predict from x_t [B, C, H, W] at t [B] (or a scalar) with labels y [B] (or None = null label).

        Returns the prediction [B, C_out, H, W], or ``(prediction, ModelInternals)`` with ``return_internals``.
        """
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        v0 = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # [B, T, D]
        t_emb, c = self.embed_condition(t, y)  # [B, D] each
        state = self.router.begin(v0, record_weights=return_internals)
        inputs, outputs = [], []
        for l in range(1, self.cfg.num_sublayers + 1):
            h = self.router.input_for(l, state, t_emb)  # [B, T, D]
            v = self._run_sublayer(self.blocks[(l - 1) // 2], (l - 1) % 2, h, c)  # [B, T, D]
            self.router.push(state, v)
            if return_internals:
                inputs.append(h)
                outputs.append(v)
        h_final = self.router.output(state, t_emb)  # [B, T, D]
        out = self.unpatchify(self.final_layer(h_final, c))  # [B, C_out, H, W]
        if not return_internals:
            return out
        return out, ModelInternals(inputs, outputs, v0, h_final, state.weights, t_emb, c)


def build_model(cfg: ModelConfig) -> SiT:
    """A freshly initialised ``SiT`` for ``cfg``."""
    return SiT(cfg)

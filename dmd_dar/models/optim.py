"""Optimizer parameter groups: routing parameters apart, no weight decay on gains, biases and embeddings."""

from __future__ import annotations

from torch import nn

from dmd_dar.models.layers import RelativePositionBias
from dmd_dar.routing import routing_parameters


def param_groups(model: nn.Module, lr: float, routing_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Groups for ``torch.optim`` constructors; every trainable parameter appears in exactly one group.

    "decay":     weight matrices and conv kernels (lr, weight_decay)
    "no_decay":  biases, norm gains, embedding tables and relative position bias tables (lr, no weight decay)
    "routing":   every DAR router parameter (routing_lr, default lr; no weight decay, since decaying a zero-
                 initialised query towards zero fights the routing it is meant to learn)
    Empty groups are left out (a residual model has no "routing" group).
    """
    routing = [p for p in routing_parameters(model) if p.requires_grad]
    routing_ids = {id(p) for p in routing}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding_ids |= {id(m.table) for m in model.modules() if isinstance(m, RelativePositionBias)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in routing_ids or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "routing", "params": routing, "lr": lr if routing_lr is None else routing_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]

"""A start-of-run memory estimate from parameter counts (per process), printed so that a user sees *why* a
configuration will not fit before it runs out of memory ten minutes in; ``eval/memory_table.py`` prints the same
estimate for the published architectures (built on the meta device) through :func:`estimate_for`.

Counted: weights of the frozen teacher, the student and the fake score (frozen parts in the storage dtype,
trainable parts in the training dtype), their gradients and AdamW states (two fp32 moments per trainable value),
the EMA of the student's trainable tensors, and a rough activation term for the two backward passes (student,
fake score):

    per layer and sample, without checkpointing: ~ 16 * tokens * hidden values (attention + MLP intermediates);
    with checkpointing: one layer's worth plus the block inputs (tokens * hidden per layer);
    DAR adds the routed history: sublayers * tokens * hidden values per sample.

On a shared base (``t2i.shared_base``) the student and the fake score hold only their LoRA matrices and routers
(the base is counted once, as the teacher; under FSDP it is sharded with them); with three copies each holds a
full copy of the base (under FSDP the two trained copies are sharded, the teacher's is not). Under FSDP a shared
base adds what FSDP (version 1, ``use_orig_params``) holds beyond the shards: each flat parameter's gradient
covers the whole flat parameter, frozen base values included (one buffer per unit, sharded), and a forward holds
the root unit (everything outside the ``FSDP_UNITS`` modules: embedders, adaLN, heads, routers, Flux's
single-block MLPs) and up to two units (the one running and the prefetched one) gathered in full, in the
compute dtype, with their full gradients in the backward. The activation
term is an order of magnitude, not a bound; the parameter terms are exact. :func:`disk_estimate` gives the sizes
of a training checkpoint and of the exported adapter from the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GiB = 1024 ** 3
# The FSDP units of configs/accelerate/fsdp_8gpu.yaml (fsdp_transformer_layer_cls_to_wrap; Flux: FluxAttention).
FSDP_UNITS = ("Attention", "FluxAttention", "FeedForward")


@dataclass
class NetCount:
    total: int  # parameters
    trainable: int
    frozen_bytes: int  # bytes per frozen value
    train_bytes: int  # bytes per trainable value


def count(module, frozen_bytes: int, train_bytes: int, frozen_only: bool = False) -> NetCount:
    """Parameter counts of ``module``; ``frozen_only``: its frozen parameters alone (the teacher on a shared base,
    which also carries the trainable adapters of student and fake score)."""
    params = [p for p in module.parameters() if not (frozen_only and p.requires_grad)]
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return NetCount(total, trainable, frozen_bytes, train_bytes)


def estimate(teacher: NetCount, student: NetCount, fake: NetCount, *, tokens: int, hidden: int, layers: int,
             batch: int, act_bytes: int, checkpointing: bool, ema: bool = True, offload_teacher: bool = False,
             dar_sublayers: int = 0, world_size: int = 1, sharded: bool = False,
             shared_base: bool = False, gathered: int = 0) -> dict[str, float]:
    """GiB per process, by component (module docstring). ``sharded``: FSDP divides weights, grads and optimizer
    states of student and fake, and the EMA (``ShardedEMA``: each process averages its own pieces), by
    ``world_size``; the teacher too when it is the ``shared_base`` (sharded once with the adapters), not when it
    is a copy of its own (not prepared). The EMA copies the whole student: on a shared base its trainable tensors
    only, with copies the frozen base too. A sharded shared base: gradients of the whole flat parameters (base
    included, in the training dtype), and ``gathered`` values (root unit + two units) in full in ``act_bytes``,
    with as many gradient values (module docstring)."""
    def weights(n: NetCount) -> int:
        return (n.total - n.trainable) * n.frozen_bytes + n.trainable * n.train_bytes

    shard = world_size if sharded else 1
    out = {
        "teacher": 0.0 if offload_teacher else weights(teacher) / (shard if shared_base else 1) / GiB,
        "student": weights(student) / shard / GiB,
        "fake_score": weights(fake) / shard / GiB,
        "gradients": (student.trainable * student.train_bytes + fake.trainable * fake.train_bytes) / shard / GiB,
        "optimizer": 8 * (student.trainable + fake.trainable) / shard / GiB,
        "ema": weights(student) / shard / GiB if ema else 0.0,
    }
    if sharded and shared_base:
        # one flat gradient per unit, frozen values included (FSDP's docs: mixing frozen and trained parameters in
        # a unit costs gradient memory for the frozen ones)
        out["gradients"] += teacher.total * student.train_bytes / shard / GiB
        out["gathered units"] = 2 * gathered * act_bytes / GiB
    per_layer = tokens * hidden * act_bytes * batch
    act = per_layer * (layers + 16) if checkpointing else per_layer * 16 * layers
    act += dar_sublayers * tokens * hidden * act_bytes * batch
    out["activations (rough)"] = act / GiB
    out["total"] = sum(out.values())
    return out


def format_estimate(est: dict[str, float], title: str) -> str:
    small = est["total"] < 1.0
    unit, scale = ("MiB", 1024.0) if small else ("GiB", 1.0)
    rows = [f"{title}"] + [f"  {k:<22} {v * scale:9.2f} {unit}" for k, v in est.items()]
    return "\n".join(rows)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_for(teacher: nn.Module, student: nn.Module, fake: nn.Module, *, storage_dtype: torch.dtype,
                 train_dtype: torch.dtype, mixed_precision: str, tokens: int, batch: int, checkpointing: bool,
                 ema: bool = True, offload_teacher: bool = False, world_size: int = 1, sharded: bool = False
                 ) -> dict[str, float]:
    """:func:`estimate` of a T2I run from its modules: the teacher's transformer (its frozen weights only), the
    student and fake-score ``T2INet``s (their DAR wrappers say how many sublayers they route), ``tokens`` image +
    text tokens per sample. Networks on one shared base (``shared_owner``, ``dmd_dar.t2i.task.AdapterNet``) count
    the base once, as the teacher, sharded under ``sharded``."""
    fb, tb = _bytes(storage_dtype), _bytes(train_dtype)
    act_bytes = 2 if mixed_precision in ("bf16", "fp16") else tb
    config = teacher.config
    layers = len(getattr(teacher, "transformer_blocks", [])) + len(getattr(teacher, "single_transformer_blocks", []))
    hidden = int(getattr(teacher, "inner_dim", 0) or 0) or \
        getattr(config, "num_attention_heads", 1) * getattr(config, "attention_head_dim", 1)
    sublayers = sum(int(getattr(n.model.router, "num_sublayers", 0))
                    for n in (student, fake) if getattr(n.model.routing_cfg, "is_dar", False))
    shared_base = getattr(student, "shared_owner", None) is not None
    return estimate(count(teacher, fb, fb, frozen_only=True), count(student, fb, tb), count(fake, fb, tb),
                    tokens=tokens, hidden=hidden, layers=max(layers, 1), batch=batch, act_bytes=act_bytes,
                    checkpointing=checkpointing, ema=ema, offload_teacher=offload_teacher, dar_sublayers=sublayers,
                    world_size=world_size, sharded=sharded, shared_base=shared_base,
                    gathered=gathered_values(teacher, student, fake) if sharded and shared_base else 0)


def gathered_values(base: nn.Module, *networks: nn.Module) -> int:
    """Parameters FSDP holds in full at once on a shared ``base`` wrapped with ``FSDP_UNITS`` units: the root unit
    (every tensor of the base and of ``networks`` outside a unit; gathered for the whole forward) plus the two
    largest units (the one running and the prefetched one)."""
    units = [m for m in base.modules() if type(m).__name__ in FSDP_UNITS]
    in_units = {id(p) for m in units for p in m.parameters()}
    every = {id(p): p.numel() for n in (base, *networks) for p in n.parameters()}
    sizes = sorted((sum(p.numel() for p in m.parameters()) for m in units), reverse=True)
    return sum(v for k, v in every.items() if k not in in_units) + sum(sizes[:2])


def disk_estimate(student: nn.Module, fake: nn.Module, *, storage_dtype: torch.dtype, train_dtype: torch.dtype,
                  ema: bool = True) -> dict[str, float]:
    """GB (1e9 bytes) on disk: a training checkpoint (student and fake-score weights as ``state_dict`` holds them,
    their AdamW moments, the EMA) and the exported adapter file (the student's LoRA matrices, one format)."""
    fb, tb = _bytes(storage_dtype), _bytes(train_dtype)
    s, f = count(student, fb, tb), count(fake, fb, tb)

    def weights(n: NetCount) -> int:
        return (n.total - n.trainable) * n.frozen_bytes + n.trainable * n.train_bytes

    ema_bytes = (s.total - s.trainable) * fb + s.trainable * tb if ema else 0  # EMA.state_dict: the whole module
    checkpoint = weights(s) + weights(f) + 8 * (s.trainable + f.trainable) + ema_bytes
    lora = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    return {"checkpoint": checkpoint / 1e9, "exported adapter": lora * tb / 1e9}

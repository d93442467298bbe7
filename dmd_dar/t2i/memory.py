"""A start-of-run memory estimate from parameter counts (per process, before FSDP sharding), printed so that a user
sees *why* a configuration will not fit before it runs out of memory ten minutes in.

Counted: weights of the frozen teacher, the student and the fake score (frozen parts in the storage dtype,
trainable parts in the training dtype), their gradients and AdamW states (two fp32 moments per trainable value),
the EMA copy of the student, and a rough activation term for the two backward passes (student, fake score):

    per layer and sample, without checkpointing: ~ 16 * tokens * hidden values (attention + MLP intermediates);
    with checkpointing: one layer's worth plus the block inputs (tokens * hidden per layer);
    DAR adds the routed history: sublayers * tokens * hidden values per sample.

The activation term is an order of magnitude, not a bound; the parameter terms are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3


@dataclass
class NetCount:
    total: int  # parameters
    trainable: int
    frozen_bytes: int  # bytes per frozen value
    train_bytes: int  # bytes per trainable value


def count(module, frozen_bytes: int, train_bytes: int) -> NetCount:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return NetCount(total, trainable, frozen_bytes, train_bytes)


def estimate(teacher: NetCount, student: NetCount, fake: NetCount, *, tokens: int, hidden: int, layers: int,
             batch: int, act_bytes: int, checkpointing: bool, ema: bool = True, offload_teacher: bool = False,
             dar_sublayers: int = 0, world_size: int = 1, sharded: bool = False) -> dict[str, float]:
    """GiB per process, by component (module docstring). ``sharded``: FSDP divides weights, grads and optimizer
    states of student and fake by ``world_size`` (the teacher and the EMA are not prepared, so not sharded)."""
    def weights(n: NetCount) -> int:
        return (n.total - n.trainable) * n.frozen_bytes + n.trainable * n.train_bytes

    shard = world_size if sharded else 1
    out = {
        "teacher": 0.0 if offload_teacher else weights(teacher) / GiB,
        "student": weights(student) / shard / GiB,
        "fake_score": weights(fake) / shard / GiB,
        "gradients": (student.trainable * student.train_bytes + fake.trainable * fake.train_bytes) / shard / GiB,
        "optimizer": 8 * (student.trainable + fake.trainable) / shard / GiB,
        "ema": weights(student) / GiB if ema else 0.0,
    }
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

"""What changes when the trained networks are FSDP-sharded (accelerate's FSDP, version 1, ``use_orig_params``).

Under FSDP every process holds one flat shard of each wrapped unit; the original parameters are 1-D views of the
local piece (often empty). Four things in a training loop stop working the DDP way, and this module holds their
sharded forms:

- the gradient norm: each element of a FULL_SHARD / SHARD_GRAD_OP flat parameter lives on exactly one process,
  so the squared norms of the local pieces are summed over processes (``clip_grad_norm``);
- the full weights: ``accelerator.get_state_dict`` is a collective that every process must enter (the trainer's
  checkpoint and export paths call it everywhere, and only the main process writes);
- optimizer state and the EMA: kept per process, for the local pieces, and checkpointed per process
  (``ShardedEMA``; exact resume needs the same number of processes and the same wrapping);
- forwards that must not touch gradients go through the wrapper (``forward_module``): the root unit gathers its
  own parameters (embedders, adaLN, routers) in its pre-forward hook, so the bare inner module cannot run.

Networks on one shared module (a LoRA run's frozen base: ``dmd_dar.t2i.task.AdapterNet``) name its owner as
``shared_owner``: an object whose ``root`` module registers every network's parameters and is called for every
forward. Under FSDP that root is wrapped once (``prepare_shared``) and the networks stay unwrapped views of their
own parameters in it; ``gather_params`` gathers the full values of just those, one FSDP unit at a time.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import nn

from dmd_dar.errors import UserError
from dmd_dar.training.ema import check_decay, ema_decay

SUPPORTED_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was configured for FSDP (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(accelerator) -> bool:
    # accelerate's DistributedType is a str enum: comparing with its value keeps this module, which the DMD method
    # imports (forward_module, is_sharded), free of accelerate
    return accelerator.distributed_type == "FSDP"


def check_distribution(accelerator, command: str, fsdp_supported: bool = True) -> None:
    """Fail fast when the launch asked for FSDP but the run would silently be something else.

    accelerate only sets FSDP up on accelerator devices: on a CPU-only machine the same launch becomes plain DDP
    (``run.cpu=true``) or N independent single-process runs writing into one folder.
    """
    if fsdp_requested() and not is_fsdp(accelerator):
        raise UserError(f"the accelerate config asks for FSDP, but accelerate set up {accelerator.distributed_type} "
                        f"on {accelerator.device}: it runs FSDP only on GPUs (CUDA, XPU, NPU, ...). Launch with "
                        f"a DDP config (e.g. configs/accelerate/ddp_8gpu.yaml, or --multi_gpu) on this machine")
    if not is_fsdp(accelerator):
        return
    if not fsdp_supported:
        raise UserError(f"dmd-dar {command} does not support FSDP; launch it with DDP (configs/accelerate/ddp_8gpu.yaml)"
                        f" — FSDP is for `dmd-dar distill` of large teachers")
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 1:
        raise UserError(f"fsdp_version={plugin.fsdp_version}: dmd-dar {command} supports FSDP version 1; set "
                        f"fsdp_version: 1 in the accelerate config (see configs/accelerate/fsdp_8gpu.yaml)")
    if not plugin.use_orig_params:
        raise UserError("fsdp_use_orig_params=false: dmd-dar needs fsdp_use_orig_params: true (per-parameter "
                        "requires_grad for LoRA and the router parameter groups); set it in the accelerate config")
    strategy = getattr(plugin.sharding_strategy, "name", str(plugin.sharding_strategy))
    if strategy not in SUPPORTED_STRATEGIES:
        raise UserError(f"fsdp_sharding_strategy={strategy}: dmd-dar supports {', '.join(SUPPORTED_STRATEGIES)} "
                        f"(the hybrid strategies replicate shards across nodes, which the gradient norm and the "
                        f"per-process checkpoints do not account for)")


def _sharded_strategy(accelerator) -> bool:
    strategy = accelerator.state.fsdp_plugin.sharding_strategy
    return getattr(strategy, "name", str(strategy)) != "NO_SHARD"


def _fsdp_class() -> type:
    """torch's ``FullyShardedDataParallel``, imported on first use."""
    # lazy: torch.distributed.fsdp takes ~1.5 s to import, and an unsharded run never builds one
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP wrapper (its root parameters are pieces, gathered in its pre-forward hook) or a
    network on a shared root that is one. Their parameters must not be frozen around a forward: the views FSDP
    hands a forward require a gradient when any parameter of their unit does, so freezing changes the graph, and
    an activation-checkpointed recomputation in the backward (after unfreezing) no longer matches it."""
    owner = shared_owner(model)
    return isinstance(model, _fsdp_class()) or bool(owner is not None and owner.sharded)


def forward_module(model: nn.Module) -> nn.Module:
    """The module to call for a forward outside gradient synchronisation (no-grad forwards, frozen-parameter
    passes): the bare module inside a DDP wrapper (no reducer, no buffer broadcast), an FSDP wrapper itself."""
    return model if is_sharded(model) else getattr(model, "module", model)


def shared_owner(model: nn.Module):
    """The owner of ``model``'s parameters shared with other networks (module docstring), or None."""
    return getattr(model, "shared_owner", None)


def prepare_shared(accelerator, models: list[nn.Module]) -> None:
    """Wrap the shared root of each of ``models`` once (accelerate's ``prepare``: FSDP with the launch's auto-wrap
    policy) and mark its owner ``sharded``; the models themselves stay unwrapped."""
    done = set()
    for model in models:
        owner = shared_owner(model)
        if owner is not None and id(owner) not in done:
            owner.root = accelerator.prepare(owner.root)
            owner.sharded = True
            done.add(id(owner))


def _unit_params(unit: nn.Module) -> list[nn.Parameter]:
    """The original parameters in FSDP unit ``unit``'s own flat parameter (those of nested units left out)."""
    FullyShardedDataParallel = _fsdp_class()
    out, stack = [], [unit.module]
    while stack:
        m = stack.pop()
        out.extend(m.parameters(recurse=False))
        stack.extend(c for c in m.children() if not isinstance(c, FullyShardedDataParallel))
    return out


@torch.no_grad()
def gather_params(root: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The full values (on the CPU) of ``params``, original parameters of the FSDP-wrapped ``root``, gathered unit
    by unit (one unit's full weights at a time, never the whole model). A collective: every process calls it."""
    FullyShardedDataParallel = _fsdp_class()
    names = {id(p): name for name, p in params.items()}
    out = {}
    for unit in FullyShardedDataParallel.fsdp_modules(root):  # the root first: its summon does FSDP's lazy init
        mine = [(names[id(p)], p) for p in _unit_params(unit) if id(p) in names]
        if not mine and unit is not root:
            continue
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for name, p in mine:
                out[name] = p.detach().to("cpu", copy=True)
    missing = set(params) - set(out)
    if missing:
        raise RuntimeError(f"parameters outside {type(root).__name__}'s FSDP units: {sorted(missing)[:4]}")
    return out


@torch.no_grad()
def clip_grad_norm(accelerator, params: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Clip the joint gradient of ``params`` (possibly spanning several prepared models) to ``max_norm`` and
    return its norm before clipping, under DDP and FSDP alike (``math.inf``: measure only)."""
    if not is_fsdp(accelerator):
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()
    grads = [p.grad for p in params if p.grad is not None]
    device = accelerator.device
    local = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if g.numel():
            local += g.detach().double().pow(2).sum()
    if _sharded_strategy(accelerator):  # each element lives on one process: add the pieces up
        torch.distributed.all_reduce(local)
    norm = local.sqrt()
    if math.isfinite(max_norm) and grads:
        coef = min(1.0, max_norm / (norm.item() + 1e-6))  # a number: offloaded gradients live on the CPU
        if coef < 1.0:
            torch._foreach_mul_([g for g in grads if g.numel()], coef)
    return norm.float()


class ShardedEMA:
    """The EMA of an FSDP-sharded model's local parameter pieces (each process averages what it holds).

    ``swapped_into(model)`` puts the averages into the live model for the duration of a ``with`` block, so the
    full EMA weights can be gathered with the same collective as the raw ones; the raw weights come back after.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = check_decay(decay), warmup
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.num_updates = 0

    def current_decay(self) -> float:
        return ema_decay(self.decay, self.warmup, self.num_updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [(self.shadow[name], p.detach()) for name, p in model.named_parameters() if p.numel()]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs], 1.0 - self.current_decay())
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        params = dict(model.named_parameters())
        raw = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise UserError(f"the checkpoint's EMA shard does not match this run's wrapping (keys differ: "
                            f"{sorted(missing)[:4]}...); resume with the same accelerate config and process count")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise UserError(f"EMA shard {name}: checkpoint {tuple(value.shape)} vs run "
                                f"{tuple(self.shadow[name].shape)}; resume with the same number of processes")
            self.shadow[name].copy_(value)
        self.num_updates = num_updates

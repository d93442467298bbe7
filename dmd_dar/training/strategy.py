"""How a run's networks are spread over its processes, behind one interface: replicated (DDP, or one
process) or sharded (FSDP; see ``sharding.py`` for what that changes).

A training loop asks its strategy, never the accelerator's distributed type, for what differs: which EMA
averages the generator and when it is made, which module the EMA reads, where optimizer and EMA state go in a
checkpoint (once, by the main process, or each process its own piece) and how a resume gets them back, how
the full weights are gathered for sampling and export, and whether replicas can be compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmd_dar.errors import UserError
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint, load_process_state
from dmd_dar.training.ema import EMA
from dmd_dar.training.sharding import ShardedEMA, gather_params, is_fsdp, prepare_shared, shared_owner


class Strategy:
    """The DDP / FSDP differences of a training loop. Made by ``make_strategy`` after ``check_distribution``.

    A checkpoint's state dict is ``{"networks", "optimizers", "state", "process"}``: full network weights,
    optimizer / scheduler states and ``state.json``'s contents (with ``step``), all written once by the main
    process, and this process's own pieces (``None`` unless ``per_process_state``).
    """

    sharded: bool = False
    # Optimizer and EMA state are each process's own pieces, checkpointed per process.
    per_process_state: bool = False

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    # -- the EMA ---------------------------------------------------------------------------------------------
    def ema_before_prepare(self, model: nn.Module, decay: float) -> EMA | None:
        """The EMA made from the unwrapped network (so a resume can load it before ``prepare``), or None."""
        raise NotImplementedError

    def ema_after_prepare(self, model: nn.Module, ema: EMA | None, decay: float) -> EMA | ShardedEMA | None:
        """The EMA to train with, given the prepared network and ``ema_before_prepare``'s result."""
        raise NotImplementedError

    def ema_source(self, model: nn.Module) -> nn.Module:
        """The module whose parameters the EMA averages, for a prepared ``model``."""
        raise NotImplementedError

    # -- wrapping --------------------------------------------------------------------------------------------
    def prepare(self, *objs):
        """accelerate's ``prepare`` of networks and optimizers (one result, or a tuple for several)."""
        return self.accelerator.prepare(*objs)

    # -- weights ---------------------------------------------------------------------------------------------
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full weights of a prepared ``model``. Every process calls it (under FSDP: a collective)."""
        return self.accelerator.get_state_dict(model)

    def sampling_net(self, model: nn.Module, ema, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The EMA, or the raw ``model`` (no EMA), as a plain module for sample grids and export; None on the
        processes that get none. Every process calls it. ``build``: a fresh, unwrapped network of the same
        architecture (for the gathered weights)."""
        raise NotImplementedError

    def replicas_identical(self, model: nn.Module) -> bool | None:
        """Whether every process holds bit-identical weights of ``model`` (None: there are no replicas)."""
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, ckpt: Checkpointer, state: dict[str, Any]) -> None:
        """Write a checkpoint state dict (see the class docstring) as the checkpoint of its
        ``state["step"]``. Every process calls it: each stages its own pieces first, then the main process
        writes the rest and moves the pieces in."""
        accelerator, step = self.accelerator, state["state"]["step"]
        if state["process"] is not None:
            ckpt.stage_process_state(step, accelerator.process_index, state["process"])
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.save(step, state["networks"], state["optimizers"], state["state"])
        accelerator.wait_for_everyone()

    def load(self, path: Path) -> dict[str, Any]:
        """The state dict of checkpoint ``path`` as ``save`` wrote it, with this process's own pieces."""
        networks, optimizers, state = load_checkpoint(path)
        if state.get("sharded", False) != self.sharded:
            written = "an FSDP" if state.get("sharded") else "a non-FSDP"
            raise UserError(f"{path} was written by {written} run and this run is "
                            f"{'FSDP' if self.sharded else 'not FSDP'}: resume with the launch that wrote it "
                            f"(or start a new run from its export)")
        process = None
        if self.per_process_state:
            accelerator = self.accelerator
            process = load_process_state(path, accelerator.process_index, accelerator.num_processes)
        return {"networks": networks, "optimizers": optimizers, "state": state, "process": process}


class Replicated(Strategy):
    """DDP or a single process: every process holds the same full networks, optimizer state and EMA."""

    def ema_before_prepare(self, model, decay):
        return EMA(model, decay) if decay > 0 else None

    def ema_after_prepare(self, model, ema, decay):
        if ema is not None:
            ema.model.to(self.accelerator.device)
        return ema

    def ema_source(self, model):
        return self.accelerator.unwrap_model(model)

    def sampling_net(self, model, ema, build):
        return ema.model if ema is not None else self.accelerator.unwrap_model(model)

    @torch.no_grad()
    def replicas_identical(self, model):
        """DDP keeps the replicas bit-identical; a difference means a bug. Compared through three moments of
        each parameter (sum, sum of squares, a position-weighted sum), gathered from every process."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return True
        sums = []
        for p in accelerator.unwrap_model(model).parameters():
            v = p.detach().double().flatten()
            ramp = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
            sums.append(torch.stack([v.sum(), (v * v).sum(), (v * ramp).sum()]))
        local = torch.cat(sums)[None]  # [1, 3 * num_params]
        everyone = accelerator.gather(local)  # [world, 3 * num_params]
        return bool((everyone == everyone[0:1]).all())


class Sharded(Strategy):
    """FSDP: each process holds one shard of every wrapped unit, its optimizer state and EMA for that shard;
    the full weights exist only when gathered (a collective)."""

    sharded = True
    per_process_state = True

    def prepare(self, *objs):
        """As accelerate's, except that networks on a shared module (``sharding.shared_owner``) are not wrapped
        themselves: their shared root is, once, and they stay views of their own parameters in it."""
        shared = [o for o in objs if isinstance(o, nn.Module) and shared_owner(o) is not None]
        prepare_shared(self.accelerator, shared)
        rest = [o for o in objs if not any(o is s for s in shared)]
        prepared = self.accelerator.prepare(*rest) if rest else ()
        prepared = iter(prepared if len(rest) > 1 else (prepared,))
        out = tuple(o if any(o is s for s in shared) else next(prepared) for o in objs)
        return out if len(out) > 1 else out[0]

    def full_state_dict(self, model):
        owner = shared_owner(model)
        if owner is None:
            return super().full_state_dict(model)
        params = dict(model.named_parameters())
        state = gather_params(owner.root, params)
        state.update({k: v for k, v in model.state_dict().items() if k not in params})  # buffers: not sharded
        return state

    def ema_before_prepare(self, model, decay):
        return None  # the shards exist only after prepare

    def ema_after_prepare(self, model, ema, decay):
        return ShardedEMA(model, decay) if decay > 0 else None

    def ema_source(self, model):
        return model  # the wrapper: its parameters are this process's pieces

    def sampling_net(self, model, ema, build):
        with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
            state = self.full_state_dict(model)
        if not self.accelerator.is_main_process:
            return None
        net = build()
        net.load_state_dict(state)
        return net.to(self.accelerator.device)

    def replicas_identical(self, model):
        return None  # one sharded copy, no replicas


def make_strategy(accelerator) -> Strategy:
    """The strategy of ``accelerator``'s launch (FSDP or not)."""
    return Sharded(accelerator) if is_fsdp(accelerator) else Replicated(accelerator)

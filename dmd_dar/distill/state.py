"""Everything a distill run trains and counts, in one object: what a checkpoint holds and a resume restores.

On disk (``training.checkpoint``): the weights ``generator``, ``fake_score`` [, ``gan_head``]
[, ``generator_ema``]; ``optim_generator_sched`` / ``optim_fake_sched`` [, ``optim_generator`` /
``optim_fake``]; ``state.json`` with step, ``ema_updates``, ``bad_steps_total``, ``num_processes``,
``sharded`` and the teacher's digest; under FSDP each process's optimizer and EMA pieces in
``process_state/``. These names are the checkpoint format: a run resumes from checkpoints written by earlier
versions. A run without a fake score (Decoupled DMD with ``method.regularizer=meanvar|gan``) has no
``fake_score``; one without any critic (no fake score, no GAN head) has no fake optimizer or scheduler either.
Each entry holds what its network's ``state_dict`` holds: on a shared LoRA base (``dmd_dar.t2i.task.AdapterNet``)
that is the LoRA matrices and routers only (no base tensor; the base is named by its digest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.gan import GANHead
from dmd_dar.distill.health import BadStepGuard
from dmd_dar.distill.task import DistillTask
from dmd_dar.errors import UserError
from dmd_dar.training.ema import EMA
from dmd_dar.training.optim import build_optimizer, lr_schedule
from dmd_dar.training.sharding import ShardedEMA
from dmd_dar.training.strategy import Strategy


@dataclass
class TrainingState:
    """The networks, optimizers, schedulers, EMA, bad-step counters and step of a distill run.

    Life cycle: ``build``; on resume ``load_state_dict`` (before ``prepare``: full weights load into the
    unwrapped networks); ``prepare`` (wraps them for the launch, then restores what exists only after
    wrapping: FSDP's per-process optimizer and EMA pieces); then ``state_dict`` for each checkpoint.
    """

    strategy: Strategy
    student: nn.Module
    fake: nn.Module | None  # None: the method needs no fake score (MethodConfig.needs_fake_score)
    gan_head: nn.Module | None
    g_opt: torch.optim.Optimizer
    f_opt: torch.optim.Optimizer | None  # None: no critic (no fake score, no GAN head)
    g_sched: torch.optim.lr_scheduler.LRScheduler
    f_sched: torch.optim.lr_scheduler.LRScheduler | None
    guard: BadStepGuard
    ema: EMA | ShardedEMA | None
    ema_decay: float
    teacher: str | None  # the teacher's digest (DistillTask.teacher_identity), checked on resume
    teacher_source: str  # networks.teacher (t2i.model), for messages
    fake_track_student: float = 0.0  # networks.fake_track_student
    step: int = 0
    _resumed: dict[str, Any] | None = field(default=None, repr=False)  # state that prepare() restores

    @classmethod
    def build(cls, cfg: DistillConfig, task: DistillTask, strategy: Strategy) -> TrainingState:
        """Fresh networks and optimizers of a run (new parameters draw from the global RNG: seed it first)."""
        nets = cfg.networks
        student = task.build_network(nets.student_routing, nets.gradient_checkpointing, role="student")
        fake = None
        if cfg.method.needs_fake_score:
            fake = task.build_network(nets.fake_routing, nets.gradient_checkpointing, role="fake")
            if nets.fake_init == "student":
                copy_shared_tensors(student, fake)
        elif nets.fake_track_student > 0:
            raise UserError(f"networks.fake_track_student={nets.fake_track_student} but method.regularizer="
                            f"{cfg.method.regularizer} trains no fake score; set networks.fake_track_student=0")
        if nets.fake_track_student > 0 and strategy.sharded:
            raise UserError("networks.fake_track_student > 0 is not available under FSDP (the fake score and "
                            "the student are sharded apart); set networks.fake_track_student=0 or launch without "
                            "FSDP")
        gan_head = GANHead(task.feature_dim) if cfg.method.gan_weight > 0 else None
        g, f = cfg.generator_optim, cfg.fake_optim
        g_opt = build_optimizer(task.param_groups(student, g.lr, g.routing_lr, g.weight_decay), g)
        f_groups = task.param_groups(fake, f.lr, f.routing_lr, f.weight_decay) if fake is not None else []
        if gan_head is not None:
            f_groups.append({"params": list(gan_head.parameters()), "lr": f.lr, "weight_decay": 0.0})
        f_opt = build_optimizer(f_groups, f) if f_groups else None
        m = cfg.method
        # The generator's own update count: one per warm-start iteration, then every ttur-th iteration.
        horizon = g.horizon(cfg.run.steps)
        warm = min(m.warm_start_steps, horizon)
        g_updates = warm + len(range(math.ceil(warm / m.ttur) * m.ttur, horizon, m.ttur))
        warm_scale = (m.warm_start_lr / g.lr) if m.warm_start_lr is not None else 1.0
        return cls(strategy=strategy, student=student, fake=fake, gan_head=gan_head, g_opt=g_opt,
                   f_opt=f_opt, g_sched=lr_schedule(g_opt, g, g_updates, m.warm_start_steps, warm_scale),
                   f_sched=lr_schedule(f_opt, f, f.horizon(cfg.run.steps)) if f_opt is not None else None,
                   guard=BadStepGuard(cfg.max_bad_steps),
                   ema=strategy.ema_before_prepare(student, cfg.ema_decay), ema_decay=cfg.ema_decay,
                   teacher=task.teacher_identity(), fake_track_student=nets.fake_track_student,
                   teacher_source=cfg.t2i.model if nets.teacher_kind == "diffusers" else nets.teacher)

    @property
    def critic_networks(self) -> list[nn.Module]:
        """What the critic phase trains: the fake score [and the GAN head]; empty: no critic phase."""
        return [m for m in (self.fake, self.gan_head) if m is not None]

    def prepare(self) -> None:
        """Wrap networks and optimizers for the launch (accelerate's ``prepare``), make the EMA the strategy
        trains with, and restore the per-process pieces of a resumed checkpoint."""
        names = [n for n in ("student", "fake", "g_opt", "f_opt", "gan_head") if getattr(self, n) is not None]
        prepared = self.strategy.prepare(*(getattr(self, n) for n in names))
        for name, obj in zip(names, prepared if len(names) > 1 else [prepared]):
            setattr(self, name, obj)
        self.ema = self.strategy.ema_after_prepare(self.student, self.ema, self.ema_decay)
        resumed, self._resumed = self._resumed, None
        if resumed is not None and resumed["process"] is not None:
            own = resumed["process"]
            self.g_opt.load_state_dict(own["generator"])
            if self.f_opt is not None:
                self.f_opt.load_state_dict(own["fake"])
            if self.ema is not None:
                self.ema.load_state_dict(own["ema"], resumed["ema_updates"])

    def sampling_net(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The EMA (or the raw student without one) as a plain module for grids and export; every process
        calls it; the ones that get none receive None (``Strategy.sampling_net``; ``build``: a student)."""
        return self.strategy.sampling_net(self.student, self.ema, build)

    @torch.no_grad()
    def track_student(self) -> None:
        """After a fake-score update: fake <- d * fake + (1 - d) * student on the tensors they share
        (``networks.fake_track_student`` = d; nothing when 0)."""
        if self.fake_track_student <= 0:
            return
        pairs = _shared_tensors(self.strategy.ema_source(self.student), self.strategy.ema_source(self.fake))
        fake = [f for _, f in pairs]
        torch._foreach_lerp_(fake, [s.to(f.dtype) for s, f in pairs], 1.0 - self.fake_track_student)

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.strategy.ema_source(self.student))

    def state_dict(self) -> dict[str, Any]:
        """``{"networks", "optimizers", "state", "process"}`` (``Strategy.save`` writes it). Every process
        calls it: gathering sharded weights is a collective."""
        s = self.strategy
        networks = {"generator": s.full_state_dict(self.student)}
        if self.fake is not None:
            networks["fake_score"] = s.full_state_dict(self.fake)
        if self.gan_head is not None:
            networks["gan_head"] = s.full_state_dict(self.gan_head)
        optimizers = {"generator_sched": self.g_sched.state_dict()}
        own = {"generator": self.g_opt.state_dict()}
        if self.f_opt is not None:
            optimizers["fake_sched"] = self.f_sched.state_dict()
            own["fake"] = self.f_opt.state_dict()
        ema = self.ema.state_dict() if self.ema is not None else None
        process = None
        if s.per_process_state:
            process = {**own, "ema": ema if ema is not None else {}}
        else:
            optimizers.update(own)
            if ema is not None:
                networks["generator_ema"] = ema
        state = {"step": self.step, "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                 "bad_steps_total": self.guard.total, "num_processes": s.accelerator.num_processes,
                 "sharded": s.sharded, "teacher": self.teacher}
        return {"networks": networks, "optimizers": optimizers, "state": state, "process": process}

    def load_state_dict(self, checkpoint: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Restore ``state_dict()``'s output (as ``Strategy.load`` reads it) into the unwrapped networks,
        before ``prepare``. ``source``: the checkpoint folder, named in the errors when it does not fit."""
        nets, opts, state = checkpoint["networks"], checkpoint["optimizers"], checkpoint["state"]
        run_dir = Path(source).parent.parent  # <run>/checkpoints/step_XXXXXXX
        if state.get("teacher") is not None and self.teacher is not None and state["teacher"] != self.teacher:
            raise UserError(f"{source} was trained against other teacher weights than {self.teacher_source} "
                            f"holds now (sha256 {state['teacher'][:12]}... vs {self.teacher[:12]}...): start "
                            f"a new run in another folder (run.out_dir=<new folder>) or delete {run_dir}")
        try:
            self.student.load_state_dict(nets["generator"])
            if self.fake is not None:
                self.fake.load_state_dict(nets["fake_score"])
        except RuntimeError as err:  # e.g. a checkpoint of an older teacher architecture
            first = str(err).strip().splitlines()
            raise UserError(f"{source} does not fit the networks this config builds "
                            f"({' '.join(first[:2])[:300]}): the teacher or the architecture changed "
                            f"since it was written; start a new run in another folder "
                            f"(run.out_dir=<new folder>) or delete {run_dir}") from None
        if self.gan_head is not None:
            self.gan_head.load_state_dict(nets["gan_head"])
        if not self.strategy.per_process_state:  # else prepare() restores them into the sharded optimizers
            if self.ema is not None:
                self.ema.load_state_dict(nets["generator_ema"], state["ema_updates"])
            self.g_opt.load_state_dict(opts["generator"])
            if self.f_opt is not None:
                self.f_opt.load_state_dict(opts["fake"])
        self.g_sched.load_state_dict(opts["generator_sched"])
        if self.f_sched is not None:
            self.f_sched.load_state_dict(opts["fake_sched"])
        self.step = state["step"]
        self.guard.total = state.get("bad_steps_total", 0)
        self._resumed = {"process": checkpoint["process"], "ema_updates": state["ema_updates"]}


def _shared_tensors(student: nn.Module, fake: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student tensor, fake tensor) for every parameter both networks have under one name and shape: the LoRA
    matrices of two adapters on one base, the routers when both route alike, the weights of two full copies."""
    theirs = dict(fake.named_parameters())
    return [(p, theirs[n]) for n, p in student.named_parameters() if n in theirs and theirs[n].shape == p.shape]


@torch.no_grad()
def copy_shared_tensors(student: nn.Module, fake: nn.Module) -> None:
    """``networks.fake_init=student``: the fake score starts from the student's values of every tensor they share."""
    for s, f in _shared_tensors(student, fake):
        f.copy_(s)

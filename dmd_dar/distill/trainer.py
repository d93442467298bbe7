"""``dmd-dar distill``: the DMD2 training loop (plumbing only; the maths is in ``method.py`` and ``losses.py``).

Each iteration: a generator update every ``method.ttur``-th iteration, a fake-score (critic) update every
iteration; in the first ``method.warm_start_steps`` iterations, a regression-only generator update and no critic.
Each update accumulates ``run.grad_accum`` micro-batches of ``run.batch_size`` (``accumulated_update``).
Everything random in iteration s derives from (seed, s, micro-batch, rank), so resume is exact. What a
checkpoint holds is ``state.TrainingState``; what differs between DDP and FSDP, ``training.strategy``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmd_dar.config import check_resume_config, save_config, to_yaml
from dmd_dar.data.manifest import save_grid
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.health import BadStepGuard, VarianceDriftCheck, output_drift
from dmd_dar.distill.method import DMD2, DecoupledDMD, MicroBatch
from dmd_dar.distill.state import TrainingState
from dmd_dar.distill.task import DistillTask, NativeTask
from dmd_dar.errors import UserError
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.lpips_metric import LpipsModel
from dmd_dar.training.checkpoint import Checkpointer
from dmd_dar.training.compile import compile_forward
from dmd_dar.training.optim import resumable_changes
from dmd_dar.training.run import make_accelerator
from dmd_dar.training.seeding import derive_seed, seed_step
from dmd_dar.training.sharding import check_distribution, clip_grad_norm
from dmd_dar.training.strategy import make_strategy

RESUMABLE_CHANGES = ("run.steps", "run.log_every", "run.sample_every", "run.ckpt_every", "run.keep_checkpoints",
                     "run.progress", "run.log_with", "run.resume", "run.compile", "debug_grid_every")


def build_task(cfg: DistillConfig, device) -> DistillTask:
    """The teacher family named by ``networks.teacher_kind``."""
    if cfg.networks.teacher_kind == "native":
        return NativeTask(cfg.networks.teacher, cfg.method.student_steps, cfg.data, device)
    # lazy: dmd_dar.t2i.task imports diffusers (seconds) through backbones; native teachers never need it
    from dmd_dar.t2i.task import DiffusersT2ITask

    return DiffusersT2ITask(cfg, device)


def _lpips_fn(cfg: DistillConfig):
    if not cfg.method.needs_regression_pairs or cfg.method.regression_loss != "lpips":
        return None
    try:
        net = LpipsModel()
    except MetricUnavailable as exc:
        raise UserError(f"method.regression_loss=lpips: {exc}; or use method.regression_loss=mse") from exc
    return lambda a, b: net(a, b)


def accumulated_update(accelerator, models: list, optimizer, params: list, grad_clip: float, guard: BadStepGuard,
                       phase: str, micro_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]]
                       ) -> tuple[bool, float | None, dict[str, float]]:
    """One optimizer update over n = ``accelerator.gradient_accumulation_steps`` (= run.grad_accum) micro-batches.

    ``micro_loss(m)`` builds micro-batch m's loss (with graph) and logs; each loss is back-propagated at once
    (``accelerator.backward`` divides it by n) under ``no_sync`` of ``models`` except for the last micro-batch, so
    DDP all-reduces the summed gradient once. Then one clip and one optimizer step, skipped (and counted by
    ``guard`` under ``phase``) when a loss or the gradient norm is non-finite. The norm is taken after the sync, so
    a non-finite gradient makes every process skip alike; non-finite losses are back-propagated too, since a
    process that skipped its backward would stall DDP's all-reduce on the others.
    Returns (stepped, gradient norm, logs averaged over the micro-batches).
    """
    n = accelerator.gradient_accumulation_steps
    losses, logs = [], []
    # Normally already clear; under FSDP the generator's GAN pass leaves gradients on the fake score (method.py).
    optimizer.zero_grad(set_to_none=True)
    for m in range(n):
        with contextlib.ExitStack() as stack:
            if m < n - 1:
                for model in models:
                    stack.enter_context(accelerator.no_sync(model))
            loss, micro_logs = micro_loss(m)
            if loss.requires_grad:
                accelerator.backward(loss)
        losses.append(loss.detach())
        logs.append(micro_logs)
    norm = clip_grad_norm(accelerator, params, grad_clip if grad_clip > 0 else math.inf)
    norm = None if norm is None else float(norm)
    # fp16: the grad scaler skips overflowing steps itself (and lowers its scale), so only the losses count here.
    stepped = guard.check(*losses, norm if accelerator.scaler is None else None, phase=phase)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    keys = dict.fromkeys(k for d in logs for k in d)
    return stepped, norm, {k: sum(d[k] for d in logs if k in d) / sum(k in d for d in logs) for k in keys}


def _micro_batches(cfg: DistillConfig, task: DistillTask, step: int, accelerator, need_real: bool
                   ) -> list[MicroBatch]:
    """The micro-batches of iteration ``step``, each with its own random stream and one shared by all ranks.

    Micro-batch 0 draws exactly what an iteration without accumulation draws; micro-batch m > 0 has its own seeds.
    """
    out, rank = [], accelerator.process_index
    for m in range(cfg.run.grad_accum):
        if m == 0:
            gen = seed_step(cfg.run.seed, step, rank)
            shared = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shared", step))
        else:
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "train", step, rank, "micro", m))
            shared = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shared", step, "micro", m))
        out.append(MicroBatch(task.draw(cfg.run.batch_size, gen, accelerator.device, need_real), gen, shared))
    return out


def _phase_update(accelerator, phase: str, log_prefix: str, models: list, optimizer, scheduler, params: list,
                  grad_clip: float, guard: BadStepGuard, step_fn: Callable, micro: list[MicroBatch]
                  ) -> tuple[bool, dict[str, float]]:
    """One phase's optimizer update over the iteration's micro-batches (``accumulated_update`` of the method's
    ``step_fn`` under autocast) and its scheduler step. Returns (stepped, logs with the health entries)."""
    def micro_loss(m: int):
        with accelerator.autocast():
            return step_fn(micro[m])

    stepped, norm, logs = accumulated_update(accelerator, models, optimizer, params, grad_clip, guard, phase,
                                             micro_loss)
    logs[f"health/skipped_{phase}_step"] = 0.0 if stepped else 1.0
    if stepped and grad_clip > 0 and norm is not None:
        logs[f"{log_prefix}/grad_norm"] = norm
    scheduler.step()
    return stepped, logs


def _generator_phase(accelerator, cfg: DistillConfig, task: DistillTask, state: TrainingState, method: DMD2,
                     micro: list[MicroBatch], step: int, do_log: bool, reference: dict[str, torch.Tensor] | None,
                     drift_check: VarianceDriftCheck, run_dir: Path, warm_start: bool = False) -> dict[str, float]:
    """Iteration ``step``'s generator update (the method's ``generator_step``, or ``warm_start_step`` in the
    warm start), then the EMA, the output drift against the teacher samples and the debug grid. Returns its logs."""
    state.student.train()
    step_fn = method.warm_start_step if warm_start else method.generator_step
    stepped, logs = _phase_update(accelerator, "generator", "gen", [state.student], state.g_opt, state.g_sched,
                                  list(state.student.parameters()), cfg.generator_optim.grad_clip, state.guard,
                                  functools.partial(step_fn, with_diagnostics=do_log), micro)
    if stepped:
        state.update_ema()
    main_process = accelerator.is_main_process
    if reference is not None and main_process:
        samples = torch.cat([mb.sample for mb in micro])
        logs.update(drift_check(output_drift(samples, reference["mean"], reference["std"],
                                             reference.get("image_var")), accelerator.print))
    if cfg.debug_grid_every and main_process and step % cfg.debug_grid_every == 0 and micro[0].debug:
        _debug_grid(task, micro[0].debug, run_dir / "debug" / f"step_{step:07d}.png")
    return logs


def _critic_phase(accelerator, cfg: DistillConfig, state: TrainingState, method: DMD2, micro: list[MicroBatch],
                  critic_params: list) -> dict[str, float]:
    """The critic's update (the method's ``critic_step``: fake score [and GAN head]), then the fake score's
    tracking of the student. Nothing for a run without a critic (Decoupled DMD with the meanvar regulariser)."""
    if not state.critic_networks:
        return {}
    for net in state.critic_networks:
        net.train()
    stepped, logs = _phase_update(accelerator, "critic", "critic", state.critic_networks, state.f_opt,
                                  state.f_sched, critic_params, cfg.fake_optim.grad_clip, state.guard,
                                  method.critic_step, micro)
    if stepped:
        state.track_student()
    return logs


def _meanvar_target(cfg: DistillConfig, reference: dict[str, torch.Tensor] | None):
    """``method.meanvar_target`` (one value for every channel), or the teacher samples' per-image, per-channel
    statistics; None: neither (``DecoupledDMD`` then names the keys that provide them)."""
    target = cfg.method.meanvar_target
    if target is not None:
        return torch.tensor([float(target[0])]), torch.tensor([float(target[1])])
    if reference is not None and "image_var" in reference:
        return reference["mean"], reference["image_var"]
    return None


def _teacher_reference(cfg: DistillConfig, task: DistillTask, accelerator, run_dir: Path
                       ) -> dict[str, torch.Tensor] | None:
    """The teacher samples' statistics (``task.reference``): on the main process (the drift logs), and on every
    process when the meanvar regulariser takes its target from them (read from the main process's cache)."""
    reference = task.reference(run_dir) if accelerator.is_main_process else None
    if cfg.method.regularizer == "meanvar" and cfg.method.meanvar_target is None:
        accelerator.wait_for_everyone()  # the main process has measured and cached it by now
        reference = reference if accelerator.is_main_process else task.reference(run_dir)
    return reference


def _build_method(cfg: DistillConfig, task: DistillTask, state: TrainingState, run_dir: Path,
                  reference: dict[str, torch.Tensor] | None) -> DMD2:
    """The objective (``method.objective``: DMD2 or Decoupled DMD) over the prepared networks, with the regression
    pairs / LPIPS / target statistics it may need. ``reference``: the teacher samples' statistics, if any."""
    path, null = task.teacher.path, task.teacher.null_cond
    m = cfg.method
    regression = None
    if m.needs_regression_pairs:
        regression = task.regression_pairs(Path(m.regression_cache or run_dir), m.regression_pairs,
                                           m.regression_steps)
    fake = Denoiser(state.fake, path, null) if state.fake is not None else None
    common = dict(shift=task.shift, gan_head=state.gan_head, regression=regression, lpips_fn=_lpips_fn(cfg))
    student = Denoiser(state.student, path, null)
    if m.objective == "dmd2":
        return DMD2(m, student, fake, task.teacher, task.student_times, **common)
    target = _meanvar_target(cfg, reference) if m.regularizer == "meanvar" else None
    return DecoupledDMD(m, student, fake, task.teacher, task.student_times, meanvar_target=target, **common)


def compile_networks(mode: str, accelerator, state: TrainingState, task: DistillTask) -> None:
    """``run.compile``: the forwards of the student, the fake score and the teacher, in place (the prepared
    wrappers, the state dicts and the EMA are untouched; see ``training.compile``)."""
    for name, net in (("the student", state.student), ("the fake score", state.fake),
                      ("the teacher", task.teacher.net)):
        if net is not None:  # no fake score for Decoupled DMD with method.regularizer=meanvar | gan
            compile_forward(accelerator.unwrap_model(net), mode, name)


def run(cfg: DistillConfig) -> Path:
    """Distil ``cfg.networks.teacher`` into a student; resumes from the run folder's latest checkpoint.
    Returns the export folder."""
    run_dir = Path(cfg.run.out_dir)
    ckpt = Checkpointer(run_dir, keep=cfg.run.keep_checkpoints)
    resume_from = ckpt.latest() if cfg.run.resume else None
    if resume_from is not None:
        check_resume_config(DistillConfig, cfg, run_dir,
                            resumable_changes(RESUMABLE_CHANGES, cfg.generator_optim, cfg.fake_optim))
    accelerator = make_accelerator(cfg.run, "distill")
    check_distribution(accelerator, "distill")
    strategy = make_strategy(accelerator)
    main_process = accelerator.is_main_process
    if main_process:
        save_config(cfg, run_dir)
        print(to_yaml(cfg))

    torch.manual_seed(derive_seed(cfg.run.seed, "init"))  # new parameters (GAN head, LoRA) depend on run.seed only
    task = build_task(cfg, accelerator.device)
    state = TrainingState.build(cfg, task, strategy)
    if resume_from is not None:
        state.load_state_dict(strategy.load(resume_from), source=resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    state.prepare()
    compile_networks(cfg.run.compile, accelerator, state, task)
    start = state.step
    reference = _teacher_reference(cfg, task, accelerator, run_dir)
    method = _build_method(cfg, task, state, run_dir, reference)
    drift_check = VarianceDriftCheck(cfg.variance_drift_factor)
    if main_process:
        accelerator.init_trackers("distill")
    # A plain student to gather sharded (FSDP) weights into for grids and export.
    fresh_student = functools.partial(task.build_network, cfg.networks.student_routing, False)

    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="distill",
               disable=not (cfg.run.progress and main_process))
    # Each phase's logs of its latest update, replaced as a whole: a logged row (every run.log_every iterations,
    # and an iteration without a generator update under method.ttur > 1) holds each phase's latest update, never
    # keys left over from an older one (a timestep bucket of dm_grad/* that this update's batch did not hit),
    # which a resumed run could not reproduce.
    phase_logs: dict[str, dict[str, float]] = {}
    critic_params = [p for grp in state.f_opt.param_groups for p in grp["params"]] if state.f_opt else []
    for step in bar:
        micro = _micro_batches(cfg, task, step, accelerator, method.needs_real)
        do_log = (step + 1) % cfg.run.log_every == 0
        # The warm start: a regression update at every iteration and no critic; then DMD with TTUR.
        warm_start = step < cfg.method.warm_start_steps
        if warm_start or step % cfg.method.ttur == 0:
            phase_logs["generator"] = _generator_phase(accelerator, cfg, task, state, method, micro, step, do_log,
                                                       reference, drift_check, run_dir, warm_start)
        if not warm_start:
            phase_logs["critic"] = _critic_phase(accelerator, cfg, state, method, micro, critic_params)
        state.step = done = step + 1
        if do_log:
            row = {k: v for phase in ("generator", "critic") for k, v in phase_logs.get(phase, {}).items()}
            row["health/bad_steps_total"] = float(state.guard.total)
            _log(accelerator, bar, run_dir, done, row)
        if cfg.run.sample_every and done % cfg.run.sample_every == 0:
            net = state.sampling_net(fresh_student)
            if main_process:
                _sample_grid(task, net, run_dir / "samples" / f"step_{done:07d}.png")
        if cfg.run.ckpt_every and done % cfg.run.ckpt_every == 0:
            strategy.save(ckpt, state.state_dict())
    accelerator.wait_for_everyone()
    identical = strategy.replicas_identical(state.student)
    net = state.sampling_net(fresh_student)
    if cfg.run.steps > start and (not cfg.run.ckpt_every or cfg.run.steps % cfg.run.ckpt_every):
        strategy.save(ckpt, state.state_dict())
    export = run_dir / "export"
    if main_process:
        _export(accelerator, cfg, task, state, net, identical, export)
    accelerator.end_training()
    return export


def _log(accelerator, bar, run_dir: Path, done: int, logs: dict[str, float]) -> None:
    """Send the latest logs to the trackers, the progress bar and (main process) ``metrics.jsonl``."""
    accelerator.log(logs, step=done)
    bar.set_postfix({k: f"{logs[k]:.3g}" for k in ("gen/dm_loss", "gen/proxy_loss", "critic/fake_loss")
                     if k in logs})
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": done, **logs}) + "\n")


def _export(accelerator, cfg: DistillConfig, task: DistillTask, state: TrainingState, net,
            identical: bool | None, export: Path) -> None:
    """The exported student, its sample grid and the run's ``summary.json`` beside it (main process)."""
    task.export(net, export)
    _sample_grid(task, net, export / "samples_grid.png")
    summary = {"steps": cfg.run.steps, "bad_steps_total": state.guard.total,
               "student_timesteps": task.student_times, "num_processes": accelerator.num_processes,
               "sharded": state.strategy.sharded, "replicas_identical": identical, "teacher": state.teacher}
    (export.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    if identical is False:
        accelerator.print("warning: the generator replicas differ across processes (see summary.json)")
    accelerator.print(f"student exported to {export}")


@torch.no_grad()
def _sample_grid(task: DistillTask, model, path: Path, per_cond: int = 8) -> None:
    training = model.training
    model.eval()
    cond, seeds = task.grid_batch(per_cond)
    save_grid(task.decode(task.sample(model, cond, seeds)), path, nrow=per_cond)
    model.train(training)  # the raw student (ema_decay=0) goes on training


def _debug_grid(task: DistillTask, debug: dict[str, torch.Tensor], path: Path, n: int = 8) -> None:
    """Rows: generator output, real-score x0, fake-score x0 (same x_t) — what users look at to debug collapse.
    (Without a fake score, Decoupled DMD has no third row.)"""
    rows = [task.decode(debug[k][:n]).float().clamp(-1, 1).cpu() for k in ("generator", "real_x0", "fake_x0")
            if k in debug]
    save_grid(torch.cat(rows), path, nrow=rows[0].shape[0])

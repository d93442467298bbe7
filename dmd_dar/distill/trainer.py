"""``dmd-dar distill``: the DMD2 training loop (plumbing only; the maths is in ``method.py`` and ``losses.py``).

Each iteration: a generator update every ``method.ttur``-th iteration, a fake-score (critic) update every
iteration; each update accumulates ``run.grad_accum`` micro-batches of ``run.batch_size`` (``accumulated_update``).
Everything random in iteration s derives from (seed, s, micro-batch, rank), so resume is exact.
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
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.gan import GANHead
from dmd_dar.distill.health import BadStepGuard, output_drift
from dmd_dar.distill.method import DMD2, frozen
from dmd_dar.distill.task import Batch, DistillTask, NativeTask
from dmd_dar.errors import UserError
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint, load_process_state
from dmd_dar.training.ema import EMA
from dmd_dar.training.optim import build_optimizer, lr_schedule, resumable_changes
from dmd_dar.training.run import make_accelerator
from dmd_dar.training.seeding import derive_seed, seed_step
from dmd_dar.training.sharding import ShardedEMA, check_distribution, clip_grad_norm, forward_module, is_fsdp

RESUMABLE_CHANGES = ("run.steps", "run.log_every", "run.sample_every", "run.ckpt_every", "run.keep_checkpoints",
                     "run.progress", "run.log_with", "run.resume", "debug_grid_every")


def build_task(cfg: DistillConfig, device) -> DistillTask:
    """The teacher family named by ``networks.teacher_kind``."""
    if cfg.networks.teacher_kind == "native":
        return NativeTask(cfg.networks.teacher, cfg.method.student_steps, cfg.data, device)
    # lazy: dmd_dar.t2i.task imports diffusers (seconds) through backbones; native teachers never need it
    from dmd_dar.t2i.task import DiffusersT2ITask

    return DiffusersT2ITask(cfg, device)


def _lpips_fn(cfg: DistillConfig):
    if cfg.method.regression_weight <= 0 or cfg.method.regression_loss != "lpips":
        return None
    from dmd_dar.metrics.availability import MetricUnavailable
    from dmd_dar.metrics.lpips_metric import LpipsModel

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


def _micro_batches(cfg: DistillConfig, task: DistillTask, step: int, rank: int, device, need_real: bool
                   ) -> list[tuple[torch.Generator, torch.Generator, Batch]]:
    """(generator, shared generator, batch) of each micro-batch of iteration ``step``.

    Micro-batch 0 draws exactly what an iteration without accumulation draws; micro-batch m > 0 has its own seeds.
    """
    out = []
    for m in range(cfg.run.grad_accum):
        if m == 0:
            gen = seed_step(cfg.run.seed, step, rank)
            shared = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shared", step))
        else:
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "train", step, rank, "micro", m))
            shared = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shared", step, "micro", m))
        out.append((gen, shared, task.draw(cfg.run.batch_size, gen, device, need_real)))
    return out


def run(cfg: DistillConfig) -> Path:
    run_dir = Path(cfg.run.out_dir)
    ckpt = Checkpointer(run_dir, keep=cfg.run.keep_checkpoints)
    resume_from = ckpt.latest() if cfg.run.resume else None
    if resume_from is not None:
        check_resume_config(DistillConfig, cfg, run_dir,
                            resumable_changes(RESUMABLE_CHANGES, cfg.generator_optim, cfg.fake_optim))
    accelerator = make_accelerator(cfg.run, "distill")
    device = accelerator.device
    check_distribution(accelerator, "distill")
    fsdp = is_fsdp(accelerator)  # sharded networks: see training/sharding.py for what that changes below
    if accelerator.is_main_process:
        save_config(cfg, run_dir)
        print(to_yaml(cfg))

    torch.manual_seed(derive_seed(cfg.run.seed, "init"))  # new parameters (GAN head, LoRA) depend on run.seed only
    task = build_task(cfg, device)
    path, null = task.teacher.path, task.teacher.null_cond
    student = task.build_network(cfg.networks.student_routing, cfg.networks.gradient_checkpointing)
    fake = task.build_network(cfg.networks.fake_routing, cfg.networks.gradient_checkpointing)
    gan_head = GANHead(task.feature_dim) if cfg.method.gan_weight > 0 else None

    g_opt = build_optimizer(task.param_groups(student, cfg.generator_optim.lr, cfg.generator_optim.routing_lr,
                                              cfg.generator_optim.weight_decay), cfg.generator_optim)
    f_groups = task.param_groups(fake, cfg.fake_optim.lr, cfg.fake_optim.routing_lr, cfg.fake_optim.weight_decay)
    if gan_head is not None:
        f_groups.append({"params": list(gan_head.parameters()), "lr": cfg.fake_optim.lr, "weight_decay": 0.0})
    f_opt = build_optimizer(f_groups, cfg.fake_optim)
    g_updates = math.ceil(cfg.generator_optim.horizon(cfg.run.steps) / cfg.method.ttur)  # its own update count
    g_sched = lr_schedule(g_opt, cfg.generator_optim, g_updates)
    f_sched = lr_schedule(f_opt, cfg.fake_optim, cfg.fake_optim.horizon(cfg.run.steps))
    # None: grids and export use the raw student. Under FSDP the EMA averages each process's shard (made below).
    ema = EMA(student, cfg.ema_decay) if cfg.ema_decay > 0 and not fsdp else None
    guard = BadStepGuard(cfg.max_bad_steps)
    start = 0
    if resume_from is not None:
        nets, opts, state = load_checkpoint(resume_from)
        if state.get("sharded", False) != fsdp:
            raise UserError(f"{resume_from} was written by {'an FSDP' if state.get('sharded') else 'a non-FSDP'} run "
                            f"and this run is {'FSDP' if fsdp else 'not FSDP'}: resume with the launch that wrote it "
                            f"(or start a new run from its export)")
        teacher_now = task.teacher_identity()
        if state.get("teacher") is not None and teacher_now is not None and state["teacher"] != teacher_now:
            raise UserError(f"{resume_from} was trained against other teacher weights than {cfg.networks.teacher} "
                            f"holds now (sha256 {state['teacher'][:12]}... vs {teacher_now[:12]}...): start a new "
                            f"run in another folder (run.out_dir=<new folder>) or delete {run_dir}")
        try:
            student.load_state_dict(nets["generator"])
            fake.load_state_dict(nets["fake_score"])
        except RuntimeError as err:  # e.g. a checkpoint of an older teacher architecture
            first = str(err).strip().splitlines()
            raise UserError(f"{resume_from} does not fit the networks this config builds "
                            f"({' '.join(first[:2])[:300]}): the teacher or the architecture changed since it was "
                            f"written; start a new run in another folder (run.out_dir=<new folder>) or delete "
                            f"{run_dir}") from None
        if gan_head is not None:
            gan_head.load_state_dict(nets["gan_head"])
        if ema is not None:
            ema.load_state_dict(nets["generator_ema"], state["ema_updates"])
        restored = ((g_sched, "generator_sched"), (f_sched, "fake_sched"))
        if not fsdp:  # FSDP: each process's optimizer pieces are restored after prepare (below)
            restored += ((g_opt, "generator"), (f_opt, "fake"))
        for obj, key in restored:
            obj.load_state_dict(opts[key])
        start = state["step"]
        guard.total = state.get("bad_steps_total", 0)
        accelerator.print(f"resumed from {resume_from} at step {start}")

    prepared = accelerator.prepare(student, fake, g_opt, f_opt, *([gan_head] if gan_head is not None else []))
    student, fake, g_opt, f_opt = prepared[:4]
    gan_head = prepared[4] if gan_head is not None else None
    if ema is not None:
        ema.model.to(device)
    if fsdp:
        ema = ShardedEMA(student, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if resume_from is not None:
            own = load_process_state(resume_from, accelerator.process_index, accelerator.num_processes)
            g_opt.load_state_dict(own["generator"])
            f_opt.load_state_dict(own["fake"])
            if ema is not None:
                ema.load_state_dict(own["ema"], state["ema_updates"])
    unwrap = accelerator.unwrap_model
    regression = (task.regression_pairs(Path(cfg.method.regression_cache or run_dir), cfg.method.regression_pairs,
                                        cfg.method.regression_steps)
                  if cfg.method.regression_weight > 0 else None)
    method = DMD2(cfg.method, Denoiser(student, path, null), Denoiser(fake, path, null), task.teacher,
                  task.student_times, shift=task.shift, gan_head=gan_head, regression=regression,
                  lpips_fn=_lpips_fn(cfg))
    reference = task.reference(run_dir) if accelerator.is_main_process else None
    needs_real = cfg.method.gan_weight > 0 or (cfg.method.student_steps > 1 and not cfg.method.backward_simulation)
    if accelerator.is_main_process:
        accelerator.init_trackers("distill")

    def save(step: int) -> None:
        """Every process calls it: gathering sharded weights is a collective. The main process writes the
        checkpoint; under FSDP each process first stages its own optimizer and EMA pieces into it."""
        nets = {"generator": accelerator.get_state_dict(student), "fake_score": accelerator.get_state_dict(fake)}
        if gan_head is not None:
            nets["gan_head"] = accelerator.get_state_dict(gan_head)
        opts = {"generator_sched": g_sched.state_dict(), "fake_sched": f_sched.state_dict()}
        if fsdp:
            ckpt.stage_process_state(step, accelerator.process_index, {
                "generator": g_opt.state_dict(), "fake": f_opt.state_dict(),
                "ema": ema.state_dict() if ema is not None else {}})
            accelerator.wait_for_everyone()
        else:
            opts.update(generator=g_opt.state_dict(), fake=f_opt.state_dict())
            if ema is not None:
                nets["generator_ema"] = ema.state_dict()
        if accelerator.is_main_process:
            ckpt.save(step, nets, opts, {"ema_updates": ema.num_updates if ema is not None else 0,
                                         "bad_steps_total": guard.total, "num_processes": accelerator.num_processes,
                                         "sharded": fsdp, "teacher": task.teacher_identity()})
        accelerator.wait_for_everyone()

    def sampling_net():
        """The EMA, or the raw student (ema_decay=0), for grids and export. Every process calls it: under FSDP it
        gathers the full weights (a collective) into a plain copy on the main process; None elsewhere."""
        if not fsdp:
            return ema.model if ema is not None else unwrap(student)
        with ema.swapped_into(student) if ema is not None else contextlib.nullcontext():
            state = accelerator.get_state_dict(student)
        if not accelerator.is_main_process:
            return None
        net = task.build_network(cfg.networks.student_routing, False)
        net.load_state_dict(state)
        return net.to(device)

    def generator_loss(micro, x_fake, debug, do_log, m):
        gen, shared, b = micro[m]
        with accelerator.autocast():
            x_in, t_in = method.generator_input(b.noise, b.cond, gen, shared, b.real)
            x = method.generate(x_in, t_in, b.cond)
            loss, logs, micro_debug = method.generator_step(x, b.cond, gen, with_diagnostics=do_log)
        x_fake[m] = x.detach()
        if m == 0:
            debug.update(micro_debug)
        return loss, logs

    def critic_loss(micro, x_fake, m):
        gen, shared, b = micro[m]
        if x_fake[m] is None:  # no generator update this iteration: the current student's samples, no graph
            with torch.no_grad(), accelerator.autocast():
                x_in, t_in = method.generator_input(b.noise, b.cond, gen, shared, b.real)
                x_fake[m] = Denoiser(forward_module(student), path, null).x0(x_in, t_in, b.cond).to(b.noise.dtype)
        with accelerator.autocast(), frozen(forward_module(student)):
            return method.critic_step(x_fake[m], b.cond, gen, b.real, b.real_cond)

    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="distill",
               disable=not (cfg.run.progress and accelerator.is_main_process))
    last_logs: dict[str, float] = {}
    critic_models = [fake, *([gan_head] if gan_head is not None else [])]
    critic_params = [p for grp in f_opt.param_groups for p in grp["params"]]
    for step in bar:
        micro = _micro_batches(cfg, task, step, accelerator.process_index, device, needs_real)
        logs: dict[str, float] = {}
        do_log = (step + 1) % cfg.run.log_every == 0
        x_fake: list[torch.Tensor | None] = [None] * len(micro)
        if step % cfg.method.ttur == 0:
            student.train()
            debug: dict[str, torch.Tensor] = {}
            stepped, norm, g_logs = accumulated_update(
                accelerator, [student], g_opt, list(student.parameters()), cfg.generator_optim.grad_clip, guard,
                "generator", functools.partial(generator_loss, micro, x_fake, debug, do_log))
            logs.update(g_logs)
            logs["health/skipped_generator_step"] = 0.0 if stepped else 1.0
            if stepped:
                if cfg.generator_optim.grad_clip > 0 and norm is not None:
                    logs["gen/grad_norm"] = norm
                if ema is not None:
                    ema.update(student if fsdp else unwrap(student))
            g_sched.step()
            if reference is not None:
                logs.update(output_drift(torch.cat(x_fake), reference["mean"], reference["std"]))
            if cfg.debug_grid_every and accelerator.is_main_process and step % cfg.debug_grid_every == 0:
                _debug_grid(task, debug, run_dir / "debug" / f"step_{step:07d}.png")
        fake.train()
        stepped, norm, c_logs = accumulated_update(accelerator, critic_models, f_opt, critic_params,
                                                   cfg.fake_optim.grad_clip, guard, "critic",
                                                   functools.partial(critic_loss, micro, x_fake))
        logs.update(c_logs)
        logs["health/skipped_critic_step"] = 0.0 if stepped else 1.0
        if stepped and cfg.fake_optim.grad_clip > 0 and norm is not None:
            logs["critic/grad_norm"] = norm
        f_sched.step()
        last_logs.update(logs)
        done = step + 1
        if do_log:
            last_logs["health/bad_steps_total"] = float(guard.total)
            accelerator.log(last_logs, step=done)
            bar.set_postfix({k: f"{last_logs[k]:.3g}" for k in ("gen/dm_loss", "critic/fake_loss") if k in last_logs})
            if accelerator.is_main_process:
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": done, **last_logs}) + "\n")
        if cfg.run.sample_every and done % cfg.run.sample_every == 0:
            net = sampling_net()
            if accelerator.is_main_process:
                _sample_grid(task, net, run_dir / "samples" / f"step_{done:07d}.png")
        if cfg.run.ckpt_every and done % cfg.run.ckpt_every == 0:
            save(done)
    accelerator.wait_for_everyone()
    identical = None if fsdp else replicas_identical(accelerator, student)  # FSDP: no replicas, one sharded copy
    export = run_dir / "export"
    net = sampling_net()
    if cfg.run.steps > start and (not cfg.run.ckpt_every or cfg.run.steps % cfg.run.ckpt_every):
        save(cfg.run.steps)
    if accelerator.is_main_process:
        task.export(net, export)
        _sample_grid(task, net, export / "samples_grid.png")
        summary = {"steps": cfg.run.steps, "bad_steps_total": guard.total, "student_timesteps": task.student_times,
                   "num_processes": accelerator.num_processes, "sharded": fsdp, "replicas_identical": identical,
                   "teacher": task.teacher_identity()}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if identical is False:
            accelerator.print("warning: the generator replicas differ across processes (see summary.json)")
        accelerator.print(f"student exported to {export}")
    accelerator.end_training()
    return export


@torch.no_grad()
def replicas_identical(accelerator, model) -> bool:
    """Whether every process holds bit-identical generator weights (DDP keeps them so; drift means a bug)."""
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


@torch.no_grad()
def _sample_grid(task: DistillTask, model, path: Path, per_cond: int = 8) -> None:
    from dmd_dar.data.manifest import save_grid

    training = model.training
    model.eval()
    cond, seeds = task.grid_batch(per_cond)
    save_grid(task.decode(task.sample(model, cond, seeds)), path, nrow=per_cond)
    model.train(training)  # the raw student (ema_decay=0) goes on training


def _debug_grid(task: DistillTask, debug: dict[str, torch.Tensor], path: Path, n: int = 8) -> None:
    """Rows: generator output, real-score x0, fake-score x0 (same x_t) — what users look at to debug collapse."""
    from dmd_dar.data.manifest import save_grid

    rows = [task.decode(debug[k][:n]).float().clamp(-1, 1).cpu() for k in ("generator", "real_x0", "fake_x0")]
    save_grid(torch.cat(rows), path, nrow=rows[0].shape[0])

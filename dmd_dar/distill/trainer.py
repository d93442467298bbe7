"""``dmd-dar distill``: the DMD2 training loop (plumbing only; the maths is in ``method.py`` and ``losses.py``).

Each iteration: a generator update every ``method.ttur``-th iteration, a fake-score (critic) update every
iteration. Everything random in iteration s derives from (seed, s, rank), so resume is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmd_dar.config import check_resume_config, save_config, to_yaml
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.gan import GANHead
from dmd_dar.distill.health import BadStepGuard, output_drift
from dmd_dar.distill.method import DMD2, frozen
from dmd_dar.distill.task import DistillTask, NativeTask
from dmd_dar.errors import UserError
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint
from dmd_dar.training.ema import EMA
from dmd_dar.training.optim import build_optimizer, warmup_schedule
from dmd_dar.training.run import make_accelerator
from dmd_dar.training.seeding import derive_seed, seed_step

RESUMABLE_CHANGES = ("run.steps", "run.log_every", "run.sample_every", "run.ckpt_every", "run.keep_checkpoints",
                     "run.progress", "run.log_with", "run.resume", "debug_grid_every")


def build_task(cfg: DistillConfig, device) -> DistillTask:
    """The teacher family named by ``networks.teacher_kind``."""
    if cfg.networks.teacher_kind == "native":
        return NativeTask(cfg.networks.teacher, cfg.method.student_steps, cfg.data, device)
    from dmd_dar.distill.t2i import DiffusersT2ITask

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


def run(cfg: DistillConfig) -> Path:
    run_dir = Path(cfg.run.out_dir)
    ckpt = Checkpointer(run_dir, keep=cfg.run.keep_checkpoints)
    resume_from = ckpt.latest() if cfg.run.resume else None
    if resume_from is not None:
        check_resume_config(DistillConfig, cfg, run_dir, RESUMABLE_CHANGES)
    accelerator = make_accelerator(cfg.run, "distill")
    device = accelerator.device
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
    g_sched, f_sched = (warmup_schedule(g_opt, cfg.generator_optim.warmup_steps),
                        warmup_schedule(f_opt, cfg.fake_optim.warmup_steps))
    ema = EMA(student, cfg.ema_decay)
    guard = BadStepGuard(cfg.max_bad_steps)
    start = 0
    if resume_from is not None:
        nets, opts, state = load_checkpoint(resume_from)
        student.load_state_dict(nets["generator"])
        fake.load_state_dict(nets["fake_score"])
        if gan_head is not None:
            gan_head.load_state_dict(nets["gan_head"])
        ema.load_state_dict(nets["generator_ema"], state["ema_updates"])
        for obj, key in ((g_opt, "generator"), (f_opt, "fake"), (g_sched, "generator_sched"), (f_sched, "fake_sched")):
            obj.load_state_dict(opts[key])
        start = state["step"]
        accelerator.print(f"resumed from {resume_from} at step {start}")

    prepared = accelerator.prepare(student, fake, g_opt, f_opt, *([gan_head] if gan_head is not None else []))
    student, fake, g_opt, f_opt = prepared[:4]
    gan_head = prepared[4] if gan_head is not None else None
    ema.model.to(device)
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
        if not accelerator.is_main_process:
            return
        nets = {"generator": accelerator.get_state_dict(student), "fake_score": accelerator.get_state_dict(fake),
                "generator_ema": ema.state_dict()}
        if gan_head is not None:
            nets["gan_head"] = accelerator.get_state_dict(gan_head)
        ckpt.save(step, nets, {"generator": g_opt.state_dict(), "fake": f_opt.state_dict(),
                               "generator_sched": g_sched.state_dict(), "fake_sched": f_sched.state_dict()},
                  {"ema_updates": ema.num_updates, "bad_steps_total": guard.total})

    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="distill",
               disable=not (cfg.run.progress and accelerator.is_main_process))
    last_logs: dict[str, float] = {}
    for step in bar:
        gen = seed_step(cfg.run.seed, step, accelerator.process_index)
        shared = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shared", step))
        batch = task.draw(cfg.run.batch_size, gen, device, needs_real)
        noise, labels, real, real_labels = batch.noise, batch.cond, batch.real, batch.real_cond
        logs: dict[str, float] = {}
        do_log = (step + 1) % cfg.run.log_every == 0
        x_fake = None
        if step % cfg.method.ttur == 0:
            student.train()
            with accelerator.autocast():
                x_in, t_in = method.generator_input(noise, labels, gen, shared, real)
                x = method.generate(x_in, t_in, labels)
                loss, g_logs, debug = method.generator_step(x, labels, gen, with_diagnostics=do_log)
            logs.update(g_logs)
            if guard.check(loss):
                accelerator.backward(loss)
                if cfg.generator_optim.grad_clip > 0:
                    logs["gen/grad_norm"] = float(accelerator.clip_grad_norm_(student.parameters(),
                                                                              cfg.generator_optim.grad_clip))
                g_opt.step()
                ema.update(unwrap(student))
            else:
                logs["health/skipped_generator_step"] = 1.0
            g_opt.zero_grad(set_to_none=True)
            g_sched.step()
            x_fake = x.detach()
            if reference is not None:
                logs.update(output_drift(x_fake, reference["mean"], reference["std"]))
            if cfg.debug_grid_every and accelerator.is_main_process and step % cfg.debug_grid_every == 0:
                _debug_grid(task, debug, run_dir / "debug" / f"step_{step:07d}.png")
        if x_fake is None:
            with torch.no_grad(), accelerator.autocast():
                inner = Denoiser(unwrap(student), path, null)
                x_in, t_in = method.generator_input(noise, labels, gen, shared, real)
                x_fake = inner.x0(x_in, t_in, labels).to(noise.dtype)
        fake.train()
        with accelerator.autocast(), frozen(unwrap(student)):
            c_loss, c_logs = method.critic_step(x_fake, labels, gen, real, real_labels)
        logs.update(c_logs)
        if guard.check(c_loss):
            accelerator.backward(c_loss)
            if cfg.fake_optim.grad_clip > 0:
                logs["critic/grad_norm"] = float(accelerator.clip_grad_norm_(
                    [p for grp in f_opt.param_groups for p in grp["params"]], cfg.fake_optim.grad_clip))
            f_opt.step()
        else:
            logs["health/skipped_critic_step"] = 1.0
        f_opt.zero_grad(set_to_none=True)
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
        if cfg.run.sample_every and done % cfg.run.sample_every == 0 and accelerator.is_main_process:
            _sample_grid(task, ema.model, run_dir / "samples" / f"step_{done:07d}.png")
        if cfg.run.ckpt_every and done % cfg.run.ckpt_every == 0:
            save(done)
    accelerator.wait_for_everyone()
    identical = replicas_identical(accelerator, student)
    export = run_dir / "export"
    if accelerator.is_main_process:
        if cfg.run.steps > start and (not cfg.run.ckpt_every or cfg.run.steps % cfg.run.ckpt_every):
            save(cfg.run.steps)
        task.export(ema.model, export)
        _sample_grid(task, ema.model, export / "samples_grid.png")
        summary = {"steps": cfg.run.steps, "bad_steps_total": guard.total, "student_timesteps": task.student_times,
                   "num_processes": accelerator.num_processes, "replicas_identical": identical}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if not identical:
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

    model.eval()
    cond, seeds = task.grid_batch(per_cond)
    save_grid(task.decode(task.sample(model, cond, seeds)), path, nrow=per_cond)


def _debug_grid(task: DistillTask, debug: dict[str, torch.Tensor], path: Path, n: int = 8) -> None:
    """Rows: generator output, real-score x0, fake-score x0 (same x_t) — what users look at to debug collapse."""
    from dmd_dar.data.manifest import save_grid

    rows = [task.decode(debug[k][:n]).float().clamp(-1, 1).cpu() for k in ("generator", "real_x0", "fake_x0")]
    save_grid(torch.cat(rows), path, nrow=rows[0].shape[0])

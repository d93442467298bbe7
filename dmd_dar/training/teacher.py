"""``dmd-dar train-teacher``: pretrain a diffusion transformer (the embedded default: on procedural images).

The loop holds only plumbing; the objective is ``dmd_dar.diffusion.objective.denoising_loss``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmd_dar.artifact import (
    ArtifactMeta,
    DiffusionConfig,
    generate,
    load_artifact,
    resolve_checkpoint,
    save_artifact,
)
from dmd_dar.config import check_resume_config, diff_configs, save_config, to_yaml
from dmd_dar.data.manifest import save_grid
from dmd_dar.diffusion.objective import denoising_loss
from dmd_dar.diffusion.timesteps import sample_timesteps
from dmd_dar.errors import UserError
from dmd_dar.models import ModelConfig, build_model, param_groups
from dmd_dar.training.batches import DataConfig, make_dataset, step_batches
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint
from dmd_dar.training.compile import compile_forward
from dmd_dar.training.ema import EMA
from dmd_dar.training.optim import OptimConfig, build_optimizer, lr_schedule, resumable_changes
from dmd_dar.training.run import RunConfig, make_accelerator
from dmd_dar.training.seeding import derive_seed, seed_step
from dmd_dar.training.sharding import check_distribution

# Keys that may change between a run and its resume (how long / how often, not what is trained).
RESUMABLE_CHANGES = ("run.steps", "run.log_every", "run.sample_every", "run.ckpt_every", "run.keep_checkpoints",
                     "run.progress", "run.log_with", "run.resume", "run.num_workers", "run.compile")


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=200))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/teacher", steps=4000, batch_size=128))
    ema_decay: float = 0.999
    init_from: str | None = None  # an exported teacher to fine-tune (same model.* and noise path); a resumed run
    #                               continues from its checkpoint instead

    def __post_init__(self) -> None:
        if self.data.image_size != self.model.image_size:
            raise UserError(f"data.image_size={self.data.image_size} but model.image_size={self.model.image_size}; "
                            f"set both to the same value")


def run(cfg: TeacherConfig) -> Path:
    run_dir = Path(cfg.run.out_dir)
    ckpt = Checkpointer(run_dir, keep=cfg.run.keep_checkpoints)
    resume_from = ckpt.latest() if cfg.run.resume else None
    if resume_from is not None:
        check_resume_config(TeacherConfig, cfg, run_dir, resumable_changes(RESUMABLE_CHANGES, cfg.optim))
    accelerator = make_accelerator(cfg.run, "train-teacher")
    check_distribution(accelerator, "train-teacher", fsdp_supported=False)
    if accelerator.is_main_process:
        save_config(cfg, run_dir)
        print(to_yaml(cfg))

    dataset = make_dataset(cfg.data)
    class_names = list(getattr(dataset, "class_names", []))
    if cfg.model.num_classes and class_names and cfg.model.num_classes != len(class_names):
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the dataset has {len(class_names)} classes "
                        f"({', '.join(class_names)}); set model.num_classes={len(class_names)}")
    path = cfg.diffusion.make_path()
    torch.manual_seed(derive_seed(cfg.run.seed, "init"))  # the initial weights are a function of run.seed
    model = build_model(cfg.model)
    if cfg.init_from and resume_from is None:
        accelerator.print(f"initial weights from {load_initial_weights(model, cfg)}")
    optimizer = build_optimizer(param_groups(model, cfg.optim.lr, cfg.optim.routing_lr, cfg.optim.weight_decay),
                                cfg.optim)
    scheduler = lr_schedule(optimizer, cfg.optim, cfg.optim.horizon(cfg.run.steps))
    ema = EMA(model, cfg.ema_decay)
    start = 0
    if resume_from is not None:
        nets, opts, state = load_checkpoint(resume_from)
        model.load_state_dict(nets["model"])
        ema.load_state_dict(nets["ema"], state["ema_updates"])
        optimizer.load_state_dict(opts["optimizer"])
        scheduler.load_state_dict(opts["scheduler"])
        start = state["step"]
        accelerator.print(f"resumed from {resume_from} at step {start}")
    model, optimizer = accelerator.prepare(model, optimizer)
    compile_forward(accelerator.unwrap_model(model), cfg.run.compile, "the teacher")  # in place: same state dict
    ema.model.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers("train-teacher")

    def save(step: int) -> None:
        if not accelerator.is_main_process:
            return
        ckpt.save(step, {"model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict()},
                  {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                  {"ema_updates": ema.num_updates})

    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="train-teacher",
               disable=not (cfg.run.progress and accelerator.is_main_process))
    batches = step_batches(dataset, cfg.run.batch_size, cfg.run.seed, accelerator.process_index, start,
                           cfg.run.steps, cfg.run.num_workers)
    for step in bar:
        gen = seed_step(cfg.run.seed, step, accelerator.process_index)
        x0, labels = next(batches)
        x0, labels = x0.to(accelerator.device), labels.to(accelerator.device)
        eps = torch.randn(x0.shape, generator=gen).to(accelerator.device)
        t = sample_timesteps(x0.shape[0], cfg.diffusion.train_timesteps, mean=cfg.diffusion.logit_mean,
                             std=cfg.diffusion.logit_std, generator=gen).to(accelerator.device)
        model.train()
        with accelerator.accumulate(model), accelerator.autocast():
            loss = denoising_loss(lambda x, tt, y=labels: model(x, tt, y), path, x0, eps, t)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"non-finite teacher loss at step {step}; lower optim.lr or check the data")
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(model))
        done = step + 1
        if done % cfg.run.log_every == 0:
            logs = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            accelerator.log(logs, step=done)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if accelerator.is_main_process:
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": done, **logs}) + "\n")
        if cfg.run.sample_every and done % cfg.run.sample_every == 0 and accelerator.is_main_process:
            _sample_grid(ema.model, cfg, class_names, run_dir / "samples" / f"step_{done:07d}.png")
        if cfg.run.ckpt_every and done % cfg.run.ckpt_every == 0:
            save(done)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.run.steps > start and (not cfg.run.ckpt_every or cfg.run.steps % cfg.run.ckpt_every):
            save(cfg.run.steps)
        export = run_dir / "export"
        save_artifact(export, ema.model, ArtifactMeta(role="teacher", diffusion=cfg.diffusion,
                                                       class_names=class_names))
        _sample_grid(ema.model, cfg, class_names, export / "samples_grid.png")
        accelerator.print(f"teacher exported to {export}")
    accelerator.end_training()
    return run_dir / "export"


# Model keys that only change how a network trains, not what it computes: an export may be fine-tuned with others.
TRAINING_ONLY_MODEL_KEYS = ("class_dropout_prob", "gradient_checkpointing")


def load_initial_weights(model, cfg: TeacherConfig) -> Path:
    """Copy an exported teacher's weights (``cfg.init_from``) into ``model``: the starting point of a fine-tuning
    run. The export must have the same architecture (``model.*``, training-only keys aside) and the same noise
    path and prediction; anything else is a ``UserError`` that names the keys to change."""
    folder = resolve_checkpoint(cfg.init_from)
    source, meta = load_artifact(folder)
    if meta.role != "teacher":
        raise UserError(f"init_from={cfg.init_from}: {folder} is a {meta.role} export; start from a teacher's "
                        f"export/ folder")
    differ = diff_configs(source.cfg, model.cfg, ignore=TRAINING_ONLY_MODEL_KEYS)
    if differ:
        values = [(k, attrgetter(k)(source.cfg), attrgetter(k)(model.cfg)) for k in differ]  # dotted: routing.kind
        raise UserError(f"init_from={cfg.init_from}: the export's architecture differs in "
                        + ", ".join(f"model.{k} (export {theirs!r}, here {mine!r})" for k, theirs, mine in values)
                        + "; set those keys to the export's values (its run's config.yaml has them)")
    for key in ("path", "prediction"):
        if getattr(meta.diffusion, key) != getattr(cfg.diffusion, key):
            raise UserError(f"init_from={cfg.init_from}: the export was trained with diffusion.{key}="
                            f"{getattr(meta.diffusion, key)!r}, this run has {getattr(cfg.diffusion, key)!r}; "
                            f"fine-tune with the export's value")
    model.load_state_dict(source.state_dict())
    return folder


@torch.no_grad()
def _sample_grid(model, cfg: TeacherConfig, class_names: list[str], path: Path, per_class: int = 8) -> None:
    model.eval()
    n_cls = max(cfg.model.num_classes, 1)
    labels = torch.arange(n_cls).repeat_interleave(per_class)
    seeds = list(range(len(labels)))
    meta = ArtifactMeta(role="teacher", diffusion=cfg.diffusion, class_names=class_names)
    images = generate(model, meta, labels, seeds)
    save_grid(images, path, nrow=per_class)

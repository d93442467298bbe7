"""Exported models: a folder any command can load, with what is needed to sample from it.

    <folder>/model.safetensors   weights (+ the architecture config as metadata, see dmd_dar.models)
    <folder>/dmd_dar.json        role (teacher | student), noise path and parameterisation, sampling defaults,
                                 class names

A teacher samples with an ODE solver over N steps with CFG; a student samples with its few-step schedule
(:func:`generate`). Every image i is generated from noise seeded by its own seed alone, so two models sampled with
the same seeds and conditions start from the same noise: that is what pairs a student's image with its teacher's
for LPIPS fidelity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dmd_dar.diffusion.noise import make_noise
from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.samplers import (
    check_guidance_interval,
    few_step_sample,
    guided,
    network_x0_fn,
    sample_ode,
    student_timesteps,
)
from dmd_dar.errors import UserError
from dmd_dar.models import load_model, save_model
from dmd_dar.training.seeding import derive_seed
from dmd_dar.utils.io import atomic_write_json

META_FILE = "dmd_dar.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class DiffusionConfig:
    """A network's noise path, its output parameterisation and its sampling defaults."""

    path: str = "flow"  # flow | vp
    prediction: str = "velocity"  # flow: velocity | x0 ; vp: eps | v | x0
    shift: float = 1.0  # flow timestep shift (SD3 convention), used by samplers and by DMD's t range
    train_timesteps: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sampler: str = "euler"  # euler | heun | ddim
    sample_steps: int = 50
    cfg_scale: float = 2.0
    cfg_interval: list[float] | None = None  # [lo, hi]: guide only where lo <= t <= hi; null = every step

    def __post_init__(self) -> None:
        check_guidance_interval(self.cfg_interval, "diffusion.cfg_interval")

    def make_path(self):
        return make_path(self.path, self.prediction)


@dataclass
class ArtifactMeta:
    role: str  # teacher | student
    diffusion: DiffusionConfig
    class_names: list[str] = field(default_factory=list)
    student_timesteps: list[float] = field(default_factory=list)  # students only
    note: str = ""


def save_artifact(folder: str | Path, model, meta: ArtifactMeta) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / WEIGHTS_FILE)
    atomic_write_json(asdict(meta), folder / META_FILE)
    return folder


def load_artifact(folder: str | Path, device: str = "cpu"):
    """(model in eval mode, ArtifactMeta) from an exported folder."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        hint = " (a checkpoints/step_* folder? export it, or pass the run's export/ folder)" if folder.is_dir() else ""
        raise UserError(f"{folder}: not an exported dmd-dar model, {META_FILE} is missing{hint}")
    try:
        raw = json.loads(meta_path.read_text())
        meta = ArtifactMeta(**{**raw, "diffusion": DiffusionConfig(**raw["diffusion"])})
    except (json.JSONDecodeError, TypeError, KeyError, UserError) as exc:  # UserError: a value fails validation
        raise UserError(f"{meta_path}: unreadable model description ({exc}); re-export the model") from exc
    model = load_model(folder / WEIGHTS_FILE).to(device).eval()
    return model, meta


def resolve_checkpoint(path: str) -> Path:
    """A model folder: as given, or the packaged asset of that name, or a run's export/ folder."""
    p = Path(path)
    packaged = Path(__file__).resolve().parent / p
    for candidate in (p, p / "export", packaged):
        if (candidate / META_FILE).is_file():
            return candidate
    raise UserError(f"{path}: no exported model here (expected {META_FILE} + {WEIGHTS_FILE}); pass a run's "
                    f"export/ folder, or train one with `dmd-dar train-teacher` / `dmd-dar distill`")


@torch.no_grad()
def generate(model, meta: ArtifactMeta, labels: torch.Tensor, seeds: list[int], *, steps: int | None = None,
             cfg_scale: float | None = None, cfg_interval: list[float] | None = None, sampler: str | None = None,
             progress: bool = False) -> torch.Tensor:
    """Images in [-1, 1], [B, C, H, W], for one batch of labels and per-image seeds. A teacher's ``steps``,
    ``cfg_scale``, ``cfg_interval`` and ``sampler`` default to its own (``meta.diffusion``). A student samples its
    training schedule, or with ``steps`` that many student steps (``student_timesteps``: a student trained with
    ``method.schedule=random`` samples at step counts it was not trained at)."""
    device = next(model.parameters()).device
    cfgm = model.cfg
    shape = (cfgm.in_channels, cfgm.image_size, cfgm.image_size)
    z = make_noise(seeds, shape, device)
    labels = labels.to(device)
    d = meta.diffusion
    path = d.make_path()
    if meta.role == "student":
        gen = torch.Generator(device=device).manual_seed(derive_seed("renoise", *seeds[:1]))
        times = meta.student_timesteps if steps is None else student_timesteps(steps, shift=d.shift)
        x = few_step_sample(network_x0_fn(model, path, labels), path, z, times, generator=gen)
    else:
        scale = d.cfg_scale if cfg_scale is None else cfg_scale
        null = torch.full_like(labels, cfgm.num_classes)
        interval = d.cfg_interval if cfg_interval is None else cfg_interval
        denoise = guided(lambda x, t, y: model(x, t, y), scale, labels, null, interval=interval)
        x = sample_ode(sampler or d.sampler, denoise, path, z, steps or d.sample_steps, shift=d.shift,
                       progress=progress)
    return x.float().clamp(-1, 1)

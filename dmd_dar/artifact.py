"""Exported models: a folder any command can load, with what is needed to sample from it.

    <folder>/model.safetensors   weights (+ the architecture config as metadata, see dmd_dar.models)
    <folder>/dmd_dar.json        role (teacher | student), noise path and parameterisation, sampling defaults,
                                 class names

A teacher samples with an ODE solver over N steps with CFG; a student samples with its few-step schedule.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmd_dar.errors import UserError
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
        from dmd_dar.diffusion.samplers import check_guidance_interval

        check_guidance_interval(self.cfg_interval, "diffusion.cfg_interval")

    def make_path(self):
        from dmd_dar.diffusion.paths import make_path

        return make_path(self.path, self.prediction)


@dataclass
class ArtifactMeta:
    role: str  # teacher | student
    diffusion: DiffusionConfig
    class_names: list[str] = field(default_factory=list)
    student_timesteps: list[float] = field(default_factory=list)  # students only
    note: str = ""


def save_artifact(folder: str | Path, model, meta: ArtifactMeta) -> Path:
    from dmd_dar.models import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / WEIGHTS_FILE)
    atomic_write_json(asdict(meta), folder / META_FILE)
    return folder


def load_artifact(folder: str | Path, device: str = "cpu"):
    """(model in eval mode, ArtifactMeta) from an exported folder."""
    from dmd_dar.models import load_model

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

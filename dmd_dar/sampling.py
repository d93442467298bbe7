"""``dmd-dar sample``: a folder of PNGs + manifest.jsonl + grid.png from any exported model.

Class-conditional dmd-dar exports are sampled here (:func:`sample_folder`, through ``dmd_dar.artifact.generate``);
text-to-image student exports go to ``dmd_dar.t2i.sample``. Image (class c, k) uses noise seeded by
``derive_seed("sample", c, seed + k)``, independent of the class list and the batch layout, so subsets pair with
full runs and folders of two models pair for ``dmd-dar eval``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dmd_dar.artifact import ArtifactMeta, generate, load_artifact, resolve_checkpoint
from dmd_dar.data.manifest import save_grid, save_png_folder
from dmd_dar.diffusion.samplers import check_guidance_interval
from dmd_dar.errors import UserError
from dmd_dar.t2i.export import find_export
from dmd_dar.t2i.sample import sample_t2i
from dmd_dar.training.compile import check_compile_mode, compile_forward
from dmd_dar.training.seeding import derive_seed
from dmd_dar.utils.device import resolve_device

log = logging.getLogger("dmd_dar")


@dataclass
class SampleConfig:
    checkpoint: str = "assets/teacher"  # an exported model folder (a run's export/, or the embedded teacher)
    out_dir: str | None = None  # default: <checkpoint>/samples
    num_per_class: int = 8  # images per class (text-to-image students: per prompt)
    classes: list[Any] | None = None  # class ids or names, e.g. [4, rings]; default: every class
    seed: int = 0
    steps: int | None = None  # teacher: ODE steps; student: student steps (default: the model's own schedule)
    cfg_scale: float | None = None  # teacher guidance (default from the model)
    cfg_interval: list[float] | None = None  # [lo, hi]: guide only where lo <= t <= hi ([0, 1]: every step);
    #                                          default from the model
    sampler: str | None = None  # euler | heun | ddim (default from the model)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    prompt: str | None = None  # text-to-image students: one prompt ...
    prompts_file: str | None = None  # ... and/or a prompt file (.txt / .csv / .jsonl)
    compile: str = "false"  # false | default | max-autotune: torch.compile the model's forward (class-conditional)

    def __post_init__(self) -> None:
        self.compile = check_compile_mode(self.compile, section="")
        check_guidance_interval(self.cfg_interval)
        if self.num_per_class < 1:
            raise UserError(f"num_per_class={self.num_per_class} must be >= 1 (images per class or prompt)")
        if self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size} must be >= 1 (images per forward pass)")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps={self.steps} must be >= 1, or null for the model's default")
        if self.classes is not None and not self.classes:
            raise UserError("classes=[] selects no class; list class ids or names, or null for every class")


def resolve_classes(spec: list[Any] | None, class_names: list[str], num_classes: int) -> list[int]:
    """Class ids for a ``classes`` selection given as ids (``4``, ``"4"``) and/or names (``"rings"``), in the
    given order; ``None`` is every class (one unconditional "class" 0 for an unconditional model)."""
    if spec is None:
        return list(range(max(num_classes, 1)))
    ids = []
    for item in spec:
        text = str(item).strip()
        if text.lstrip("-").isdigit():
            c = int(text)
            if num_classes and not 0 <= c < num_classes:
                raise UserError(f"classes contains {c}, but the model has classes 0..{num_classes - 1}")
        elif text in class_names:
            c = class_names.index(text)
        else:
            known = ", ".join(class_names) if class_names else "none: this model has no class names, use ids"
            raise UserError(f"classes contains {text!r}, which is neither a class id nor a class name of this "
                            f"model (names: {known})")
        ids.append(c)
    if len(set(ids)) != len(ids):
        raise UserError(f"classes={list(spec)} names a class twice; list each class once")
    return ids


def sample_folder(model, meta: ArtifactMeta, out_dir: Path, cfg: SampleConfig) -> list[dict]:
    """Write PNGs + manifest.jsonl + grid.png for ``num_per_class`` images of each class; returns the records."""
    classes = resolve_classes(cfg.classes, meta.class_names, model.cfg.num_classes)
    jobs = [(c, cfg.seed + k) for c in classes for k in range(cfg.num_per_class)]
    # Seed of image (class c, k) is independent of the class list, so subsets pair with full runs.
    records, images = [], []
    bar = tqdm(range(0, len(jobs), cfg.batch_size), desc=f"sample {meta.role}", unit="batch")
    for start in bar:
        chunk = jobs[start:start + cfg.batch_size]
        labels = torch.tensor([c for c, _ in chunk], dtype=torch.long)
        seeds = [derive_seed("sample", c, s) for c, s in chunk]
        x = generate(model, meta, labels, seeds, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                     cfg_interval=cfg.cfg_interval, sampler=cfg.sampler)
        images.append(x.cpu())
        for (c, s), seed in zip(chunk, seeds):
            name = meta.class_names[c] if c < len(meta.class_names) else str(c)
            records.append({"index": len(records), "seed": s, "noise_seed": seed, "class_id": c,
                            "class_name": name})
    all_images = torch.cat(images)
    save_png_folder(all_images, out_dir, records)
    save_grid(all_images, out_dir / "grid.png", nrow=cfg.num_per_class)
    return records


def run(cfg: SampleConfig) -> Path:
    """``dmd-dar sample``: sample ``cfg.checkpoint`` (a T2I student export, or a class-conditional model)."""
    t2i = find_export(cfg.checkpoint)
    if t2i is not None:  # a diffusers text-to-image student (dmd_dar.t2i)
        if cfg.compile != "false":
            log.warning(f"warning: compile={cfg.compile} applies to class-conditional models; this text-to-image "
                        f"student is sampled eager")
        return sample_t2i(cfg, t2i)
    if cfg.prompt or cfg.prompts_file:
        raise UserError(f"{cfg.checkpoint}: prompt / prompts_file apply to text-to-image students only; this is a "
                        f"class-conditional model, use classes=[...]")
    folder = resolve_checkpoint(cfg.checkpoint)
    model, meta = load_artifact(folder, device=str(resolve_device(cfg.device)))
    compile_forward(model, cfg.compile, f"the {meta.role}", key="compile")
    out = Path(cfg.out_dir) if cfg.out_dir else folder / "samples"
    records = sample_folder(model, meta, out, cfg)
    default = len(meta.student_timesteps) if meta.role == "student" else meta.diffusion.sample_steps
    steps = cfg.steps or default
    print(f"wrote {len(records)} images ({meta.role}, {steps} step(s)) to {out}; grid: {out / 'grid.png'}")
    return out

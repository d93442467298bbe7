"""Generating images from an exported teacher or student, and the ``dmd-dar sample`` command.

Every image i is generated from noise seeded by (seed, i) alone, so two models sampled with the same seed and
conditions start from the same noise: that is what pairs a student's image with its teacher's for LPIPS fidelity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dmd_dar.artifact import ArtifactMeta, load_artifact
from dmd_dar.errors import UserError
from dmd_dar.training.seeding import derive_seed


def make_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise [len(seeds), *shape], sample i drawn from its own generator seeded by ``seeds[i]``."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device)


def model_x0_fn(model, path, labels: torch.Tensor):
    """x0 prediction of a (student) network at (x_t, t) for fixed labels, no guidance."""
    def x0_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return path.pred_to_x0(model(x_t, t, labels), x_t, t).to(x_t.dtype)

    return x0_fn


@torch.no_grad()
def generate(model, meta: ArtifactMeta, labels: torch.Tensor, seeds: list[int], *, steps: int | None = None,
             cfg_scale: float | None = None, cfg_interval: list[float] | None = None, sampler: str | None = None,
             progress: bool = False) -> torch.Tensor:
    """Images in [-1, 1], [B, C, H, W], for one batch of labels and per-image seeds. A teacher's ``steps``,
    ``cfg_scale``, ``cfg_interval`` and ``sampler`` default to its own (``meta.diffusion``)."""
    from dmd_dar.diffusion.samplers import few_step_sample, guided, sample_ode

    device = next(model.parameters()).device
    cfgm = model.cfg
    shape = (cfgm.in_channels, cfgm.image_size, cfgm.image_size)
    z = make_noise(seeds, shape, device)
    labels = labels.to(device)
    d = meta.diffusion
    path = d.make_path()
    if meta.role == "student":
        gen = torch.Generator(device=device).manual_seed(derive_seed("renoise", *seeds[:1]))
        x = few_step_sample(model_x0_fn(model, path, labels), path, z, meta.student_timesteps, generator=gen)
    else:
        scale = d.cfg_scale if cfg_scale is None else cfg_scale
        null = torch.full_like(labels, cfgm.num_classes)
        interval = d.cfg_interval if cfg_interval is None else cfg_interval
        denoise = guided(lambda x, t, y: model(x, t, y), scale, labels, null, interval=interval)
        x = sample_ode(sampler or d.sampler, denoise, path, z, steps or d.sample_steps, shift=d.shift,
                       progress=progress)
    return x.float().clamp(-1, 1)


@dataclass
class SampleConfig:
    checkpoint: str = "assets/teacher"  # an exported model folder (a run's export/, or the embedded teacher)
    out_dir: str | None = None  # default: <checkpoint>/samples
    num_per_class: int = 8  # images per class (text-to-image students: per prompt)
    classes: list[Any] | None = None  # class ids or names, e.g. [4, rings]; default: every class
    seed: int = 0
    steps: int | None = None  # teacher: ODE steps (default from the model); ignored for students
    cfg_scale: float | None = None  # teacher guidance (default from the model)
    cfg_interval: list[float] | None = None  # [lo, hi]: guide only where lo <= t <= hi ([0, 1]: every step);
    #                                          default from the model
    sampler: str | None = None  # euler | heun | ddim (default from the model)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    prompt: str | None = None  # text-to-image students: one prompt ...
    prompts_file: str | None = None  # ... and/or a prompt file (.txt / .csv / .jsonl)

    def __post_init__(self) -> None:
        from dmd_dar.diffusion.samplers import check_guidance_interval

        check_guidance_interval(self.cfg_interval)
        if self.num_per_class < 1:
            raise UserError(f"num_per_class={self.num_per_class} must be >= 1 (images per class or prompt)")
        if self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size} must be >= 1 (images per forward pass)")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps={self.steps} must be >= 1, or null for the model's default")
        if self.classes is not None and not self.classes:
            raise UserError("classes=[] selects no class; list class ids or names, or null for every class")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu")
    return torch.device(name)


def resolve_checkpoint(path: str) -> Path:
    """A model folder: as given, or the packaged asset of that name, or a run's export/ folder."""
    p = Path(path)
    packaged = Path(__file__).resolve().parent / p
    for candidate in (p, p / "export", packaged):
        if (candidate / "dmd_dar.json").is_file():
            return candidate
    raise UserError(f"{path}: no exported model here (expected dmd_dar.json + model.safetensors); pass a run's "
                    f"export/ folder, or train one with `dmd-dar train-teacher` / `dmd-dar distill`")


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
    from dmd_dar.data.manifest import save_grid, save_png_folder

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
    from dmd_dar.t2i.export import find_export

    t2i = find_export(cfg.checkpoint)
    if t2i is not None:  # a diffusers text-to-image student (dmd_dar.t2i)
        from dmd_dar.t2i.sample import sample_t2i

        return sample_t2i(cfg, t2i)
    if cfg.prompt or cfg.prompts_file:
        raise UserError(f"{cfg.checkpoint}: prompt / prompts_file apply to text-to-image students only; this is a "
                        f"class-conditional model, use classes=[...]")
    folder = resolve_checkpoint(cfg.checkpoint)
    model, meta = load_artifact(folder, device=str(resolve_device(cfg.device)))
    out = Path(cfg.out_dir) if cfg.out_dir else folder / "samples"
    records = sample_folder(model, meta, out, cfg)
    steps = len(meta.student_timesteps) if meta.role == "student" else (cfg.steps or meta.diffusion.sample_steps)
    print(f"wrote {len(records)} images ({meta.role}, {steps} step(s)) to {out}; grid: {out / 'grid.png'}")
    return out

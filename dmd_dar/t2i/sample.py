"""``dmd-dar sample`` for T2I student exports: prompts -> PNGs + manifest.jsonl (captions) + grid.png.

Image ``(prompt p, k)`` uses noise seeded by ``derive_seed("sample", p, seed + k)``, independent of the batch
layout, so the same prompts and seeds give the same images, and folders pair across models for ``dmd-dar eval``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmd_dar.data.manifest import save_grid, save_png_folder
from dmd_dar.diffusion.noise import make_noise
from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.samplers import few_step_sample, network_x0_fn, student_timesteps
from dmd_dar.errors import UserError
from dmd_dar.t2i import embeddings as E
from dmd_dar.t2i import loading as L
from dmd_dar.t2i.export import load_student
from dmd_dar.t2i.families import FAMILIES
from dmd_dar.t2i.prompts import load_prompts
from dmd_dar.training.seeding import derive_seed
from dmd_dar.utils.device import resolve_device


def _prompts(cfg) -> list[str]:
    prompts = []
    if cfg.prompt:
        prompts.append(str(cfg.prompt))
    if cfg.prompts_file:
        prompts.extend(load_prompts(cfg.prompts_file))
    if not prompts:
        raise UserError("a text-to-image student samples from prompts: give prompt=\"...\" or "
                        "prompts_file=<.txt/.csv/.jsonl>")
    return prompts


def text_conditions(info: dict, prompts: list[str], device) -> tuple[dict, object]:
    """(per-prompt conditions, the VAE), from the cache or the teacher pipeline's encoders (freed after use)."""
    family = FAMILIES[info["family"]]
    dtype = L.torch_dtype(info["dtype"])
    source, local_only = L.resolve_source(info["teacher"], info.get("local_files_only", False))
    index = L.pipeline_index(source, local_only, info.get("revision"))
    text_parts = L.text_components(index)
    cache = E.EmbeddingCache(info.get("text_cache_dir") or E.default_cache_dir(), info["text_identity"])
    need_text = family.has_text and bool(cache.missing(prompts))
    skip = ["transformer"] + ([] if need_text else text_parts)
    pipe = L.load_pipeline(source, local_only, dtype, info.get("revision"), skip=skip)
    if not family.has_text:
        try:
            ids = pipe.get_label_ids(prompts)
        except (ValueError, KeyError) as exc:
            raise UserError(f"DiT students sample class names of the pipeline's id2label: {exc}") from exc
        conds = [{"class_labels": torch.tensor(i)} for i in ids]
    else:
        if need_text:
            for name in text_parts:
                module = getattr(pipe, name, None)
                if isinstance(module, torch.nn.Module):
                    module.to(device)
            cache.fill(prompts, lambda chunk: E.encode_with_pipeline(pipe, family, chunk,
                                                                     info["max_sequence_length"], device))
        conds = [cache.get(p) for p in prompts]
    return conds, pipe.vae.to(device).eval()


def sample_t2i(cfg, folder: Path) -> Path:
    """Sample ``cfg.num_per_class`` images per prompt from a T2I export (``SampleConfig`` fields)."""
    device = resolve_device(cfg.device)
    prompts = _prompts(cfg)
    net, info = load_student(folder, device=device)
    family = FAMILIES[info["family"]]
    path = make_path(info["path"], info["prediction"], **(info.get("vp_schedule") or {}))
    conds, vae = text_conditions(info, prompts, device)
    times = info["student_timesteps"] if cfg.steps is None else student_timesteps(cfg.steps, shift=info["shift"])
    jobs = [(p, cfg.seed + k) for p in range(len(prompts)) for k in range(cfg.num_per_class)]
    images, records = [], []
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start:start + cfg.batch_size]
        seeds = [derive_seed("sample", p, s) for p, s in chunk]
        if family.has_text:
            cond = E.stack_conditions([conds[p] for p, _ in chunk], family)
        else:
            cond = {"class_labels": torch.stack([conds[p]["class_labels"] for p, _ in chunk])}
        cond = {k: v.to(device) for k, v in cond.items()}
        z = make_noise(seeds, tuple(info["latent_shape"]), device)
        gen = torch.Generator(device=device).manual_seed(derive_seed("renoise", seeds[0]))
        with torch.no_grad():
            x = few_step_sample(network_x0_fn(net, path, cond), path, z, times, generator=gen)
            for i in range(0, x.shape[0], 4):  # the VAE decoder is the memory peak at 1024^2
                images.append(family.decode_latents(vae, x[i:i + 4]).cpu())
        for (p, s), noise_seed in zip(chunk, seeds):
            records.append({"index": len(records), "seed": s, "noise_seed": noise_seed, "prompt_id": p,
                            "caption": prompts[p]})
    out = Path(cfg.out_dir) if cfg.out_dir else folder / "samples"
    all_images = torch.cat(images)
    save_png_folder(all_images, out, records)
    save_grid(all_images, out / "grid.png", nrow=cfg.num_per_class)
    print(f"wrote {len(records)} images (T2I student, {len(times)} step(s)) to {out}; "
          f"grid: {out / 'grid.png'}")
    return out

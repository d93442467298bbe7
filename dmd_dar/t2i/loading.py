"""Loading a diffusers teacher pipeline (local folder or hub id, offline-aware) and reading off what DMD needs:
the family, the noise path, the flow shift, the latent geometry.

Flow shift. ``FlowMatchEulerDiscreteScheduler`` either has a static ``shift`` s (SD3/SD3.5: 3.0) or uses dynamic
shifting (Flux, Qwen-Image): ``sigma' = exp(mu) / (exp(mu) + 1/sigma - 1)`` with ``mu`` linear in the number of
image tokens between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``. That is exactly
the SD3-convention shift ``s t / (1 + (s - 1) t)`` with ``s = exp(mu)`` (``s = mu`` for ``time_shift_type:
linear``). Training runs at one resolution, so we evaluate ``mu`` once at that resolution's token count and use the
constant ``s`` for the DM / fake-score timesteps and the student schedule (Flux-dev at 1024^2: 4096 tokens,
mu = 1.15, s = 3.16). ``t2i.shift`` overrides it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from dmd_dar.errors import UserError
from dmd_dar.t2i.families import FAMILY_OF_CLASS, Family, family_for

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str):
    key = DTYPES.get(str(name).lower())
    if key is None:
        raise UserError(f"t2i.dtype={name!r}; choose one of float32, bfloat16, float16")
    return getattr(torch, key)


def offline(local_files_only: bool = False) -> bool:
    """True when hub downloads are off: ``t2i.local_files_only`` or ``HF_HUB_OFFLINE`` set to a true value."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(local_files_only) or flag in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")


def _not_cached(source: str) -> UserError:
    return UserError(f"t2i.model={source!r} is not in the local Hugging Face cache and downloads are off "
                     f"(HF_HUB_OFFLINE / t2i.local_files_only); download it first with `huggingface-cli download "
                     f"{source}` (accept its licence on the hub if it is gated), or set t2i.model to a local "
                     f"pipeline folder")


def resolve_source(model: str, local_files_only: bool = False) -> tuple[str, bool]:
    """(the string for ``from_pretrained``, local_files_only to pass). Local folders are always loaded locally."""
    if not model:
        raise UserError("t2i.model is empty; set it to a local diffusers pipeline folder or a hub id "
                        "(e.g. t2i.model=stabilityai/stable-diffusion-3.5-medium)")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"t2i.model={model!r}: {path} is not a diffusers pipeline folder (no model_index.json); "
                            f"pass the folder that holds model_index.json")
        return str(path.resolve()), True
    if _looks_like_path(model):
        raise UserError(f"t2i.model={model!r}: no such folder; pass an existing pipeline folder or a hub id")
    return model, offline(local_files_only)


def pipeline_index(source: str, local_only: bool, revision: str | None = None,
                   cache_dir: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (component name -> [library, class])."""
    path = Path(source)
    if path.is_dir():
        return json.loads((path / "model_index.json").read_text())
    # lazy: diffusers takes seconds to import; a local pipeline folder is read without it
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source, local_files_only=local_only, revision=revision,
                                                  cache_dir=cache_dir))
    except Exception as exc:  # OSError / EnvironmentError / huggingface_hub errors
        if local_only:
            raise _not_cached(source) from exc
        raise UserError(f"t2i.model={source!r}: cannot fetch model_index.json ({str(exc).splitlines()[0]}); "
                        f"check the hub id and your network, or download it with `huggingface-cli download "
                        f"{source}` and set HF_HUB_OFFLINE=1") from exc


def family_from_index(index: dict[str, Any]) -> tuple[Family, str]:
    """(family, transformer class name); a class with no DAR adapter raises the backbones' UserError."""
    entry = index.get("transformer")
    if not entry or not isinstance(entry, (list, tuple)) or entry[1] is None:
        raise UserError(f"{index.get('_class_name', 'this pipeline')} has no 'transformer' component; dmd-dar "
                        f"distils transformer pipelines ({', '.join(sorted(FAMILY_OF_CLASS))})")
    class_name = str(entry[1])
    if class_name not in FAMILY_OF_CLASS:
        # lazy: dmd_dar.backbones imports diffusers (seconds); only this error path needs its adapter listing
        from dmd_dar.backbones import adapter_for

        adapter_for(type(class_name, (), {})())  # a stand-in of that class name: raises the listing UserError
    return family_for(class_name), class_name


def text_components(index: dict[str, Any]) -> list[str]:
    return [k for k in index if k.startswith(("text_encoder", "tokenizer"))]


def load_pipeline(source: str, local_only: bool, dtype, revision: str | None = None, cache_dir: str | None = None,
                  skip: list[str] | tuple[str, ...] = ()):
    """``DiffusionPipeline.from_pretrained`` with components in ``skip`` not loaded (None)."""
    # lazy: diffusers takes seconds to import; only loading a pipeline needs it
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(source, local_files_only=local_only, revision=revision,
                                                 cache_dir=cache_dir, dtype=dtype, **{k: None for k in skip})
    except UserError:
        raise
    except Exception as exc:
        if local_only and not Path(source).is_dir():
            raise _not_cached(source) from exc
        raise UserError(f"t2i.model={source!r}: the pipeline did not load ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the folder / hub id") from exc


def scheduler_shift(scheduler_config: dict[str, Any], image_tokens: int) -> float:
    """The teacher's flow shift at a resolution with ``image_tokens`` transformer image tokens (module docstring)."""
    cfg = scheduler_config
    if cfg.get("use_dynamic_shifting"):
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = image_tokens * m + (base_shift - m * base_len)  # diffusers' calculate_shift
        return float(mu) if cfg.get("time_shift_type", "exponential") == "linear" else float(math.exp(mu))
    return float(cfg.get("shift", 1.0))


def vp_schedule(scheduler_config: dict[str, Any], family: str) -> dict[str, float]:
    """The DDPM schedule of a VP teacher (PixArt, DiT); only linear betas match dmd_dar's VP path."""
    cfg = scheduler_config
    kind = cfg.get("beta_schedule", "linear")
    if kind != "linear" or cfg.get("trained_betas") is not None:
        raise UserError(f"{family}: scheduler beta_schedule={kind!r}; dmd_dar's VP path supports linear betas only")
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise UserError(f"{family}: scheduler prediction_type={pred!r}; only epsilon VP teachers are supported")
    return {"num_train_steps": int(cfg.get("num_train_timesteps", 1000)),
            "beta_start": float(cfg.get("beta_start", 1e-4)), "beta_end": float(cfg.get("beta_end", 0.02))}


def vae_scale_factor(pipe) -> int:
    vae = pipe.vae
    if hasattr(vae, "temperal_downsample"):  # Qwen-Image's video VAE
        return 2 ** len(vae.temperal_downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_geometry(family: Family, transformer_config, vae_factor: int, height: int, width: int,
                    latent_channels: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents for an image of ``height x width``; sizes the VAE or the patching cannot take raise
    a UserError that names the nearest valid size."""
    patch = int(getattr(transformer_config, "patch_size", 1) or 1)
    step = vae_factor * (2 if family.packed else patch)
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % step:
            lo, hi = max(step, size // step * step), (size // step + 1) * step
            raise UserError(f"t2i.{name}={size}: the {family.name} VAE ({vae_factor}x) and its "
                            f"{'2x2 latent packing' if family.packed else f'patch size {patch}'} need a multiple of "
                            f"{step}; use {lo} or {hi}")
    return latent_channels, height // vae_factor, width // vae_factor

"""Exported T2I students: a folder that diffusers, peft and ``dmd-dar sample`` can each load.

    <export>/transformer/            diffusers model folder (config.json + safetensors), LoRA merged. Plain
                                     ``<ModelClass>.from_pretrained`` loads these weights WITHOUT the DAR routers:
                                     that is the residual twin of the student, not the student (unless the student
                                     was trained with routing.kind=residual, where the two are the same).
    <export>/dar_router.safetensors  the routers' parameters (``router.*``, ``text_router.*``; empty for residual)
    <export>/scheduler/              FlowMatchEulerDiscreteScheduler config for DMD2 few-step sampling (flow
                                     families): stochastic_sampling=true, shift 1 (the student times below are
                                     already shifted)
    <export>/lora/                   (LoRA runs) the unmerged adapter in peft's format
    <export>/dmd_dar_t2i.json        family, model class, routing config, few-step times, resolution, guidance,
                                     the teacher pipeline the VAE / text encoders come from, text-cache identity
    <export>/README.md               how to load it with and without dmd-dar

``load_student(folder)`` rebuilds the DAR student (``T2INet`` around ``wrap_with_dar(transformer)`` with the
routers loaded); ``dmd-dar sample checkpoint=<export> prompt="..."`` samples it (``dmd_dar.t2i.sample``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch

from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i.families import FAMILIES, T2INet
from dmd_dar.t2i.loading import torch_dtype
from dmd_dar.t2i.lora import has_lora, merge_lora, save_lora
from dmd_dar.utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, load_safetensors

FORMAT = "dmd_dar.t2i.student/1"
INFO_FILE = "dmd_dar_t2i.json"
ROUTER_FILE = "dar_router.safetensors"
ROUTER_PREFIXES = ("router.", "text_router.")


def export_student(net, folder: Path, task) -> Path:
    """Write ``net`` (a ``T2INet`` around a DAR-wrapped, possibly LoRA-adapted transformer) as an export folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped = net.model
    lora = has_lora(wrapped.transformer)
    if lora:
        save_lora(wrapped.transformer, folder / "lora")
    merged = copy.deepcopy(wrapped).cpu()
    merge_lora(merged.transformer)
    for p in merged.transformer.parameters():  # full fine-tuning trains in train_dtype; export in the teacher's
        p.data = p.data.to(task.dtype)
    merged.transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    routers = {k: v.detach().float().contiguous() for k, v in merged.state_dict().items()
               if k.startswith(ROUTER_PREFIXES)}
    atomic_save_safetensors(routers, folder / ROUTER_FILE)
    if task.path.kind == "flow":
        # lazy: diffusers takes seconds to import; only exporting a flow student writes its scheduler
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(task.scheduler_config, shift=1.0,
                                                            use_dynamic_shifting=False, stochastic_sampling=True)
        sched.save_pretrained(str(folder / "scheduler"))
    tc = task.tc
    info = {
        "format": FORMAT,
        "family": task.family.name,
        "model_class": task.class_name,
        "teacher": task.source,
        "revision": tc.revision,
        "local_files_only": task.local_only,
        "routing": asdict(wrapped.routing_cfg),
        "route_text": wrapped.route_text,
        "student_timesteps": list(task.student_times),
        "sigmas": list(task.student_times),
        "diffusers_timesteps": [t * 1000 for t in task.student_times],
        "shift": task.shift,
        "path": task.path.kind,
        "prediction": task.path.prediction,
        "vp_schedule": task.vp_schedule,
        "height": tc.height,
        "width": tc.width,
        "latent_shape": list(task.latent_shape),
        "vae_scale_factor": task.vae_factor,
        "guidance": task.guidance_form,
        "embedded_guidance": task.embedded_guidance,
        "teacher_guidance_scale": task.cfg.method.guidance_scale,
        "max_sequence_length": task.max_sequence_length,
        "dtype": str(task.dtype).replace("torch.", ""),
        "text_identity": json.loads(task.cache.identity),
        "text_cache_dir": str(task.cache.root),
        "lora": ({"rank": tc.lora_rank, "alpha": tc.lora_alpha if tc.lora_alpha is not None else tc.lora_rank,
                  "folder": "lora"} if lora else None),
    }
    atomic_write_json(info, folder / INFO_FILE)
    atomic_write_text(_readme(info), folder / "README.md")
    return folder


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable T2I export description ({exc}); re-export the student") from exc
    if info.get("format") != FORMAT:
        raise UserError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}; re-export with this version")
    return info


def find_export(path: str | Path) -> Path | None:
    """The T2I export folder at ``path`` (or its ``export/``), else None."""
    p = Path(path)
    for candidate in (p, p / "export"):
        if (candidate / INFO_FILE).is_file():
            return candidate
    return None


def load_student(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(``T2INet`` student in eval mode with its DAR routers, export info) from an export folder."""
    # lazy: diffusers takes seconds to import; `dmd-dar sample` of a class-conditional model imports this module
    import diffusers

    # lazy: dmd_dar.backbones imports diffusers
    from dmd_dar.backbones import wrap_with_dar

    folder = Path(folder)
    info = read_info(folder)
    cls = getattr(diffusers, info["model_class"], None)
    if cls is None:
        raise UserError(f"{folder}: diffusers has no {info['model_class']}; install the diffusers version it was "
                        f"exported with")
    dtype = dtype or torch_dtype(info["dtype"])
    transformer = cls.from_pretrained(str(folder / "transformer"), dtype=dtype)
    wrapped = wrap_with_dar(transformer, RoutingConfig(**info["routing"]), route_text=info["route_text"])
    routers = load_safetensors(folder / ROUTER_FILE)
    expected = {k for k in wrapped.state_dict() if k.startswith(ROUTER_PREFIXES)}
    if set(routers) != expected:
        raise UserError(f"{folder / ROUTER_FILE}: router keys do not match the routing config in {INFO_FILE} "
                        f"({len(set(routers) ^ expected)} differ); re-export the student")
    wrapped.load_state_dict(routers, strict=False)
    for key in expected:  # routers compute in fp32 whatever the transformer's dtype
        wrapped.get_parameter(key).data = routers[key].to(torch.float32)
    net = T2INet(wrapped, FAMILIES[info["family"]], info.get("embedded_guidance"))
    net.vae_scale_factor = int(info.get("vae_scale_factor", 8))
    return net.to(device).eval().requires_grad_(False), info


def _readme(info: dict) -> str:
    times = ", ".join(f"{t:.4f}" for t in info["student_timesteps"])
    routed = info["routing"]["kind"] == "dar"
    lora = info["lora"]
    return f"""# DMD2 student ({info['model_class']}, {len(info['student_timesteps'])} step(s))

Distilled with dmd-dar from `{info['teacher']}` at {info['height']}x{info['width']}.
Routing: **{info['routing']['kind']}**{' (DAR: the routers are part of the model)' if routed else ''}.

## With dmd-dar (the student as trained)

    dmd-dar sample checkpoint=<this folder> prompt="a red fox in the snow"

or in Python: `net, info = dmd_dar.t2i.load_student(folder)`. The VAE and text encoders come from the teacher
pipeline named above (`teacher` in `{INFO_FILE}`).

## With plain diffusers

`transformer/` is a regular diffusers model folder{' with the LoRA merged in' if lora else ''}:

    transformer = {info['model_class']}.from_pretrained("<this folder>/transformer")
    pipe = DiffusionPipeline.from_pretrained("{info['teacher']}", transformer=transformer)
{'''
**These weights alone are not the student.** Plain diffusers runs the transformer with its stock residual
connections and does not know the DAR routers in `dar_router.safetensors`; you get the residual twin of the
student, whose images differ from the student's. Use dmd-dar (above) for the student itself.
''' if routed else ''}
Sampling is DMD2 few-step sampling at the student times (t in [0, 1], shift already applied): {times}
(diffusers timesteps: {', '.join(f"{t:.1f}" for t in info['diffusers_timesteps'])}). Each step predicts x0 and
re-noises it with fresh noise; for flow models `scheduler/` is a FlowMatchEulerDiscreteScheduler configured to do
exactly that (`stochastic_sampling=true`, shift 1): pass `sigmas=[{times}]`, `num_inference_steps=
{len(info['student_timesteps'])}` and no CFG (`guidance_scale=1`{'; Flux: the embedded guidance input is ' + str(info['embedded_guidance']) if info['embedded_guidance'] is not None else ''}).
{f'''
## LoRA

`lora/` holds the unmerged adapter (rank {lora['rank']}, alpha {lora['alpha']}) in peft's format
(`adapter_config.json` + `adapter_model.safetensors`), to apply to the teacher's transformer.
''' if lora else ''}"""

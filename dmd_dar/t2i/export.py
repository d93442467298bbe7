"""Exported T2I students: a folder that diffusers, peft and ``dmd-dar sample`` can each load.

    <export>/lora/                   (LoRA runs) the adapter: peft's format (adapter_model.safetensors +
                                     adapter_config.json) and diffusers' (pytorch_lora_weights.safetensors, for
                                     ``pipe.load_lora_weights(<export>/lora)`` on the teacher pipeline)
    <export>/transformer/            diffusers model folder (config.json + safetensors), LoRA merged: always for
                                     full fine-tuning, for LoRA runs only with ``export.merge=true`` (a merged copy
                                     of a 20B base is 41 GB). Plain ``<ModelClass>.from_pretrained`` loads these
                                     weights WITHOUT the DAR routers: that is the residual twin of the student, not
                                     the student (unless the student was trained with routing.kind=residual)
    <export>/dar_router.safetensors  the routers' parameters (``router.*``, ``text_router.*``; empty for residual)
    <export>/scheduler/              FlowMatchEulerDiscreteScheduler config for DMD2 few-step sampling (flow
                                     families): stochastic_sampling=true, shift 1 (the student times below are
                                     already shifted)
    <export>/dmd_dar_t2i.json        family, model class, routing config, few-step times, resolution, guidance,
                                     the teacher pipeline the VAE / text encoders (and a LoRA's base) come from,
                                     text-cache identity
    <export>/README.md               how to load it with and without dmd-dar

``load_student(folder)`` rebuilds the DAR student (``T2INet`` around ``wrap_with_dar(transformer)`` with the
routers loaded; without ``transformer/``, the teacher's transformer with the adapter merged);
``dmd-dar sample checkpoint=<export> prompt="..."`` samples it (``dmd_dar.t2i.sample``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i.families import FAMILIES, T2INet
from dmd_dar.t2i.loading import resolve_source, torch_dtype
from dmd_dar.t2i.lora import ADAPTER, has_lora, merge_lora, merged_state_dict, save_lora
from dmd_dar.utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, load_safetensors

FORMAT = "dmd_dar.t2i.student/1"
INFO_FILE = "dmd_dar_t2i.json"
ROUTER_FILE = "dar_router.safetensors"
ROUTER_PREFIXES = ("router.", "text_router.")


def export_student(net, folder: Path, task, merge: bool | None = None) -> Path:
    """Write ``net`` (a ``T2INet`` around a DAR-wrapped transformer: LoRA-adapted, on the shared base, or fully
    fine-tuned) as an export folder. ``merge``: also write the merged transformer of a LoRA run (default
    ``export.merge``). The merged copy is written last, after a disk-space check, so that a merge that cannot fit
    still leaves the adapter export behind (and says so)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merge = task.cfg.export.merge if merge is None else merge
    wrapped = net.model
    base = wrapped.transformer
    slot = getattr(net, "slot", None)  # an AdapterNet on the shared base: bind its matrices (the EMA's) first
    if slot is not None:
        net.bind()
    else:
        slot = ADAPTER if has_lora(base) else None
    if slot is not None:
        save_lora(base, folder / "lora", slot, getattr(task, "pipeline_class", None))
    routers = {k: v.detach().float().cpu().contiguous() for k, v in wrapped.state_dict().items()
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
                  "folder": "lora"} if slot is not None else None),
        "merged": slot is None or bool(merge),
    }
    atomic_write_json(info, folder / INFO_FILE)
    atomic_write_text(_readme(info), folder / "README.md")
    if info["merged"]:
        _write_merged(base, slot, folder / "transformer", task.dtype, check_space=slot is not None)
    return folder


def _write_merged(base, slot: str | None, out: Path, dtype: torch.dtype, check_space: bool) -> None:
    """The transformer with adapter ``slot`` merged (or as it is: full fine-tuning) as a diffusers model folder,
    tensor by tensor on the CPU (no second copy on the device)."""
    if check_space:
        need = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) * \
            torch.empty((), dtype=dtype).element_size()
        free = shutil.disk_usage(out.parent).free
        if need > free:
            raise UserError(f"export.merge=true: the merged transformer needs {need / 1e9:.1f} GB and "
                            f"{out.parent} has {free / 1e9:.1f} GB free; the adapter and the routers are exported "
                            f"in {out.parent} (sample it as it is), or free space and export again, or set "
                            f"export.merge=false")
    out.mkdir(parents=True, exist_ok=True)
    base.save_config(str(out))
    atomic_save_safetensors(merged_state_dict(base, slot, dtype), out / "diffusion_pytorch_model.safetensors")


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
    if (folder / "transformer").is_dir():
        transformer = cls.from_pretrained(str(folder / "transformer"), dtype=dtype)
    else:  # an unmerged LoRA export: the teacher's transformer with the adapter merged here
        transformer = _teacher_with_adapter(cls, info, folder / "lora", dtype)
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


def _teacher_with_adapter(cls, info: dict, lora: Path, dtype: torch.dtype):
    # lazy: peft imports transformers (seconds); only LoRA exports need it
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if not (lora / "adapter_model.safetensors").is_file():
        raise UserError(f"{lora.parent} has neither transformer/ nor lora/adapter_model.safetensors; re-export "
                        f"the student")
    source, local_only = resolve_source(info["teacher"], info.get("local_files_only", False))
    try:
        transformer = cls.from_pretrained(source, subfolder="transformer", revision=info.get("revision"),
                                          local_files_only=local_only, dtype=dtype)
    except OSError as exc:
        raise UserError(f"{lora.parent} is an unmerged LoRA export and its base {info['teacher']} cannot be loaded "
                        f"({str(exc).splitlines()[0][:200]}); make the teacher available, or export with "
                        f"export.merge=true") from exc
    cfg = json.loads((lora / "adapter_config.json").read_text())
    inject_adapter_in_model(LoraConfig(**{k: cfg[k] for k in ("r", "lora_alpha", "target_modules")}), transformer)
    set_peft_model_state_dict(transformer, load_safetensors(lora / "adapter_model.safetensors"))
    return merge_lora(transformer)


def _readme(info: dict) -> str:
    times = ", ".join(f"{t:.4f}" for t in info["student_timesteps"])
    routed = info["routing"]["kind"] == "dar"
    lora = info["lora"]
    if info.get("merged", True):
        plain = (f"`transformer/` is a regular diffusers model folder{' with the LoRA merged in' if lora else ''}:\n\n"
                 f"    transformer = {info['model_class']}.from_pretrained(\"<this folder>/transformer\")\n"
                 f"    pipe = DiffusionPipeline.from_pretrained(\"{info['teacher']}\", transformer=transformer)\n")
    else:
        plain = ("The adapter goes onto the teacher pipeline (no merged copy was written; export.merge=true writes "
                 "one):\n\n"
                 f"    pipe = DiffusionPipeline.from_pretrained(\"{info['teacher']}\")\n"
                 "    pipe.load_lora_weights(\"<this folder>/lora\")\n")
    return f"""# DMD2 student ({info['model_class']}, {len(info['student_timesteps'])} step(s))

Distilled with dmd-dar from `{info['teacher']}` at {info['height']}x{info['width']}.
Routing: **{info['routing']['kind']}**{' (DAR: the routers are part of the model)' if routed else ''}.

## With dmd-dar (the student as trained)

    dmd-dar sample checkpoint=<this folder> prompt="a red fox in the snow"

or in Python: `net, info = dmd_dar.t2i.load_student(folder)`. The VAE and text encoders come from the teacher
pipeline named above (`teacher` in `{INFO_FILE}`).

## With plain diffusers

{plain}{'''
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
(`adapter_config.json` + `adapter_model.safetensors`), to apply to the teacher's transformer, and in diffusers'
(`pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights`).
''' if lora else ''}"""

"""LoRA on a diffusers transformer through peft (the diffusers ``add_adapter`` path), merge and export.

Only the LoRA matrices of the transformer train (plus the DAR routers, which live beside the transformer and train
fully); the base weights stay frozen in the storage dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmd_dar.errors import UserError
from dmd_dar.utils.io import atomic_save_safetensors, atomic_write_json

ADAPTER = "default"


def add_lora(transformer: nn.Module, rank: int, alpha: float | None, targets: list[str] | tuple[str, ...]) -> None:
    """Inject LoRA (rank, alpha) into the linear layers named by ``targets`` and freeze everything else."""
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()}
    names = {name for name, _ in transformer.named_modules()}
    usable = [t for t in targets if t in present or any(n.endswith("." + t) for n in names)]
    if not usable:
        raise UserError(f"t2i.lora_targets={list(targets)} match no module of {type(transformer).__name__}; "
                        f"name its linear layers (e.g. to_q, to_k, to_v, to_out.0)")
    transformer.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=usable,
                     init_lora_weights=True)
    transformer.add_adapter(cfg, adapter_name=ADAPTER)
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)


def has_lora(module: nn.Module) -> bool:
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER)


def save_lora(transformer: nn.Module, folder: Path) -> Path:
    """peft's adapter format: ``adapter_model.safetensors`` + ``adapter_config.json`` (load with
    ``peft.inject_adapter_in_model`` + ``peft.set_peft_model_state_dict``, or diffusers' ``load_lora_adapter``)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(transformer).items()}
    atomic_save_safetensors(state, folder / "adapter_model.safetensors")
    cfg = transformer.peft_config[ADAPTER].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    atomic_write_json(json.loads(json.dumps(cfg, default=str)), folder / "adapter_config.json")
    return folder


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``module`` into its base layer and put the base layer back (in place)."""
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            sub.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(module):
            delattr(module, attr)
    return module

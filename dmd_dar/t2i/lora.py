"""LoRA on a diffusers transformer through peft (the diffusers ``add_adapter`` path), merge and export; and the
shared frozen base of LoRA runs (``SharedBase``).

Only the LoRA matrices of the transformer train (plus the DAR routers, which live beside the transformer and train
fully); the base weights stay frozen in the storage dtype.

Shared base (``t2i.lora_rank > 0``, ``t2i.shared_base=true``): one frozen transformer carries two named peft
adapters, the student's and the fake score's; the teacher is the same transformer with adapters disabled. Each
network that runs on it owns its adapter's LoRA matrices as its own submodules (``SharedBase.leaves``), so its
``parameters()`` / ``state_dict()`` are exactly what it trains (an optimizer, DDP, the EMA and checkpoints see
no base tensor), and before every forward it binds them into its adapter slot and makes that slot the only
active one (``SharedBase.use``). Binding, not only selecting, is what lets a copy (the EMA of the student) run
with its own matrices in the student's slot. Under activation checkpointing a sublayer is recomputed during
the backward, when another network may be bound: ``checkpointable`` re-binds the forward's adapter first.

Every forward on the base runs inside ``SharedBase.run``, a call of ``SharedBase.root`` (``SharedRoot``: the
base transformer and the routers of the trained networks in one module). Under FSDP that module is what gets
wrapped, once: its attention / feed-forward units are sharded with the frozen weights and both adapters' LoRA
matrices inside, and everything else (embedders, adaLN, heads, routers) is the root unit, which FSDP gathers
only around a call of the root itself; the DAR wrappers run the base sublayer by sublayer, never through its
``forward``, so the call has to be the root's. Binding then only selects the slot (the trained networks' leaves
are the slot's own matrices: nothing is swapped inside a flattened unit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dmd_dar.errors import UserError
from dmd_dar.utils.io import atomic_save_safetensors, atomic_write_json

ADAPTER = "default"


def add_lora(transformer: nn.Module, rank: int, alpha: float | None, targets: list[str] | tuple[str, ...],
             adapter_name: str = ADAPTER, name_key: str = "t2i.student_adapter") -> None:
    """Inject LoRA (rank, alpha) named ``adapter_name`` into the linear layers named by ``targets``; every
    non-LoRA weight is frozen. ``name_key``: the config key that names the adapter (for the collision message)."""
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft import LoraConfig

    existing = list(getattr(transformer, "peft_config", {}) or {})
    if adapter_name in existing:
        raise UserError(f"{name_key}={adapter_name!r}: {type(transformer).__name__} already has an adapter of that "
                        f"name (adapters: {', '.join(existing)}); choose another name with {name_key}=<name>")
    present = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()}
    names = {name for name, _ in transformer.named_modules()}
    usable = [t for t in targets if t in present or any(n.endswith("." + t) for n in names)]
    if not usable:
        raise UserError(f"t2i.lora_targets={list(targets)} match no module of {type(transformer).__name__}; "
                        f"name its linear layers (e.g. to_q, to_k, to_v, to_out.0)")
    transformer.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=usable,
                     init_lora_weights=True)
    if hasattr(transformer, "add_adapter"):
        transformer.add_adapter(cfg, adapter_name=adapter_name)
    else:  # a diffusers model without PeftAdapterMixin (PixArt): peft directly, recording the config the same way
        # lazy: peft imports transformers (seconds); only LoRA runs need it
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfg, transformer, adapter_name=adapter_name)
        transformer.peft_config = {**(getattr(transformer, "peft_config", None) or {}), adapter_name: cfg}
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)


def has_lora(module: nn.Module) -> bool:
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dict(transformer: nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def adapter_names(transformer: nn.Module) -> list[str]:
    """The peft adapters injected into ``transformer`` (empty without any)."""
    return list(getattr(transformer, "peft_config", {}) or {})


def save_lora(transformer: nn.Module, folder: Path, adapter_name: str = ADAPTER,
              pipeline_class: type | None = None) -> Path:
    """peft's adapter format: ``adapter_model.safetensors`` + ``adapter_config.json`` (load with
    ``peft.inject_adapter_in_model`` + ``peft.set_peft_model_state_dict``); with ``pipeline_class`` also diffusers'
    LoRA file ``pytorch_lora_weights.safetensors`` (keys ``transformer.*`` and the adapter config as metadata),
    which ``pipe.load_lora_weights(folder)`` loads into that pipeline's transformer."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(transformer, adapter_name).items()}
    atomic_save_safetensors(state, folder / "adapter_model.safetensors")
    cfg = transformer.peft_config[adapter_name].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    cfg = json.loads(json.dumps(cfg, default=str))
    atomic_write_json(cfg, folder / "adapter_config.json")
    if pipeline_class is not None and hasattr(pipeline_class, "save_lora_weights"):
        pipeline_class.save_lora_weights(str(folder), transformer_lora_layers=state, safe_serialization=True,
                                         transformer_lora_adapter_metadata=cfg)
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


def _tuner_layers(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    # lazy: peft imports transformers (seconds); only LoRA runs need it
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]


def _leaf_key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


class SharedRoot(nn.Module):
    """The module that owns every tensor on a shared base: the transformer and, under ``networks``, the DAR
    wrappers (routers) of the networks trained on it. ``forward(fn, *args)`` is ``fn(*args)``: called as the
    root of an FSDP wrapping, it runs ``fn`` with the root unit's parameters gathered (module docstring)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.networks = nn.ModuleDict()

    def forward(self, fn: Callable, *args):
        return fn(*args)


class SharedBase:
    """The one frozen base transformer of a LoRA run and its adapter slots (module docstring).

    Not an ``nn.Module`` on purpose: a network holds it without registering the base, and ``copy.deepcopy`` of a
    network (the EMA) keeps pointing at the same base (``__deepcopy__`` returns the holder itself).

    ``root``: the ``SharedRoot`` every forward is called through; the training strategy replaces it with its
    prepared (FSDP-wrapped) form, and ``sharded`` says so.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer.requires_grad_(False).eval()
        self.root: nn.Module = SharedRoot(self.transformer)
        self.sharded = False
        self._bound: tuple[int, str] | None = None  # (id of the bound leaves, slot); None: adapters off
        self._bound_leaves: nn.ModuleDict | None = None
        self.slots: dict[str, nn.ModuleDict] = {}  # adapter name -> the matrices it was injected with
        self._layers: list[tuple[str, nn.Module]] = []
        # What run_sublayer (dmd_dar.backbones.common) calls around a checkpointed sublayer.
        transformer.dmd_dar_checkpointable = self.checkpointable

    def __deepcopy__(self, memo):
        return self

    def add_adapter(self, slot: str, rank: int, alpha: float | None, targets, name_key: str) -> nn.ModuleDict:
        """Inject adapter ``slot`` and return its LoRA matrices as ``{layer path: {"lora_A", "lora_B"}}``
        (trainable; the path's dots written ``__``)."""
        add_lora(self.transformer, rank, alpha, targets, adapter_name=slot, name_key=name_key)
        self.transformer.requires_grad_(False)
        self._layers = _tuner_layers(self.transformer)
        self._bound = None
        leaves = nn.ModuleDict({_leaf_key(path): nn.ModuleDict({"lora_A": layer.lora_A[slot],
                                                                "lora_B": layer.lora_B[slot]})
                                for path, layer in self._layers if slot in layer.lora_A})
        self.slots[slot] = leaves
        for trained in self.slots.values():  # peft's add_adapter froze the adapters added before this one
            trained.requires_grad_(True)
        return leaves

    def register(self, slot: str, wrapped: nn.Module) -> None:
        """Make the routers of the network trained in ``slot`` part of ``root`` (before it is prepared)."""
        self.root.networks[slot] = wrapped

    def run(self, fn: Callable, *args):
        """``fn(*args)`` (a forward on the base) called through ``root`` (module docstring)."""
        return self.root(fn, *args)

    def use(self, leaves: nn.ModuleDict | None, slot: str | None) -> None:
        """Run the next forward with ``leaves`` bound into adapter ``slot`` as the only active adapter; with
        ``leaves=None`` with every adapter off (the teacher). Cheap when nothing changes."""
        want = None if leaves is None else (id(leaves), slot)
        if want == self._bound:
            return
        self._bound_leaves = leaves
        for path, layer in self._layers:
            if leaves is None:
                layer._disable_adapters = True  # not enable_adapters(): that also flips requires_grad
                continue
            layer._disable_adapters = False
            layer._active_adapter = [slot]  # not set_adapter(): that also flips requires_grad
            pair = leaves[_leaf_key(path)]
            if layer.lora_A[slot] is not pair["lora_A"]:
                if self.sharded:  # a flattened FSDP unit cannot take other modules
                    raise RuntimeError("binding other LoRA matrices into a sharded shared base (only the trained "
                                       "networks run on it; build copies on a standalone base)")
                layer.lora_A[slot], layer.lora_B[slot] = pair["lora_A"], pair["lora_B"]
        self._bound = want

    def checkpointable(self, fn: Callable) -> Callable:
        """``fn`` that first re-binds the adapter bound now (for its recomputation in the backward)."""
        bound = self._bound
        if bound is None:
            return fn
        leaves, slot = self._bound_leaves, bound[1]

        def run(*args):
            self.use(leaves, slot)
            return fn(*args)

        return run


def weights_digest(transformer: nn.Module) -> str:
    """sha256 of a base transformer's weight names, shapes, dtypes and a strided sample of up to 4096 values of
    each (LoRA matrices left out): what a checkpoint records so that a resume against another base is refused.
    Hashing every value of a 20B model would take minutes; two different checkpoints agreeing on every sampled
    value do not occur in practice."""
    h = hashlib.sha256()
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def merged_state_dict(transformer: nn.Module, adapter_name: str | None, dtype: torch.dtype
                      ) -> dict[str, torch.Tensor]:
    """The stock state dict of ``transformer`` (peft's ``base_layer`` names undone, every LoRA matrix left out)
    with adapter ``adapter_name`` merged into its layers (``None``: as it is), on the CPU in ``dtype``, one tensor
    at a time."""
    layers = dict(_tuner_layers(transformer))
    out = {}
    for name, t in transformer.state_dict().items():
        if "lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner == "base_layer" or owner.endswith(".base_layer"):
            owner = owner[: -len("base_layer")].rstrip(".")
            layer = layers[owner]
            if adapter_name is not None and leaf == "weight" and adapter_name in layer.lora_A:
                t = t + layer.get_delta_weight(adapter_name).to(t.dtype)
            name = f"{owner}.{leaf}"
        out[name] = t.detach().to("cpu", dtype).contiguous()
    return out

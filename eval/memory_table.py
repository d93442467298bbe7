"""Memory per process of DMD2 on real teachers, before renting the GPUs: the estimate ``dmd-dar distill`` prints at
start (``dmd_dar.t2i.memory.estimate_for``), for each published architecture built from its ``config.json`` on the
meta device (no weights, no download), with the networks built by the trainer's own builders
(``dmd_dar.t2i.task.network_on_base`` / ``copied_network``) from the resolved ``configs/t2i`` recipe.

    python eval/memory_table.py                 # the README table (markdown), ~1 min on CPU
    python eval/memory_table.py --detail        # plus every estimate's per-component breakdown
    python eval/memory_table.py --json out.json

Rows: 1024^2, batch 1, LoRA rank 64, gradient checkpointing on / off, DAR student on (the recipe's routing) / off
(residual twin); columns: one process on one GPU (one frozen base shared by teacher, student and fake score) and
FSDP over 8 processes (the same shared base, sharded once over the 8 with both adapters; stored in the training
dtype, as FSDP's one-dtype units need, with the gradient buffers and gathered units FSDP adds: see
``dmd_dar.t2i.memory``), plus the training checkpoint and the exported adapter on disk. SD3.5-large uses
SD3.5-medium's recipe (configs/t2i/sd35_medium.yaml); PixArt-Sigma's recipe fine-tunes fully and is overridden to LoRA 64 here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmd_dar.cli import find_command, resolve  # noqa: E402
from dmd_dar.routing import RoutingConfig  # noqa: E402
from dmd_dar.t2i import memory as M  # noqa: E402
from dmd_dar.t2i.families import family_for  # noqa: E402
from dmd_dar.t2i.lora import SharedBase  # noqa: E402
from dmd_dar.t2i.task import copied_network, network_on_base  # noqa: E402

# transformer/config.json of each published model (the fields that differ from the diffusers class defaults).
ARCHITECTURES = {
    "SD3.5-medium": ("SD3Transformer2DModel", "sd35_medium.yaml", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "SD3.5-large": ("SD3Transformer2DModel", "sd35_medium.yaml", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "Flux-dev": ("FluxTransformer2DModel", "flux_dev.yaml", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "PixArt-Sigma": ("PixArtTransformer2DModel", "pixart_sigma.yaml", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
        patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, interpolation_scale=2, use_additional_conditions=False)),
    "Qwen-Image": ("QwenImageTransformer2DModel", "qwen_image.yaml", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
}
LATENT_DOWNSAMPLE = 8  # every VAE here: 1024^2 pixels -> 128^2 latents
TARGETS = {"Qwen-Image": 70.0, "Flux-dev": 44.0}  # GiB, one GPU, DAR student, checkpointing (the issue's targets)


def _meta_transformer(class_name: str, config: dict, dtype: torch.dtype):
    # lazy: diffusers takes seconds to import; only this script needs the classes by name
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name).from_config(config)
    return model.to(dtype).requires_grad_(False).eval()


def _tokens(class_name: str, config: dict, cfg) -> int:
    """Image tokens at the recipe's resolution plus text tokens, as ``DiffusersT2ITask`` counts them."""
    family = family_for(class_name)
    h, w = cfg.t2i.height // LATENT_DOWNSAMPLE, cfg.t2i.width // LATENT_DOWNSAMPLE
    patch = 2 if family.packed else int(config.get("patch_size", 1))
    return (h // patch) * (w // patch) + (cfg.t2i.max_sequence_length or family.default_max_sequence_length)


def networks(class_name: str, config: dict, cfg, shared: bool):
    """(teacher transformer, student, fake score) on the meta device, as the trainer builds them."""
    family = family_for(class_name)
    dtype = getattr(torch, cfg.t2i.dtype)
    train_dtype = getattr(torch, cfg.t2i.train_dtype)
    transformer = _meta_transformer(class_name, config, dtype)
    guidance = cfg.t2i.embedded_guidance if config.get("guidance_embeds") else None
    nets = cfg.networks
    if shared:
        base = SharedBase(transformer)
        build = lambda routing, role: network_on_base(base, role, routing, cfg.t2i, family, guidance,  # noqa: E731
                                                      train_dtype, "meta", False)
    else:
        build = lambda routing, role: copied_network(transformer, routing, cfg.t2i, family, guidance,  # noqa: E731
                                                     train_dtype, False)
    with torch.device("meta"):  # routers and LoRA matrices too: nothing is allocated
        return transformer, build(nets.student_routing, "student"), build(nets.fake_routing, "fake")


def rows(names: list[str], detail: bool = False) -> list[dict]:
    out = []
    for name in names:
        class_name, layer, config = ARCHITECTURES[name]
        base_cfg = resolve(find_command("distill"), [f"t2i/{layer}"], [
            "t2i.height=1024", "t2i.width=1024", "run.batch_size=1", "t2i.lora_rank=64", "t2i.lora_alpha=64"])
        tokens = _tokens(class_name, config, base_cfg)
        for dar in (True, False):
            cfg = base_cfg
            if not dar:
                cfg = replace(cfg, networks=replace(cfg.networks, student_routing=RoutingConfig(kind="residual")))
            built = networks(class_name, config, cfg, True)
            for checkpointing in (True, False):
                common = dict(storage_dtype=getattr(torch, cfg.t2i.dtype),
                              train_dtype=getattr(torch, cfg.t2i.train_dtype),
                              mixed_precision=cfg.run.mixed_precision, tokens=tokens, batch=cfg.run.batch_size,
                              checkpointing=checkpointing, ema=cfg.ema_decay > 0)
                one = M.estimate_for(*built, **common)
                # FSDP flattens frozen base and trained LoRA into one buffer per unit, of one dtype: the launch
                # stores the base in the training dtype (configs/accelerate/fsdp_8gpu.yaml: t2i.dtype=float32)
                fsdp = M.estimate_for(*built, **{**common, "storage_dtype": common["train_dtype"]}, world_size=8,
                                      sharded=True)
                disk = M.disk_estimate(*built[1:], storage_dtype=common["storage_dtype"],
                                       train_dtype=common["train_dtype"], ema=common["ema"])
                row = {"model": name, "dar_student": dar, "checkpointing": checkpointing,
                       "params_B": sum(p.numel() for p in built[0].parameters() if not p.requires_grad) / 1e9,
                       "one_gpu_GiB": one["total"], "fsdp8_GiB": fsdp["total"],
                       "checkpoint_GB": disk["checkpoint"], "adapter_GB": disk["exported adapter"],
                       "one_gpu": one, "fsdp8": fsdp}
                out.append(row)
                if detail:
                    print(M.format_estimate(one, f"{name}, DAR {dar}, checkpointing {checkpointing}, one GPU:"))
                    print(M.format_estimate(fsdp, f"{name}, DAR {dar}, checkpointing {checkpointing}, FSDP x8:"))
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| model | base params | DAR student | checkpointing | 1 GPU (shared base) | FSDP x8 (shared base) | "
             "checkpoint | exported adapter |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['params_B']:.1f}B | {'on' if r['dar_student'] else 'off'} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['one_gpu_GiB']:.1f} GiB | {r['fsdp8_GiB']:.1f} GiB "
                     f"| {r['checkpoint_GB']:.1f} GB | {r['adapter_GB']:.2f} GB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument("--detail", action="store_true", help="print every estimate's components")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    table = rows(args.models, args.detail)
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DMD2 at real scale, residual vs DAR student: step time and peak GPU memory of each, and the ratios.

An SD3.5-medium-sized ``SD3Transformer2DModel`` (24 joint blocks, 1536 wide, dual attention in blocks 0-12, 2.5B
parameters) with random weights is the frozen teacher, in bf16; 512x512 images are 64x64 latents (1024 tokens) with
333 text tokens (77 CLIP + 256 T5) of random embeddings. For each student routing (residual twin, then DAR
static_t dense) the script builds the student and a residual fake score as ``dmd-dar distill`` does: with LoRA
(rank 64 by default; routers train fully) on ONE shared frozen base (``dmd_dar.t2i.task.network_on_base``;
``--copies``: ``wrap_with_dar`` copies of the teacher, ``copied_network``), and runs ``--steps`` DMD2 iterations
exactly as
``dmd-dar distill`` does (one generator update with backward simulation over a 4-step schedule + one fake-score
update per iteration, CFG 4.5 two-pass real score, shift 3.0, bf16 autocast), through ``dmd_dar.distill.method.DMD2``
and the T2I network adapter ``dmd_dar.t2i.families.T2INet``. The EMA copy is left out (the same for both).

    python eval/gpu_dmd2_realscale.py                    # H100/H200: ~5 min for both variants
    python eval/gpu_dmd2_realscale.py --checkpointing    # with gradient checkpointing
    python eval/gpu_dmd2_realscale.py --dry-run          # tiny config on CPU, 2 steps: checks the script only

Step time is the median over the steps after ``--warmup``; peak memory is ``torch.cuda.max_memory_allocated`` over
the whole variant (reset between variants), printed beside the start-of-run estimate of the same networks
(``dmd_dar.t2i.memory.estimate_for``, without an EMA: the script keeps none). Results print as a table and go to
``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmd_dar.diffusion.paths import make_path  # noqa: E402
from dmd_dar.diffusion.samplers import student_timesteps  # noqa: E402
from dmd_dar.distill.config import MethodConfig, T2IConfig  # noqa: E402
from dmd_dar.distill.denoiser import Denoiser  # noqa: E402
from dmd_dar.distill.method import DMD2, frozen  # noqa: E402
from dmd_dar.models import param_groups  # noqa: E402
from dmd_dar.routing import RoutingConfig  # noqa: E402
from dmd_dar.t2i import memory as M  # noqa: E402
from dmd_dar.t2i.families import FAMILIES, T2INet  # noqa: E402
from dmd_dar.t2i.lora import SharedBase  # noqa: E402
from dmd_dar.t2i.task import TeacherNet, copied_network, network_on_base  # noqa: E402

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the median step time")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--lora-rank", type=int, default=64, help="0: train every weight (in --dtype)")
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--copies", action="store_true", help="LoRA on three copies of the base instead of one shared")
    p.add_argument("--variants", default="residual,dar")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--dry-run", action="store_true", help="tiny transformer on CPU, float32, 2 steps")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup, args.batch, args.resolution, args.text_tokens = 2, 1, 2, 64, 5
    return args


def build_teacher(cfg: dict, dtype: torch.dtype, device) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg)
    with torch.no_grad():  # adaLN-Zero gates and the head start at zero: make the function non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for p in model.parameters():  # per tensor: ModelMixin.to() warns about fp32-pinned modules
            p.data = p.data.to(dtype)
    return model.requires_grad_(False).eval()


def networks(teacher: torch.nn.Module, routing: RoutingConfig, args, dtype: torch.dtype
             ) -> tuple[TeacherNet, T2INet, T2INet]:
    """(teacher net, student, residual fake score) as ``dmd-dar distill`` builds them (module docstring). A
    shared base gets its adapters injected here, so each variant starts from a fresh teacher."""
    tc = T2IConfig(lora_rank=args.lora_rank, lora_alpha=args.lora_rank)
    family, device = FAMILIES["sd3"], next(teacher.parameters()).device
    fake_routing = RoutingConfig(kind="residual")
    base = None
    if args.lora_rank > 0 and not args.copies:
        base = SharedBase(teacher)
        student, fake = (network_on_base(base, role, r, tc, family, None, torch.float32, device, args.checkpointing)
                         for role, r in (("student", routing), ("fake", fake_routing)))
    else:  # full fine-tuning trains in --dtype (the routers in fp32), as t2i.train_dtype=<dtype> would
        train_dtype = torch.float32 if args.lora_rank > 0 else dtype
        student, fake = (copied_network(teacher, r, tc, family, None, train_dtype, args.checkpointing)
                         for r in (routing, fake_routing))
        for net in (student, fake):
            for p in net.model.router.parameters():
                p.data = p.data.float()
    return TeacherNet(teacher, family, None, base), student.to(device).train(), fake.to(device).train()


def run_variant(kind: str, args, teacher, cfg: dict, device, dtype) -> dict:
    latent = args.resolution // 8
    channels = cfg["in_channels"]
    routing = RoutingConfig(kind=kind, query="static_t", chunk_size=1)
    teacher_net, student, fake = networks(teacher, routing, args, dtype)
    tokens = (latent // 2) ** 2 + args.text_tokens
    estimate = M.estimate_for(teacher, student, fake, storage_dtype=dtype, train_dtype=torch.float32,
                              mixed_precision="bf16" if dtype == torch.bfloat16 else "no", tokens=tokens,
                              batch=args.batch, checkpointing=args.checkpointing, ema=False)
    g_opt = torch.optim.AdamW(param_groups(student, 5e-6, 1e-4, 0.01), lr=5e-6)
    f_opt = torch.optim.AdamW(param_groups(fake, 2e-6, None, 0.01), lr=2e-6)
    path = make_path("flow", "velocity")
    shift = 3.0
    null = {"prompt_embeds": torch.zeros(1, args.text_tokens, cfg["joint_attention_dim"], device=device, dtype=dtype),
            "pooled_prompt_embeds": torch.zeros(1, cfg["pooled_projection_dim"], device=device, dtype=dtype)}
    method = DMD2(MethodConfig(guidance_scale=4.5, student_steps=args.student_steps, ttur=1),
                  Denoiser(student, path, lambda c: null), Denoiser(fake, path, lambda c: null),
                  Denoiser(teacher_net, path, lambda c: null), student_timesteps(args.student_steps, shift=shift),
                  shift=shift)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_router = sum(p.numel() for p in student.model.router.parameters())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    times, losses = [], []
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(1000 + step)
        shared = torch.Generator().manual_seed(2000 + step)
        b = args.batch
        noise = torch.randn(b, channels, latent, latent, generator=gen).to(device)
        cond = {"prompt_embeds": torch.randn(b, args.text_tokens, cfg["joint_attention_dim"], generator=gen)
                .to(device, dtype),
                "pooled_prompt_embeds": torch.randn(b, cfg["pooled_projection_dim"], generator=gen).to(device, dtype)}
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            x_in, t_in = method.generator_input(noise, cond, gen, shared)
            x = method.generate(x_in, t_in, cond)
            loss, logs, _ = method.generator_loss(x, cond, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 10.0)
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)
        with autocast, frozen(student):
            c_loss, c_logs = method.critic_loss(x.detach(), cond, gen)
        c_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in fake.parameters() if p.requires_grad], 10.0)
        f_opt.step()
        f_opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append((logs["gen/dm_loss"], c_logs["critic/fake_loss"]))
    timed = times[args.warmup:] or times
    result = {"routing": kind, "step_time_s": statistics.median(timed), "step_times_s": times,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda else None,
              "estimate_gib": estimate["total"], "estimate": estimate,
              "trainable_params": n_train, "router_params": n_router,
              "final_losses": {"dm": losses[-1][0], "fake": losses[-1][1]},
              "finite": all(torch.isfinite(torch.tensor(v)).all() for v in losses)}
    del student, fake, g_opt, f_opt, method
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    cfg = TINY if args.dry_run else SD35_MEDIUM
    teacher = build_teacher(cfg, dtype, device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "config": "tiny" if args.dry_run else "sd3.5-medium", "teacher_params": sum(
                   p.numel() for p in teacher.parameters()), "args": vars(args), "variants": {}}
    for n, kind in enumerate(args.variants.split(",")):
        if n and args.lora_rank > 0 and not args.copies:  # the shared base carries the last variant's adapters
            del teacher
            gc.collect()
            teacher = build_teacher(cfg, dtype, device)
        results["variants"][kind] = run_variant(kind, args, teacher, cfg, device, dtype)
    v = results["variants"]
    print(f"\nDMD2, {results['config']} transformer ({results['teacher_params'] / 1e9:.2f}B), {args.resolution}^2, "
          f"batch {args.batch}, LoRA {args.lora_rank or 'off'} ({'copies' if args.copies else 'shared base'}), "
          f"checkpointing {args.checkpointing}, on {results['device']}")
    print(f"{'routing':<10} {'step (s)':>10} {'peak (GiB)':>11} {'estimate (GiB)':>15} {'trainable':>12} "
          f"{'router':>10}")
    for kind, r in v.items():
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{kind:<10} {r['step_time_s']:>10.3f} {peak:>11} {r['estimate_gib']:>15.2f} "
              f"{r['trainable_params']:>12,} {r['router_params']:>10,}")
    if "residual" in v and "dar" in v:
        ratios = {"step_time": v["dar"]["step_time_s"] / v["residual"]["step_time_s"]}
        if v["dar"]["peak_memory_gib"] is not None:
            ratios["peak_memory"] = v["dar"]["peak_memory_gib"] / v["residual"]["peak_memory_gib"]
        results["ratios_dar_over_residual"] = ratios
        print("DAR / residual: " + ", ".join(f"{k} x{val:.3f}" for k, val in ratios.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

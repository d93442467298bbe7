"""How fast does a native SiT learn to make neighbouring patches agree? A compute probe for the embedded teacher.

The embedded teacher (patch 4, d 128, depth 6) renders smooth blobs, sharp shapes, fine stripes and textures well,
but low-frequency stripes, checkers, rings and dots come out as a mosaic of 4x4 patches: its self-attention is close
to uniform (``dmd-dar diagnose checkpoint=assets/teacher``: attention entropy and mean attention distance per block),
so each patch is denoised from its own pixels plus a global average. This script measures how that changes with the
model and the recipe, at a budget this machine can afford: it trains a fresh SiT on ONE procedural class with the
teacher's objective (rectified flow, velocity target, logit-normal t, AdamW, linear warm-up, label dropout 0.1) and
reports, on 128 held-out images of that class with fixed noise,

- the x0 error ``mean (x0_hat - x0)^2`` at t = 0.5 and 0.7 (a denoiser that pooled the whole image would be near
  the Bayes error; one that denoises patch by patch is far above it), and
- per block, the attention entropy (1 = uniform) and the mean attention distance in patches
  (``dmd_dar.analysis.diagnostics.attention_locality``, as ``dmd-dar diagnose`` reports them).

Runs are printed one JSON line each, so several settings can be compared at equal training compute:

    python eval/probe_teacher_compute.py --steps 1500                       # the teacher's size (~8 min on 2 cores)
    python eval/probe_teacher_compute.py --steps 600 --model '{"hidden_size": 192, "depth": 8, "num_heads": 6}'
    python eval/probe_teacher_compute.py --steps 400 --lr 3e-4
    python eval/probe_teacher_compute.py --steps 400 --timesteps uniform

``--cls`` takes several classes (comma-separated; the model is then class-conditional on them, label dropout as in
the teacher) and the errors are also reported per class, e.g. the lattice-like classes with and without the
convolutional MLP (~5 min each):

    python eval/probe_teacher_compute.py --cls checkers,rings,dots --steps 800 --eval-t 0.5,0.7,0.8 \
        --model '{"relative_position_bias": true, "mlp_conv": 3}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dmd_dar.analysis.diagnostics import capture_attention_locality, uniform_attention_distance
from dmd_dar.data.procedural import CLASS_NAMES, ProceduralImages
from dmd_dar.diffusion.objective import denoising_loss
from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.timesteps import sample_timesteps
from dmd_dar.models import ModelConfig, build_model, param_groups

HELDOUT_PER_CLASS = 128


def probe(classes: list[str], steps: int, model_overrides: dict, lr: float, batch: int, timesteps: str, warmup: int,
          seed: int, eval_t: tuple[float, ...] = (0.5, 0.7)) -> dict:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**model_overrides))
    opt = torch.optim.AdamW(param_groups(model, lr), lr=lr, betas=(0.9, 0.999))
    path = make_path("flow", "velocity")
    train = ProceduralImages("train", length=batch * steps, size=model.cfg.image_size, seed=seed, classes=classes)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        x0, y, _ = train.render(range(step * batch, (step + 1) * batch))
        t = sample_timesteps(batch, timesteps)
        loss = denoising_loss(lambda x_t, tt, labels=y: model(x_t, tt, labels), path, x0, torch.randn_like(x0), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - start

    model.eval()
    n_held = HELDOUT_PER_CLASS * len(classes)
    held = ProceduralImages("heldout", length=n_held, size=model.cfg.image_size, seed=seed, classes=classes)
    x0, y, _ = held.render(range(n_held))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    grid = model.cfg.image_size // model.cfg.patch_size
    errors, per_class = {}, {}
    with torch.no_grad():
        for t in eval_t:
            locality: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block; the last t's are reported
            with capture_attention_locality(model, locality):
                x_t = path.add_noise(x0, eps, t)
                x0_hat = path.pred_to_x0(model(x_t, torch.full((n_held,), t), y), x_t, t)
            err = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))  # [N]
            errors[t] = float(err.mean())
            per_class[t] = {CLASS_NAMES[c]: round(float(err[y == c].mean()), 5) for c in sorted(set(y.tolist()))}
    result = {
        "class": ",".join(classes), "steps": steps, "batch": batch, "lr": lr, "timesteps": timesteps,
        "model": model_overrides, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "train_seconds": round(train_s, 1), **{f"x0_mse_t{t}": round(e, 5) for t, e in errors.items()},
        f"attn_entropy_t{eval_t[-1]}": [round(float(e), 3) for e, _ in locality],
        f"attn_distance_t{eval_t[-1]}": [round(float(d), 2) for _, d in locality],
        "attn_distance_uniform": round(uniform_attention_distance(grid), 2),
    }
    if len(classes) > 1:
        result["x0_mse_per_class"] = {str(t): v for t, v in per_class.items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cls", default="stripes_low",
                    help=f"the class(es) to train on, comma-separated; of {', '.join(CLASS_NAMES)}")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--model", default="{}", help="ModelConfig overrides as JSON (default: the embedded teacher)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timesteps", default="logit_normal", choices=["logit_normal", "uniform"])
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-t", default="0.5,0.7", help="noise levels t of the held-out x0 error, comma-separated")
    a = ap.parse_args()
    classes = [c.strip() for c in a.cls.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown or not classes:
        ap.error(f"--cls {a.cls!r}: unknown class(es) {unknown}; choose from {', '.join(CLASS_NAMES)}")
    eval_t = tuple(float(t) for t in a.eval_t.split(","))
    result = probe(classes, a.steps, json.loads(a.model), a.lr, a.batch, a.timesteps, a.warmup, a.seed, eval_t)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

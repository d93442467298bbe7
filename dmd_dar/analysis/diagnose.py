"""``dmd-dar diagnose``: routing and attention diagnostics of an exported native SiT (residual or DAR) on the
procedural data.

Writes ``<out_dir>/diagnostics.json`` (every number, NaN as null) and PNG heatmaps (depth x t) and line plots
(see :mod:`dmd_dar.analysis.diagnostics` for the definitions and :mod:`dmd_dar.analysis.plots` for the figures).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dmd_dar.analysis.diagnostics import diagnose_model
from dmd_dar.analysis.plots import plot_all
from dmd_dar.artifact import load_artifact, resolve_checkpoint
from dmd_dar.data.procedural import CLASS_NAMES, ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.training.seeding import derive_seed
from dmd_dar.utils.device import resolve_device
from dmd_dar.utils.io import atomic_write_json

DEFAULT_T_GRID = [0.01, 0.12, 0.23, 0.34, 0.45, 0.56, 0.67, 0.78, 0.89, 1.0]


@dataclass
class DiagnoseConfig:
    """``dmd-dar diagnose`` settings.

    checkpoint:     an exported model folder (a run's export/, or a packaged asset name such as assets/teacher).
    out_dir:        output folder; default runs/diagnose/<checkpoint folder name>.
    num_samples:    held-out procedural images (the same images and noise at every t).
    t_grid:         timesteps in [0, 1] (1 = pure noise).
    counterfactual: also run the drop-one-sublayer forwards (2 * depth extra forwards per batch and t).
    source_map:     residual models: the per-(source, target) gate-gradient map of the DAR paper's Fig. 3.
    """

    checkpoint: str = "assets/teacher"
    out_dir: str | None = None
    num_samples: int = 256
    t_grid: list[float] = field(default_factory=lambda: list(DEFAULT_T_GRID))
    seed: int = 0
    batch_size: int = 64
    counterfactual: bool = True
    source_map: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise UserError("num_samples and batch_size must be >= 1")
        if not self.t_grid or any(not 0.0 <= float(t) <= 1.0 for t in self.t_grid):
            raise UserError(f"t_grid={list(self.t_grid)} must be a non-empty list of timesteps in [0, 1]")


def diagnosis_batch(model, num_samples: int, seed: int, device: torch.device | str = "cpu"):
    """(x0 [N, 3, H, W], eps, y or None) from the held-out procedural split at the model's resolution."""
    mc = model.cfg
    if mc.in_channels != 3:
        raise UserError(f"diagnose runs on RGB procedural images, but the model takes {mc.in_channels} channels "
                        "(a latent model needs its VAE); use a pixel-space checkpoint")
    classes = None
    if 0 < mc.num_classes < len(CLASS_NAMES):
        classes = CLASS_NAMES[:mc.num_classes]  # labels must be ids the model knows
    data = ProceduralImages("heldout", length=num_samples, size=mc.image_size, seed=seed, classes=classes)
    x0, y, _ = data.render(range(num_samples))
    gen = torch.Generator().manual_seed(derive_seed(seed, "diagnose-noise"))
    eps = torch.randn(x0.shape, generator=gen)
    return x0.to(device), eps.to(device), (y.to(device) if mc.num_classes > 0 else None)


def to_jsonable(x: Any) -> Any:
    """Tensors -> nested lists with NaN/inf as None."""
    if isinstance(x, torch.Tensor):
        return to_jsonable(x.detach().cpu().tolist())
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run(cfg: DiagnoseConfig) -> Path:
    """``dmd-dar diagnose``: routing diagnostics of ``cfg.checkpoint`` -> plots + diagnostics.json."""
    folder = resolve_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device)
    model, meta = load_artifact(folder, device=str(device))
    out = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "diagnose" / folder.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    path = meta.diffusion.make_path()
    x0, eps, y = diagnosis_batch(model, cfg.num_samples, cfg.seed, device)
    res = diagnose_model(model, path, x0, eps, y, cfg.t_grid, batch_size=cfg.batch_size,
                         counterfactual=cfg.counterfactual, source_map=cfg.source_map,
                         progress=lambda it: tqdm(it, desc="diagnose", unit="batch"))
    routing = model.cfg.routing
    name = f"{folder.name} ({'DAR ' + routing.query + f' S={routing.chunk_size}' if routing.is_dar else 'residual'})"
    files = plot_all(res, out, name=name, class_names=meta.class_names)
    record = {
        "checkpoint": str(folder), "role": meta.role, "model": model.cfg.to_dict(),
        "diffusion": asdict(meta.diffusion), "config": asdict(cfg),
        "conventions": {
            "t": "t = 1 is pure noise (docs/CONVENTIONS.md); the same x0, eps, y at every t",
            "z_k": "ModelInternals.block_outputs(): state handed from block k to k+1 (DAR: aggregated input of "
                   "block k+1; last block: the final head input)",
            "rms": "per-token RMS over channels, averaged over samples and tokens",
            "loss": f"model's own denoising MSE ({meta.diffusion.path}/{meta.diffusion.prediction}), mean over "
                    f"all {cfg.num_samples} samples and elements; true labels, no label dropout",
            "grad_rms": "RMS of dL/dz_k of that mean loss (scales as 1/num_samples); grad_rms_per_sample = "
                        "num_samples * grad_rms",
            "gate_drop": "L(v_l := 0) - L per sublayer l (1 = block 1 attention, 2 = block 1 MLP, ...)",
            "gate_grad": "dL/dg_l at g = 1, scalar gate on v_l: sum <dL/dv_l, v_l>",
            "source_importance": "residual only: [target l (row l-1), source i] dL/dg(i->l), gate on v_i in the copy fed "
                                 "to sublayer l only; v_0 = patch embedding; null where i >= l",
            "weights": "DAR only: [aggregator (row l-1 = sublayer l; last row = final), source i] mean weight; "
                       "chunk summaries at the index of the chunk's last output; null where not a source",
            "entropy": "DAR only: normalised routing entropy per aggregator (1 = uniform)",
            "attn_entropy": "per block: self-attention entropy / log(tokens), mean over samples, heads, queries "
                            "(1 = uniform attention)",
            "attn_distance": "per block: mean attention distance in patches; attn_distance_uniform = the value of "
                             "uniform attention on this patch grid",
            "class_loss": "the loss over the samples of each class (class ids as in the model's class_names)",
        },
        "results": res,
        "files": [p.name for p in files],
    }
    atomic_write_json(to_jsonable(record), out / "diagnostics.json")
    print(f"diagnose: {folder} -> {out} ({len(files)} plots, {len(cfg.t_grid)} timesteps, "
          f"{cfg.num_samples} samples)")
    return out

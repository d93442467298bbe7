"""Throughput of the evaluation metrics, in images per second.

- spectral: our torch path (``spectral_stats``) vs the plain numpy reference (``spectral_stats_numpy``), at 256^2
  and 1024^2 (float64, one FFT per image, luma);
- LPIPS: AlexNet trunk (v0.1 lin layers) at 256^2 for several batch sizes. Without the ImageNet weights the trunk
  is random: same architecture, same cost, numbers are valid for throughput only;
- CLIP: image encoding (preprocessing + forward) for several batch sizes. Without local weights a *tiny random*
  open_clip model is used by default (its throughput mostly measures preprocessing, not a real ViT); pass
  ``--clip-model ViT-B-32`` for a full-size random architecture, or ``--clip-weights`` for real weights.

    python eval/bench_metrics.py                         # CPU, about 1-2 minutes on 2 cores
    python eval/bench_metrics.py --device cuda --json eval/bench_metrics.json

Results are printed as a table and written as JSON (``--json``); ``dmd-dar eval bench_json=<file>`` copies them
into metrics.json and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmd_dar.metrics.spectral import spectral_stats, spectral_stats_numpy  # noqa: E402

TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                                             "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _rate(fn, n_images: int, min_time: float, max_reps: int = 50) -> float:
    """Images/s of ``fn`` (processing ``n_images`` per call): one warm-up call, then repeat until ``min_time``."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while reps < max_reps and (reps < 2 or time.perf_counter() - t0 < min_time):
        fn()
        reps += 1
    return n_images * reps / (time.perf_counter() - t0)


def bench_spectral(device: str, min_time: float) -> list[dict]:
    out = []
    for res, batch in ((256, 16), (1024, 4)):
        x = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
        xn = x.numpy()
        xd = x.to(device)

        def torch_path(xd=xd):
            spectral_stats(xd)
            if xd.is_cuda:
                torch.cuda.synchronize()

        out.append({"metric": "spectral", "impl": f"torch ({device})", "resolution": res, "batch": batch,
                    "images_per_s": _rate(torch_path, batch, min_time)})
        out.append({"metric": "spectral", "impl": "numpy reference", "resolution": res, "batch": batch,
                    "images_per_s": _rate(lambda xn=xn: spectral_stats_numpy(xn), batch, min_time)})
    return out


def bench_lpips(device: str, min_time: float, weights: str | None, batches: list[int]) -> list[dict]:
    from dmd_dar.metrics.availability import MetricUnavailable
    from dmd_dar.metrics.lpips_metric import LpipsModel

    try:
        model, note = LpipsModel("alex", weights, device=device), "real AlexNet weights"
    except MetricUnavailable:
        model, note = LpipsModel("alex", random_backbone=True, device=device), "random AlexNet trunk (no weights here)"
    out = []
    for b in batches:
        x = torch.rand(b, 3, 256, 256) * 2 - 1
        y = torch.rand(b, 3, 256, 256) * 2 - 1
        out.append({"metric": "lpips", "impl": f"alex v0.1 ({device})", "resolution": 256, "batch": b,
                    "images_per_s": _rate(lambda x=x, y=y, b=b: model(x, y, batch_size=b), b, min_time, 20),
                    "note": note + "; pairs/s"})
    return out


def bench_clip(device: str, min_time: float, model_name: str | None, weights: str | None,
               batches: list[int]) -> list[dict]:
    from dmd_dar.metrics.clip_score import OpenClipModel

    if weights:
        model = OpenClipModel(model_name or "ViT-g-14", None, weights_file=weights, device=device)
        note = f"{model_name} real weights"
    elif model_name:
        model = OpenClipModel(model_name, None, random_init=True, device=device)
        note = f"{model_name} random init (no weights here): full-size architecture"
    else:
        cfg = Path(tempfile.mkdtemp()) / "tiny_clip.json"
        cfg.write_text(json.dumps(TINY_CLIP))
        model = OpenClipModel("tiny", None, random_init=True, device=device, model_config=cfg)
        note = "TINY random open_clip (no weights here): measures preprocessing + batching, not a real ViT"
    out = []
    for b in batches:
        x = torch.rand(b, 3, 512, 512) * 2 - 1
        out.append({"metric": "clip image encode", "impl": f"open_clip ({device}), pre_resize 256",
                    "resolution": 512, "batch": b,
                    "images_per_s": _rate(lambda x=x, b=b: model.encode_images(x, batch_size=b), b, min_time, 20),
                    "note": note})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement (after a warm-up call)")
    ap.add_argument("--lpips-weights", default=None, help="torchvision AlexNet ImageNet weights (optional)")
    ap.add_argument("--clip-model", default=None, help="e.g. ViT-B-32 (random init unless --clip-weights)")
    ap.add_argument("--clip-weights", default=None)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    results = bench_spectral(args.device, args.min_time)
    results += bench_lpips(args.device, args.min_time, args.lpips_weights, batches)
    results += bench_clip(args.device, args.min_time, args.clip_model, args.clip_weights, batches)
    report = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "wall_s": round(time.perf_counter() - t0, 1), "results": results}
    print(f"{'metric':<18} {'implementation':<38} {'res':>5} {'batch':>5} {'images/s':>10}  note")
    for r in results:
        print(f"{r['metric']:<18} {r['impl']:<38} {r['resolution']:>5} {r['batch']:>5} {r['images_per_s']:>10.1f}  "
              f"{r.get('note', '')}")
    print(f"device {args.device}, {report['torch_threads']} torch threads, {report['wall_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()

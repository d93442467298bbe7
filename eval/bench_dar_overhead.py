"""Training-step overhead of DAR routing against plain residual connections, measured side by side.

For each model size, one backbone (random weights, non-zero adaLN so every sublayer does real work) is run with
each router in turn: residual, DAR static_t c4, dynamic c4 and dense (S = 1) static_t, each DAR variant with the
lean autograd function (in each of its layouts: ``stacked``, ``per_source``) and with the reference path. Per variant: the median time of a full forward + backward
(loss = mean(out^2)), and a memory measure:

- CUDA: peak allocated bytes during the step above the bytes allocated before it (activations + temporaries;
  parameters and their already-allocated gradients excluded).
- CPU:  bytes of the tensors autograd saves for backward (``saved_tensors_hooks``), deduplicated by storage and
  excluding parameter storages: the step's activation peak, reached at the end of the forward pass.

Variants are interleaved (one step of each, in rotating order, per timed round) so that drift of the machine
(clocks, other jobs on shared cores) hits every variant alike.

    python eval/bench_dar_overhead.py --device cpu                       # both sizes, both lean layouts
    python eval/bench_dar_overhead.py --device cpu --sizes embedded --layouts per_source
    python eval/bench_dar_overhead.py --device cuda --dtype bf16 --batch 32 --json bench.json

On CPU the process keeps freed memory, as CPU training runs do (``dmd_dar/utils/cpu_memory.py``);
``--cpu-memory release`` measures under glibc's default policy instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmd_dar.models import PRESETS, ModelConfig, build_model  # noqa: E402
from dmd_dar.routing import RoutingConfig, build_router  # noqa: E402
from dmd_dar.routing.config import LEAN_LAYOUTS  # noqa: E402
from dmd_dar.utils.cpu_memory import retain_freed_memory  # noqa: E402

SIZES = {
    # SiT-XL/2 width and depth on 256^2 images through the SD-VAE: 32x32x4 latents, patch 2 -> 256 tokens.
    "xl": dict(image_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
               num_classes=1000),
    # The embedded teacher's architecture (d 128, depth 6, 4 heads, patch 4, 8 classes, attention bias, conv MLP).
    "embedded": dict(PRESETS["embedded"]),
}
# (name, routing or None for residual); each DAR variant runs lean and reference.
VARIANTS = [
    ("static_t c4", dict(kind="dar", query="static_t", chunk_size=4)),
    ("dynamic c4", dict(kind="dar", query="dynamic", chunk_size=4)),
    ("dense static_t", dict(kind="dar", query="static_t", chunk_size=1)),
]
TIME_TARGETS = {"static_t c4": 1.10, "dynamic c4": 1.25}
MEMORY_TARGET = 1.30
# Defaults per (device, size): batch, timed iterations, warm-up iterations, run the reference path.
DEFAULTS = {
    # ~20 s per XL step on 2 cores; the memory forward already warmed up. The reference path at XL needs
    # ~3 x sum_l |S_l| x B x T x D saved floats (dense: ~6 GB at batch 1) and minutes per step: off by default.
    ("cpu", "xl"): (1, 2, 0, False),
    ("cpu", "embedded"): (16, 10, 2, True),
    ("cuda", "xl"): (8, 20, 3, True),
    ("cuda", "embedded"): (128, 30, 3, True),
}


@dataclass
class Variant:
    label: str  # e.g. "static_t c4"
    path: str  # "lean/<layout>", "reference" or "-" (residual)
    router: torch.nn.Module
    times: list[float]
    memory: int = 0
    saved: int = 0
    failed: str = ""  # e.g. "OOM": the variant is reported but not timed


class SavedBytes:
    """Sum of bytes autograd saves for backward, each storage counted once, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.seen, self.total = exclude, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, x, t, y, autocast) -> None:
    model.zero_grad(set_to_none=False)
    with autocast():
        out = model(x, t, y)
    out.float().pow(2).mean().backward()


def _use(model, variant: Variant) -> None:
    # The backbone is shared; only the router differs between variants (the model reads self.router).
    model.router = variant.router


def bench_size(size: str, args, device: torch.device) -> list[dict]:
    d_batch, d_iters, d_warm, d_ref = DEFAULTS[(device.type, size)]
    reference = d_ref if args.reference is None else args.reference
    batch = args.batch or d_batch
    iters = args.iters or d_iters
    warmup = d_warm if args.warmup is None else args.warmup
    cfg = ModelConfig(**SIZES[size], class_dropout_prob=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    with torch.no_grad():  # non-zero adaLN and head, so gates and outputs are not identically zero
        for module in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1],
                                                                          model.final_layer.linear]:
            module.weight.normal_(0.0, 0.02)
    model.train()
    n, dim = cfg.num_sublayers, cfg.hidden_size
    variants = [Variant("residual", "-", model.router, [])]
    paths = [f"lean/{layout}" for layout in args.layouts] + (["reference"] if reference else [])
    for label, kw in VARIANTS:
        for path in paths:
            lean = path.startswith("lean/")
            routing = RoutingConfig(**kw, lean=lean, lean_layout=path.split("/")[1] if lean else "auto")
            router = build_router(routing, n, dim).to(device)
            with torch.no_grad():  # non-trivial routing weights
                for p in router.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            variants.append(Variant(label, path, router, []))
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    bf16 = args.dtype == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # Memory, untimed. Saved activations: one forward under the hooks (the graph is dropped unused).
    for v in variants:
        _use(model, v)
        try:
            counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), autocast():
                out = model(x, t, y)
            del out
            v.saved = counter.total
            if device.type == "cuda":
                _step(model, x, t, y, autocast)  # allocate gradients (excluded from the measure)
                _sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                _step(model, x, t, y, autocast)
                _sync(device)
                v.memory = torch.cuda.max_memory_allocated(device) - base
            else:
                v.memory = v.saved
        except torch.OutOfMemoryError:
            v.failed = "OOM"
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if variants[0].failed:
        raise SystemExit(f"{size}: the residual baseline ran out of memory at batch {batch}; lower --batch")
    variants = [v for v in variants if not v.failed] + [v for v in variants if v.failed]
    timed = [v for v in variants if not v.failed]

    for v in timed:
        _use(model, v)
        for _ in range(warmup):
            _step(model, x, t, y, autocast)
    _sync(device)
    for i in range(iters):
        k = i % len(timed)
        for v in timed[k:] + timed[:k]:  # rotate the order each round
            _use(model, v)
            _sync(device)
            start = time.perf_counter()
            _step(model, x, t, y, autocast)
            _sync(device)
            v.times.append(time.perf_counter() - start)
    _use(model, variants[0])

    base_time = statistics.median(variants[0].times)
    base_mem = variants[0].memory
    rows = []
    for v in variants:
        if v.failed:
            rows.append(dict(size=size, variant=v.label, path=v.path, batch=batch, tokens=cfg.num_tokens,
                             iters=0, failed=v.failed, time_ms=float("nan"), time_ratio=float("nan"),
                             memory_mb=float("nan"), memory_ratio=float("nan"), saved_mb=v.saved / 2**20))
            continue
        med = statistics.median(v.times)
        row = dict(size=size, variant=v.label, path=v.path, batch=batch, tokens=cfg.num_tokens, iters=iters,
                   time_ms=1e3 * med, time_ratio=med / base_time, memory_mb=v.memory / 2**20,
                   memory_ratio=v.memory / base_mem if base_mem else float("nan"), saved_mb=v.saved / 2**20,
                   router_params=sum(p.numel() for p in v.router.parameters()))
        if v.path.startswith("lean/"):
            target = TIME_TARGETS.get(v.label)
            row["time_target"] = target
            row["time_pass"] = None if target is None else row["time_ratio"] <= target
            row["memory_target"] = MEMORY_TARGET
            row["memory_pass"] = row["memory_ratio"] <= MEMORY_TARGET
        rows.append(row)
    return rows


def _fmt_pass(flag) -> str:
    return "-" if flag is None else ("PASS" if flag else "FAIL")


def print_table(rows: list[dict], device: str, dtype: str) -> None:
    mem_name = "peak MB" if device == "cuda" else "saved MB"
    print(f"\nDAR overhead, forward+backward, device={device} dtype={dtype} "
          f"(memory = {'CUDA peak above start' if device == 'cuda' else 'autograd-saved activations'})")
    head = (f"{'size':9} {'variant':15} {'path':16} {'batch':>5} {'ms':>9} {'time x':>7} {mem_name:>9} "
            f"{'mem x':>6} {'target':>14} {'time':>5} {'mem':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("failed"):
            print(f"{r['size']:9} {r['variant']:15} {r['path']:16} {r['batch']:>5} {r['failed']:>9}")
            continue
        target = ""
        lean = r["path"].startswith("lean/")
        if lean:
            tt = r.get("time_target")
            target = (f"t<={tt:.2f} " if tt else "") + f"m<={r['memory_target']:.1f}"
        print(f"{r['size']:9} {r['variant']:15} {r['path']:16} {r['batch']:>5} {r['time_ms']:9.1f} "
              f"{r['time_ratio']:7.3f} {r['memory_mb']:9.1f} {r['memory_ratio']:6.3f} {target:>14} "
              f"{_fmt_pass(r.get('time_pass')) if lean else '':>5} "
              f"{_fmt_pass(r.get('memory_pass')) if lean else '':>5}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--sizes", default="xl,embedded", help="comma-separated: " + ",".join(SIZES))
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default per size)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per variant")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per size and device)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the reference (non-lean) aggregation (default: on, except XL on CPU)")
    parser.add_argument("--layouts", default=None,
                        help="comma-separated lean layouts to run: stacked, per_source (default: both on CPU, "
                             "stacked on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--cpu-memory", choices=["retain", "release"], default="retain",
                        help="CPU: keep freed memory in the process as training runs do (retain), or glibc's "
                             "default of handing it back to the OS (release)")
    parser.add_argument("--json", default=None, help="write the rows and the environment to this file")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    default_layouts = "stacked,per_source" if args.device == "cpu" else "stacked"
    args.layouts = [s.strip() for s in (args.layouts or default_layouts).split(",") if s.strip()]
    bad = [s for s in args.layouts if s not in LEAN_LAYOUTS[1:]]
    if bad or not args.layouts:
        parser.error(f"unknown layout(s) {bad}; choose from {list(LEAN_LAYOUTS[1:])}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    retained = device.type == "cpu" and args.cpu_memory == "retain" and retain_freed_memory()
    if device.type == "cpu":
        print(f"CPU memory policy: {'retain freed memory' if retained else 'glibc default (release)'}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for size in sizes:
        start = time.perf_counter()
        rows += bench_size(size, args, device)
        print(f"[{size}: {time.perf_counter() - start:.0f} s]", flush=True)
    print_table(rows, args.device, args.dtype)
    if args.json:
        env = dict(torch=torch.__version__, python=platform.python_version(), device=args.device, dtype=args.dtype,
                   threads=torch.get_num_threads(), cpu_memory_retained=retained,
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor())
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
